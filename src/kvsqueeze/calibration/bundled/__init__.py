"""Calibration files shipped with kvsqueeze, used by the ``best-*`` presets for the models they fit.

``kvsqueeze calibrate`` output for the embedded SmolLM2-135M (calibration slice: the last 1024
tokens of the WikiText-2 raw test file; the quality figures are measured on its first 4096). A
``best-*`` preset name given to `SqueezedCache` resolves to the bundled file when the model's
config matches the file's fingerprint (`fingerprint`), else to the generic preset in `PRESETS`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ...config import CacheConfig

HERE = Path(__file__).resolve().parent
FINGERPRINT_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size",
)  # fmt: skip


def fingerprint(model_config: Any) -> dict:
    """The fields of a (text) config that identify a model's KV shape and weights family."""
    text = model_config.get_text_config(decoder=True)
    out = {f: getattr(text, f, None) for f in FINGERPRINT_FIELDS}
    params = dict(getattr(text, "rope_parameters", None) or {})
    out["rope_theta"] = params.get("rope_theta", getattr(text, "rope_theta", None))
    return out


@functools.cache
def _files() -> tuple[tuple[str, str, dict], ...]:
    rows = []
    for path in sorted(HERE.glob("*.json")):
        data = json.loads(path.read_text())
        cal = data["calibration"]
        rows.append((cal["preset"], str(path), cal["model_fingerprint"]))
    return tuple(rows)


def bundled_config(name: str, model_config: Any) -> CacheConfig | None:
    """The bundled calibrated config for preset ``name`` and this model, or None."""
    fp = fingerprint(model_config)
    for preset, path, want in _files():
        if preset == name and want == fp:
            return CacheConfig.load(path)
    return None
