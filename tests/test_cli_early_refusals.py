"""Refusals that must come before the weights load, across every command, and the run failures that
must read as messages, not tracebacks (a reviewer's list of kinds):

1. a calibrated config file made for another model (``model_fingerprint``), wherever a config file is
   accepted (``--kv``, ``--methods``, ``--presets``, ``--preset``): the flag, the file and both models;
2. token counts beyond the model's context, known from its config (``generate --max-new-tokens``
   before the prompt is even tokenized, and with it);
3. memory: a bench grid or capacity budget that cannot fit in the memory available here, refused up
   front with the largest value that fits; memory running out during a run is exit code 1 and a message;
4. list-valued flags (empty, zero, negative, repeated, not a number): each message names its own flag
   and an example of a valid value for that flag;
5. progress bars: none when stderr is not a terminal (tqdm's ``disable=None``);
6. the README's quickstart shows compression (its printed lines are what the snippet prints), and
   what it says ``make demo`` runs is what it runs.

Runs on the tiny random Llama of conftest.py (4096 positions); only the README test loads the
embedded model.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvsqueeze.cli import main
from kvsqueeze.commands import resources
from kvsqueeze.config import preset
from kvsqueeze.config_file import model_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr with its line breaks joined) of ``kvsqueeze argv``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, " ".join(capsys.readouterr().err.split())


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a model's weights are loaded: every refusal must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the bad input was refused")

    monkeypatch.setattr("kvsqueeze.models.load_model", refuse)


# ------------------------------------------------------------------ 1. a config made for another model


@pytest.fixture(scope="module")
def other_model_file(tmp_path_factory, tiny_llama) -> Path:
    """A `kvsqueeze calibrate` file of k4v4 made for a 30-layer, 576-wide model (not the tiny one)."""
    made_for = {**model_fingerprint(tiny_llama.config), "num_hidden_layers": 30, "hidden_size": 576}
    data = {
        "model": made_for,
        "config": preset("k4v4").to_dict(),
        "calibration": {"model": "big-llama-135m", "tokens": [0, 1024]},
    }
    path = tmp_path_factory.mktemp("calibrations") / "big.json"
    path.write_text(json.dumps(data))
    return path


def _made_for_cases() -> list[tuple[str, list[str]]]:
    out = "{tmp}/out.json"
    return [
        ("--kv", ["generate", "Hi", "--max-new-tokens", "2", "--kv", "{file}"]),
        ("--kv", ["generate", "Hi", "--kv", "{file}", "--kv-values", "int8"]),
        ("--kv", ["bench", "--kv", "{file}", "--kv-keys", "int8", "--contexts", "64", "--out", out]),
        ("--methods", ["bench", "--methods", "exact,{file}", "--contexts", "64", "--out", out]),
        ("--methods", ["eval", "quality", "--methods", "exact,{file}", "--window", "256", "--windows", "1",
                       "--prefill", "32", "--chunk", "32", "--out", out, "--plot", "{tmp}/q.png"]),
        ("--methods", ["eval", "retrieval", "--methods", "exact,{file}@fused", "--lengths", "256",
                       "--out", out, "--plot", "{tmp}/r.png"]),
        ("--presets", ["demo", "--presets", "k4v4,{file}", "--new-tokens", "2"]),
        ("--preset", ["calibrate", "--preset", "{file}", "--out", out]),
    ]  # fmt: skip


@pytest.mark.parametrize(("flag", "argv"), _made_for_cases(), ids=lambda v: v if isinstance(v, str) else v[0])
def test_a_config_made_for_another_model_is_refused_before_the_weights_load(
    flag, argv, other_model_file, tiny_llama_dir, tmp_path, no_weights, capsys
) -> None:
    argv = [a.format(file=other_model_file, tmp=tmp_path) for a in argv] + ["--model", tiny_llama_dir]
    code, err = cli(argv, capsys)
    assert code == 2, err
    assert f"error: {flag}: '{other_model_file}' was calibrated for another model" in err
    assert "'big-llama-135m' (llama, 30 layers, hidden_size 576" in err  # the model it was made for
    assert f"not --model '{tiny_llama_dir}' (llama, 2 layers, hidden_size 64" in err  # the model given
    assert "num_hidden_layers 30 (this model: 2)" in err and "allowed:" in err
    assert "Traceback" not in err and not list(tmp_path.glob("*.json"))


def test_a_config_made_for_this_model_passes(other_model_file, tiny_llama, tmp_path) -> None:
    from kvsqueeze.commands.kv_args import KVChoice

    data = json.loads(other_model_file.read_text())
    data["model"] = model_fingerprint(tiny_llama.config)
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(data))
    assert KVChoice(str(mine)).resolve(tiny_llama.config, "tiny").config.model_fingerprint


# ------------------------------------------------------------------------------ 2. the model's context


@pytest.mark.parametrize(
    ("tokens", "needle"),
    [
        ("100000", "a prompt of at least 1 token + --max-new-tokens 100000 = 100001 exceed the model's context "
                   "of 4096 tokens (max_position_embeddings 4096); allowed: --max-new-tokens <= 4095"),
        ("4096", "+ --max-new-tokens 4096 = 4097 exceed the model's context of 4096"),
        ("4090", "tokens + --max-new-tokens 4090 = "),  # with the prompt's tokens, still before the weights
    ],
)  # fmt: skip
def test_generate_checks_new_tokens_against_the_context_before_the_weights_load(
    tokens, needle, tiny_llama_dir, no_weights, capsys
) -> None:
    code, err = cli(
        ["generate", "Name a color.", "--model", tiny_llama_dir, "--max-new-tokens", tokens], capsys
    )
    assert code == 2, err
    assert err.startswith("error: --max-new-tokens: ") and needle in err
    assert re.search(r"allowed: --max-new-tokens <= \d+", err)


@pytest.mark.parametrize(
    ("flag", "argv"),
    [
        ("--max-new-tokens", ["generate", "Hi", "--max-new-tokens", "5000"]),
        ("--new-tokens", ["demo", "--new-tokens", "5000"]),
        ("--window", ["eval", "quality", "--window", "5000", "--windows", "1", "--out", "{tmp}/q.json",
                      "--plot", "{tmp}/q.png"]),
        ("--lengths", ["eval", "retrieval", "--lengths", "5000", "--out", "{tmp}/r.json", "--plot", "{tmp}/r.png"]),
        ("--new-tokens", ["eval", "retrieval", "--lengths", "4000", "--new-tokens", "200", "--out", "{tmp}/r.json",
                          "--plot", "{tmp}/r.png"]),
        ("--contexts", ["bench", "--contexts", "5000", "--out", "{tmp}/b.json"]),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]),
)  # fmt: skip
def test_every_token_count_is_checked_against_the_context_before_the_weights_load(
    flag, argv, tiny_llama_dir, tmp_path, no_weights, capsys
) -> None:
    code, err = cli([a.format(tmp=tmp_path) for a in argv] + ["--model", tiny_llama_dir], capsys)
    assert code == 2, err
    assert err.startswith(f"error: {flag}: ") and "4096" in err and "allowed" in err


# ------------------------------------------------------------------------------------------ 3. memory


def bench(model_dir, tmp_path, *flags: str) -> list:
    return ["bench", "--model", model_dir, "--no-progress", "--out", tmp_path / "b.json", *flags]


def test_bench_refuses_a_batch_size_that_cannot_fit(
    tiny_llama_dir, tmp_path, no_weights, monkeypatch, capsys
):
    monkeypatch.setattr(resources, "available_memory", lambda: (512 * MiB, "a test's budget"))
    code, err = cli(bench(tiny_llama_dir, tmp_path, "--contexts", "64", "--batch-sizes", "1,100000"), capsys)
    assert code == 2, err
    assert err.startswith(
        "error: --batch-sizes: 100000 is not allowed: exact at batch size 100000 and context 64"
    )
    assert "more than the 512.0 MiB of memory available here (a test's budget)" in err
    most = int(re.search(r"allowed: batch sizes up to (\d+) at --contexts 64", err).group(1))
    assert f"e.g. --batch-sizes 1,{most}" in err and not list(tmp_path.glob("*.json"))


def test_the_largest_batch_size_offered_fits_and_one_more_does_not(tiny_llama) -> None:
    from kvsqueeze.eval.methods import resolve_methods

    methods = resolve_methods("exact,k4v4")
    budget = (256 * MiB, "test")
    with pytest.raises(ValueError, match=r"batch sizes up to (\d+)") as info:
        resources.check_speed_memory(methods, tiny_llama.config, "float32", (10**6,), (512,), 16, budget)
    most = int(re.search(r"up to (\d+)", str(info.value)).group(1))
    resources.check_speed_memory(methods, tiny_llama.config, "float32", (most,), (512,), 16, budget)  # fits
    with pytest.raises(ValueError, match=f"--batch-sizes: {most + 1} is not allowed"):
        resources.check_speed_memory(methods, tiny_llama.config, "float32", (most + 1,), (512,), 16, budget)
    need = resources.run_need(methods[0], tiny_llama.config, "float32", most, 512, 16)
    assert need.kv == 2 * 2 * 2 * 64 * 4 * (512 + 15) * most  # layers x (K, V) x heads x head_dim x fp32
    assert need.weights > 0 and need.activations > 0 and need.total <= budget[0]


@pytest.mark.parametrize(
    ("free", "needle"),
    [
        (40 * MiB, "--contexts: 4000 is not allowed: exact at batch size 1 and context 4000"),
        (10 * MiB, "--model: its weights alone need about"),
    ],
)
def test_bench_blames_the_contexts_or_the_model_when_batch_1_cannot_fit(
    free, needle, tiny_llama_dir, tmp_path, no_weights, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(resources, "available_memory", lambda: (free, "test"))
    code, err = cli(bench(tiny_llama_dir, tmp_path, "--contexts", "64,4000", "--batch-sizes", "1"), capsys)
    assert code == 2 and needle in err, err
    assert "allowed:" in err


def test_bench_capacity_refuses_a_budget_that_cannot_be_allocated(
    tiny_llama_dir, tmp_path, no_weights, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(resources, "available_memory", lambda: (64 * MiB, "test"))
    flags = ["--memory-budget", "1GiB", "--batch-sizes", "64"]
    code, err = cli(bench(tiny_llama_dir, tmp_path, *flags), capsys)
    assert code == 2, err
    assert (
        err.startswith("error: --memory-budget: '1GiB' is not allowed") and "allowed: at most 64.0 MiB" in err
    )


def test_memory_running_out_during_a_bench_run_is_a_message_and_exit_1(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
) -> None:
    def time_run(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
            "allocate 1099511627776 bytes."
        )

    monkeypatch.setattr("kvsqueeze.eval.speed.time_run", time_run)
    flags = ["--methods", "exact", "--contexts", "64", "--batch-sizes", "2", "--new-tokens", "2"]
    code, err = cli(bench(tiny_llama_dir, tmp_path, *flags, "--repeats", "1", "--warmup", "0"), capsys)
    assert code == 1, err
    assert "memory ran out at batch size 2, context 64" in err and "allowed: a smaller --batch-sizes" in err
    assert "Traceback" not in err and "unexpected" not in err and "please report" not in err


def test_memory_running_out_in_any_command_is_not_reported_as_a_bug(monkeypatch, capsys) -> None:
    import kvsqueeze.commands.presets

    def run(args):
        raise MemoryError()

    monkeypatch.setattr(kvsqueeze.commands.presets, "run", run)
    code, err = cli(["presets"], capsys)
    assert code == 1 and "error: memory ran out" in err and "please report" not in err


def test_allocation_failures_are_recognised() -> None:
    assert resources.is_out_of_memory(MemoryError())
    assert resources.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not resources.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not resources.is_out_of_memory(ValueError("out of memory"))


def test_available_memory_is_a_positive_number_here() -> None:
    free, source = resources.available_memory()
    assert free is None or (free > 0 and source)


# ------------------------------------------------------------------------------ 4. list-valued flags

BENCH = ["bench", "--out", "{tmp}/b.json"]
QUALITY = ["eval", "quality", "--window", "256", "--windows", "1", "--prefill", "32", "--chunk", "32",
           "--out", "{tmp}/q.json", "--plot", "{tmp}/q.png"]  # fmt: skip
RETRIEVAL = ["eval", "retrieval", "--out", "{tmp}/r.json", "--plot", "{tmp}/r.png"]
CALIBRATE = ["calibrate", "--out", "{tmp}/c.json"]
# command, flag, an example of a valid value the message must give, a repeated value
LIST_FLAGS = [
    (BENCH, "--methods", "exact,k4v4", "exact,exact"),
    (BENCH + ["--contexts", "64"], "--batch-sizes", "1,4", "2,2"),
    (BENCH, "--contexts", "512,2048", "64,64"),
    (QUALITY, "--methods", "exact,k4v4", "k4v4,k4v4"),
    (RETRIEVAL, "--methods", "exact,k4v4", "k4v4,k4v4"),
    (RETRIEVAL, "--lengths", "1024,2048", "256,256"),
    (RETRIEVAL + ["--lengths", "256"], "--depths", "0.1,0.5,0.9", "0.5,0.5"),
    (["demo"], "--presets", "k4v4,k2v2", "k4v4,k4v4"),
    (CALIBRATE, "--bits", "2,3,4", "4,4"),
]
OTHER_EXAMPLES = {example for _, _, example, _ in LIST_FLAGS}


@pytest.mark.parametrize("kind", ["empty", "blank", "comma", "zero", "negative", "repeated", "not a number"])
@pytest.mark.parametrize(
    ("base", "flag", "example", "repeated"), LIST_FLAGS, ids=[f"{b[0]} {f}" for b, f, _, _ in LIST_FLAGS]
)
def test_each_list_flag_names_itself_and_an_example_of_its_own(
    base, flag, example, repeated, kind, tiny_llama_dir, tmp_path, no_weights, capsys
) -> None:
    if (flag, kind) == ("--depths", "zero"):
        pytest.skip("0 is a valid depth (the start of the haystack)")
    value = {"empty": "", "blank": " ", "comma": ",", "zero": "0", "negative": "-1", "repeated": repeated,
             "not a number": "x"}[kind]  # fmt: skip
    argv = [a.format(tmp=tmp_path) for a in base] + [f"{flag}={value}", "--model", tiny_llama_dir]
    code, err = cli(argv, capsys)
    assert code == 2, err
    assert err.startswith(f"error: {flag}: "), err
    assert f"e.g. {example}" in err or f"e.g. {flag} {example}" in err, err
    assert not [other for other in OTHER_EXAMPLES - {example} if f"e.g. {other}" in err], err
    assert "see the messages above" not in err and "Traceback" not in err


def test_an_empty_batch_sizes_is_refused_not_replaced_by_the_default(
    tiny_llama_dir, tmp_path, no_weights, capsys
) -> None:
    code, err = cli(bench(tiny_llama_dir, tmp_path, "--batch-sizes", ""), capsys)
    assert code == 2 and "--batch-sizes: '' names no value" in err and "e.g. 1,4" in err


@pytest.mark.parametrize("command", ["generate", "bench"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_kv_is_refused_not_replaced_by_the_default(
    command, value, tiny_llama_dir, tmp_path, no_weights, capsys
) -> None:
    argv = (
        ["generate", "hi", "--model", tiny_llama_dir, "--max-new-tokens", "2"]
        if command == "generate"
        else bench(tiny_llama_dir, tmp_path)
    )
    code, err = cli([*argv, "--kv", value], capsys)
    assert code == 2 and "--kv:" in err and "names no preset or file" in err, err


# ------------------------------------------------------------------------------------- 5. progress bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "shown"), [(io.StringIO, False), (Terminal, True)])
def test_bars_show_on_a_terminal_only(stream, shown) -> None:
    from tqdm.auto import tqdm

    from kvsqueeze.eval.progress import bar_disabled

    out = stream()
    for _ in tqdm(range(3), file=out, disable=bar_disabled(True), mininterval=0):
        pass
    assert ("3/3" in out.getvalue()) is shown
    assert bar_disabled(False) is True


def test_a_run_logged_to_a_file_has_no_carriage_returns(tiny_llama_dir, tmp_path) -> None:
    """A real run with stderr to a file (as in CI): its lines, no bar redrawn with \\r."""
    argv = [
        sys.executable,
        "-m",
        "kvsqueeze.cli",
        "demo",
        "--model",
        str(tiny_llama_dir),
        "--presets",
        "k4v4",
    ]
    done = subprocess.run([*argv, "--new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "Demo on" in done.stderr


# ----------------------------------------------------------------------------------------- 6. README


def test_readme_says_what_make_demo_runs() -> None:
    from kvsqueeze.eval.demo import DEFAULT_DEMO_PRESETS

    readme = (ROOT / "README.md").read_text()
    assert "every preset on the embedded model" not in readme
    said = re.search(r"make demo .*\n\s+# \(([^)]*)\)", readme).group(1)
    assert tuple(name.strip() for name in said.split(",")) == DEFAULT_DEMO_PRESETS
    assert re.search(r"^demo:.*\n\t\$\(VENV\)/bin/kvsqueeze demo$", (ROOT / "Makefile").read_text(), re.M)


@pytest.mark.model
def test_readme_quickstart_prints_what_the_readme_shows(tmp_path) -> None:
    """The quickstart snippet, run as written: its last two lines are the README's, with compression."""
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(from kvsqueeze import SqueezedCache.*?)```", readme, re.S).group(1)
    shown = (
        re.search(r"prints the summary, then\n\n```\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    )
    script = tmp_path / "quickstart.py"
    script.write_text(snippet)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-2:] == shown
    ratio = float(re.search(r"= ([0-9.]+) of an fp16 cache", shown[0]).group(1))
    assert ratio < 0.5
