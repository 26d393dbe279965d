"""What `eval` and `demo` check before any work starts (before the weights load), each check naming
the option it refuses; the model's config, tokenizer and context come from `common` and `preflight`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import check_output_path, console

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


@contextmanager
def flag_errors(flags: dict[str, str]) -> Iterator[None]:
    """Re-raise a ValueError whose message starts with a field of ``flags`` (``num_seeds=0 ...``)
    with that field's command-line option in front (``--seeds: num_seeds=0 ...``)."""
    try:
        yield
    except ValueError as err:
        field = re.match(r"\w+", str(err))
        flag = flags.get(field.group(0)) if field else None
        if flag is None:
            raise
        raise ValueError(f"{flag}: {err}") from None


def load_weights(name: str) -> Any:
    """The model of ``--model``, once every option has been checked (its config by
    `common.load_model_config`, its tokenizer by `preflight.load_tokenizer`)."""
    from ..models import load_model

    try:
        return load_model(name)[0]
    except ValueError as err:
        raise ValueError(f"--model: {str(err).removeprefix('model: ')}") from None


def check_positive(flag: str, value: int) -> int:
    """``value`` of ``flag`` is an integer >= 1."""
    if value < 1:
        raise ValueError(f"{flag}: {value} is not allowed; give an integer >= 1")
    return value


def check_outputs(out: str, plot: str) -> None:
    """``--out`` and ``--plot`` are writable, distinct files, and the figure has a format it is drawn in."""
    check_output_path("--out", out)
    check_output_path("--plot", plot)
    if Path(plot).suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"--plot: {plot!r} has no figure suffix; allowed: {list(PLOT_SUFFIXES)}")
    if Path(out).resolve() == Path(plot).resolve():
        raise ValueError(f"--plot: {plot!r} is also --out; give two different files")


def read_eval_text(text_file: str | None, hub_wikitext: bool) -> tuple[str, str]:
    """``(text, source)`` from ``--text-file``, ``--hub-wikitext`` or the bundled WikiText-2 file."""
    from ..eval.text import load_hub_wikitext
    from .preflight import read_text

    if hub_wikitext:
        try:
            return load_hub_wikitext(), "hub:wikitext-2-raw-v1/test"
        except (ValueError, OSError) as err:
            raise ValueError(f"--hub-wikitext: {err}") from None
    file, text = read_text("--text-file", text_file)
    return text, str(file)


def runnable_methods(flag: str, names: str) -> tuple[list[Any], list[str]]:
    """``(methods, skipped names)`` of ``flag``: unknown, repeated or no names are refused; baselines
    whose optional package is missing are skipped with a message."""
    from ..eval.methods import method_available, resolve_methods

    try:
        resolved = resolve_methods(names)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None
    if not resolved:
        raise ValueError(f"{flag}: {names!r} names no method; give e.g. exact,k4v4")
    given = [m.name for m in resolved]
    repeated = sorted({name for name in given if given.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag}: {names!r} is not allowed; {repeated} appear more than once")
    methods, skipped = [], []
    for method in resolved:
        ok, why = method_available(method)
        if ok:
            methods.append(method)
        else:
            console.print(f"[yellow]{why}[/yellow]")
            skipped.append(method.name)
    if not methods:
        raise ValueError(f"{flag}: none of {names!r} can run here (see the messages above)")
    return methods, skipped


def check_methods(flag: str, methods: list[Any], model_config: Any) -> None:
    """Every method fits the model (group sizes, KV heads, layers), from its config alone."""
    for method in methods:
        try:
            method.check_model(model_config)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
