"""Config files, and the model fingerprint that ties a calibrated config to the model it was made for.

A config file is JSON: an object of `CacheConfig` fields (``CacheConfig.to_dict``), or an object
holding one under ``"config"``: a calibration file written by ``kvsqueeze calibrate``
(``{"model": <fingerprint>, "config": ..., "calibration": {...}}``) or a saved result. `read_config_file` returns the
`CacheConfig` fields, and refuses, naming the file, anything else (a directory, an empty file,
malformed JSON, a JSON list or number, a calibration file without its ``"config"`` entry).

A calibrated config carries ``model_fingerprint``: the fields of the model's config that fix its
KV shape and weight family (`model_fingerprint`). `check_fingerprint` refuses such a config on
another model (a 24-layer Qwen2 calibration on the 30-layer SmolLM2). Hand-written configs have no
fingerprint; `CacheConfig.check_model` checks them by shape alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FINGERPRINT_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rope_theta",
)  # fmt: skip
CONFIG_FILE_FORMS = (
    'a JSON object of CacheConfig fields, or a file holding one under "config" '
    "(a `kvsqueeze calibrate` output)"
)
Fingerprint = tuple[tuple[str, Any], ...]


def model_fingerprint(model_config: Any) -> dict[str, Any]:
    """The fields (`FINGERPRINT_FIELDS`) of a transformers config (its text config) that identify a
    model's KV shape and weight family; a field the config lacks is None (KV heads and head_dim
    fall back to the values transformers derives: attention heads, hidden_size / heads)."""
    if not callable(getattr(model_config, "get_text_config", None)):
        raise ValueError(
            f"model_config: {type(model_config).__name__} {model_config!r:.60} is not a transformers "
            "config; allowed: a PretrainedConfig such as model.config"
        )
    text = model_config.get_text_config(decoder=True)
    out = {f: getattr(text, f, None) for f in FINGERPRINT_FIELDS}
    params = dict(getattr(text, "rope_parameters", None) or {})
    out["rope_theta"] = params.get("rope_theta", getattr(text, "rope_theta", None))
    heads, hidden = out["num_attention_heads"], out["hidden_size"]
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = heads
    if out["head_dim"] is None and isinstance(heads, int) and heads and isinstance(hidden, int):
        out["head_dim"] = hidden // heads
    return out


def as_fingerprint(value: object, field: str = "model_fingerprint") -> Fingerprint:
    """A fingerprint (dict or (field, value) pairs; None or empty: none) as (field, value) pairs in
    `FINGERPRINT_FIELDS` order; ValueError naming ``field`` for unknown fields or non-scalar values."""
    if value is None:
        return ()
    try:
        pairs = dict(value.items() if isinstance(value, dict) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"{field}: {value!r} must map model config fields to values, e.g. "
            "{'model_type': 'llama', 'num_hidden_layers': 30}"
        ) from None
    unknown = [k for k in pairs if k not in FINGERPRINT_FIELDS]
    if unknown:
        raise ValueError(f"{field}: unknown fields {unknown}; allowed: {list(FINGERPRINT_FIELDS)}")
    for name, v in pairs.items():
        if isinstance(v, bool) or not (v is None or isinstance(v, (str, int, float))):
            raise ValueError(f"{field}.{name}: {v!r} must be a string, a number or null")
    return tuple((f, pairs[f]) for f in FINGERPRINT_FIELDS if f in pairs)


def fingerprint_diffs(expected: Fingerprint, model_config: Any) -> list[str]:
    """The fields where the model differs from the fingerprint ``expected``, as readable text
    (fields None in ``expected`` are not compared); empty when it matches."""
    got = model_fingerprint(model_config) if expected else {}
    return [f"{name} {want!r} (this model: {got[name]!r})" for name, want in expected
            if want is not None and got[name] != want]  # fmt: skip


def check_fingerprint(expected: Fingerprint, model_config: Any) -> None:
    """Raise ValueError listing every field where the model differs from the fingerprint ``expected``."""
    diffs = fingerprint_diffs(expected, model_config)
    if diffs:
        raise ValueError(
            f"model_fingerprint: this config was calibrated for another model: {', '.join(diffs)}; "
            "allowed: a config calibrated for this model (kvsqueeze calibrate --model <this model>), a preset, "
            "or a config without model_fingerprint (delete the entry to apply it anyway)"
        )


def _json_kind(data: object) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if data is None else kinds.get(type(data), type(data).__name__)


def read_json(path: str | os.PathLike, label: str = "config file") -> object:
    """The JSON value of the file ``path``; ValueError naming ``label`` and the file when it is
    missing, a directory, unreadable, not UTF-8, empty or not valid JSON."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{label}: {path!r} must be the path of a JSON file")
    name, file = str(path), Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"{label}: {name!r} is a directory; allowed: {CONFIG_FILE_FORMS}")
    if not file.exists():
        raise ValueError(f"{label}: {name!r} does not exist")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"{label}: {name!r} cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{label}: {name!r} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 1]!r}); "
            f"allowed: {CONFIG_FILE_FORMS}"
        ) from None
    if not text.strip():
        raise ValueError(f"{label}: {name!r} is empty; allowed: {CONFIG_FILE_FORMS}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{label}: {name!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{label}: {name!r} is not valid JSON ({err})") from None


def read_config_file(path: str | os.PathLike, label: str = "config file") -> dict:
    """The `CacheConfig` fields held by the config file ``path`` (see module docstring), with the
    model fingerprint of a calibration file as ``model_fingerprint``: its ``"model"`` entry, or in
    older files ``calibration.model_fingerprint`` (unless the config carries its own)."""
    data = read_json(path, label)
    name = str(path)
    if not isinstance(data, dict):
        raise ValueError(f"{label}: {name!r} holds a JSON {_json_kind(data)}; allowed: {CONFIG_FILE_FORMS}")
    if "calibration" in data and "config" not in data:
        raise ValueError(
            f'{label}: {name!r} is a calibration file without its "config" entry; allowed: '
            f"{CONFIG_FILE_FORMS}"
        )
    if "config" not in data:
        return data
    config = data["config"]
    if not isinstance(config, dict):
        raise ValueError(
            f'{label}: {name!r}: its "config" entry is a JSON {_json_kind(config)}; allowed: '
            "a JSON object of CacheConfig fields"
        )
    calibration = data.get("calibration")
    if isinstance(data.get("model"), dict):  # the model the file was written for, by calibrate
        config = {**config, "model_fingerprint": data["model"]}
    elif isinstance(calibration, dict) and "model_fingerprint" not in config:  # older files
        found = calibration.get("model_fingerprint")
        config = config if found is None else {**config, "model_fingerprint": found}
    return config
