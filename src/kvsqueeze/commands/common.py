"""What the subcommands share: the stderr console, table printing, a model's KV shape, the checks of
output paths, input text files, model names and config files (`check_made_for`: a calibrated
config made for another model) that run before any work starts, and `RunFailed`, the error of a run
that started and could not finish (exit code 1, its message only)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out = Console()


def print_table(table: Table, width: int = 120) -> None:
    """Print to stdout; at ``width`` columns when stdout is a file or a pipe (not the 80 of rich)."""
    (out if out.is_terminal else Console(width=width)).print(table)


def model_shape(model_config: object) -> tuple[int, int, int, int]:
    """(num_layers, num_kv_heads, head_dim, max_tokens) of a transformers config; max_tokens is the
    context the model supports, RoPE scaling included (0: no limit)."""
    from ..integrations.context import context_limit

    cfg = model_config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim, context_limit(cfg).tokens or 0


def check_output_path(flag: str, path: str | Path | None) -> Path | None:
    """Check, before any work starts, that the output file ``path`` given to ``flag`` can be written:
    its nearest existing folder is a writable directory (probed by writing a temporary file there;
    no folder is created) and the path is not a folder. Returns the path (None passes through).
    Raises ValueError naming the flag, the value and why."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a directory; allowed: a file path")
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folders to make are made by the writer, not by this check
    if not existing.is_dir():
        raise ValueError(
            f"{flag}: {str(path)!r} cannot be written: {str(existing)!r} is a file, not a directory"
        )
    try:  # probe by writing (permission bits say nothing for root, nor for /proc or read-only mounts)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".kvsqueeze-probe-"):
            pass
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise ValueError(f"{flag}: {str(path)!r} cannot be written ({err.strerror or err})") from None
    return target


def read_text_file(flag: str, path: str | Path) -> str:
    """The UTF-8 text of the file given to ``flag``. Raises ValueError naming the flag and the file
    when it is missing, a directory, unreadable, not UTF-8 (binary or another encoding), or empty
    (`eval.text.read_text_file`, shared with the Python API's `load_text`)."""
    from ..eval.text import read_text_file as read

    return read(flag, path)


def load_model_config(flag: str, name: str) -> Any:
    """The transformers config of the model given to ``flag`` (a named model, a local folder, a GGUF
    file or a hub id), read without the weights. Raises ValueError naming the flag and the value
    when `kvsqueeze.models.resolve_model` refuses it, a folder has no ``config.json``, or the config
    cannot be read or is not a decoder language model's."""
    from transformers import AutoConfig

    from ..models import resolve_model

    try:
        source = resolve_model(name)
    except ValueError as err:
        raise ValueError(f"{flag}: {str(err).removeprefix('model: ')}") from None
    where, extra = source, {}
    if isinstance(source, Path) and source.is_dir() and not (source / "config.json").is_file():
        raise ValueError(f"{flag}: folder {name!r} has no config.json (not a saved model)")
    if isinstance(source, Path) and source.is_file():  # a GGUF file
        where, extra = source.parent, {"gguf_file": source.name}
    try:
        config = AutoConfig.from_pretrained(where, **extra)
        model_shape(config)
    except Exception as err:  # transformers' OSError / ValueError / a config without decoder fields
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"{flag}: {name!r} could not be read as a language model's config ({type(err).__name__}: {reason})"
        ) from None
    return config


class RunFailed(Exception):
    """A run that passed every check and failed while working, for a reason the message says and the
    user can act on (e.g. memory ran out at a batch size): `cli.main` prints the message, exit code 1."""


def _describe_fingerprint(fields: dict[str, Any]) -> str:
    """A short description of a model's fingerprint, e.g. ``llama, 30 layers, hidden_size 576, 3 KV
    heads x head_dim 64, vocab 49152``."""
    parts = [str(fields["model_type"])] if fields.get("model_type") is not None else []
    for name, label in (("num_hidden_layers", "{} layers"), ("hidden_size", "hidden_size {}")):
        if fields.get(name) is not None:
            parts.append(label.format(fields[name]))
    heads, head_dim = fields.get("num_key_value_heads"), fields.get("head_dim")
    if heads is not None or head_dim is not None:
        parts.append(
            f"{heads if heads is not None else '?'} KV heads x head_dim {head_dim if head_dim is not None else '?'}"
        )
    if fields.get("vocab_size") is not None:
        parts.append(f"vocab {fields['vocab_size']}")
    return ", ".join(parts) or "unrecorded fields"


def check_made_for(
    flag: str, file: str | Path, config: Any, model_config: Any, model: str | None = None
) -> None:
    """Refuse, before any weights load, the config file ``file`` given to ``flag`` (its `CacheConfig`
    ``config``) when it was calibrated for another model than ``model_config`` (its
    ``model_fingerprint``; a config without one passes). The message names the flag, the file, the
    model the file was made for (its recorded name when the file has one) and the model given."""
    from ..config_file import fingerprint_diffs, model_fingerprint, read_json

    expected = dict(config.model_fingerprint)
    diffs = fingerprint_diffs(config.model_fingerprint, model_config)
    if not diffs:
        return
    made_for = None
    try:  # a `kvsqueeze calibrate` file records the model's name in its calibration entry
        data = read_json(file)
        recorded = data.get("calibration", {}).get("model") if isinstance(data, dict) else None
        made_for = recorded if isinstance(recorded, str) else None
    except (ValueError, AttributeError):
        pass
    here = model_fingerprint(model_config)
    given = f"--model {model!r}" if model else "the model given"
    name = (
        f"{made_for!r} ({_describe_fingerprint(expected)})" if made_for else _describe_fingerprint(expected)
    )
    again = f"kvsqueeze calibrate --model {model}" if model else "kvsqueeze calibrate --model <this model>"
    raise ValueError(
        f"{flag}: {str(file)!r} was calibrated for another model: {name}, not {given} "
        f"({_describe_fingerprint(here)}); differs in {', '.join(diffs)}; allowed: a config calibrated for "
        f"this model ({again}), a preset, or a config file without model_fingerprint"
    )
