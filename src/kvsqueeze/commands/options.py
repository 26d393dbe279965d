"""What `eval` and `demo` check before any work starts (before the weights load), each check naming
the option it refuses; the model's config, tokenizer and context come from `common` and `preflight`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import check_made_for, check_output_path, console

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


@contextmanager
def flag_errors(flags: dict[str, str], examples: dict[str, str] | None = None) -> Iterator[None]:
    """Re-raise a ValueError whose message starts with a field of ``flags`` (``num_seeds=0 ...``)
    with that field's command-line option in front (``--seeds: num_seeds=0 ...``), and an example of
    a valid value when ``examples`` has one for that option and the message gives none."""
    try:
        yield
    except ValueError as err:
        field = re.match(r"\w+", str(err))
        flag = flags.get(field.group(0)) if field else None
        if flag is None:
            raise
        example = (examples or {}).get(flag)
        tail = f"; e.g. {flag} {example}" if example and "e.g." not in str(err) else ""
        raise ValueError(f"{flag}: {err}{tail}") from None


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


def split_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated flag value."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_numbers(
    flag: str,
    text: str | None,
    example: str,
    kind: type = int,
    low: float = 1,
    high: float | None = None,
    echo: bool = False,
    field: str | None = None,
) -> tuple:
    """Distinct numbers of ``kind`` (int or float) in ``[low, high]`` from the comma-separated value
    ``text`` of ``flag``, e.g. ``"512,2048"``. ValueError naming the flag, the value at fault and an
    example of a valid value, ``example``, for an empty value or item, a non-number, a value out of
    range (NaN and infinities included) or a value given twice; with ``echo`` the message of a bad
    item starts with the whole value (``--lengths: '256,2k' is not allowed; '2k' is not ...``), with
    ``field`` a number out of range is named as that field (``--depths: depth=1.5 is not allowed``)."""
    if kind is int and low == 1 and high is None:
        noun = "positive integer"
    else:
        bounds = f" in [{low:g}, {high:g}]" if high is not None else f" >= {low:g}"
        noun = ("integer" if kind is int else "number") + bounds
    nouns = noun.replace("integer", "integers", 1).replace("number", "numbers", 1)
    allowed = f"allowed: comma-separated {nouns}, e.g. {example}"
    if text is None or not text.strip():
        raise ValueError(f"{flag}: {text!r} names no value; {allowed}")
    values: list = []
    for part in (p.strip() for p in text.split(",")):
        whole = f"{text!r} is not allowed; " if echo and part != text.strip() else ""
        try:
            value = kind(part) if kind is float or part.lstrip("+-").isdigit() else None
        except ValueError:
            value = None
        if value is None:
            raise ValueError(f"{flag}: {whole}{part!r} is not a {noun}; {allowed}")
        if (kind is float and not math.isfinite(value)) or value < low or (high is not None and value > high):
            if field is not None:
                raise ValueError(f"{flag}: {field}={value!r} is not allowed; it must be a {noun}; {allowed}")
            raise ValueError(f"{flag}: {whole}{part!r} is not a {noun}; {allowed}")
        if value in values:
            raise ValueError(f"{flag}: {value!r} given more than once; give each value once, e.g. {example}")
        values.append(value)
    return tuple(values)


def runnable_methods(flag: str, names: str) -> tuple[list[Any], list[str]]:
    """``(methods, skipped names)`` of ``flag``: unknown, repeated or no names are refused; baselines
    whose optional package is missing are skipped with a message."""
    from ..eval.methods import method_available, resolve_methods

    try:
        resolved = resolve_methods(names)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}{'' if 'e.g.' in str(err) else ', e.g. exact,k4v4'}") from None
    if not resolved:
        raise ValueError(f"{flag}: {names!r} names no method; give e.g. exact,k4v4")
    given = [m.name for m in resolved]
    repeated = sorted({name for name in given if given.count(name) > 1})
    if repeated:
        raise ValueError(
            f"{flag}: {names!r} is not allowed; {repeated} appear more than once; give each method once, e.g. "
            "exact,k4v4"
        )
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


def check_methods(
    flag: str, methods: list[Any], model_config: Any, given: str | None = None, model: str | None = None
) -> None:
    """Every method fits the model (group sizes, KV heads, layers), from its config alone; with
    ``given`` (the flag's value) every config file in it was made for this model (`check_made_for`,
    naming ``model``, the --model value)."""
    from ..config import CacheConfig
    from ..eval.methods import FUSED_SUFFIX

    for name in split_list(given or ""):
        file = name.removesuffix(FUSED_SUFFIX)
        if file.endswith(".json"):
            check_made_for(flag, file, CacheConfig.load(file), model_config, model)
    for method in methods:
        try:
            method.check_model(model_config)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
