"""What a saved cache must agree on with the model and the cache it is loaded into.

`model_fingerprint(model)`: the fields of `config_file.model_fingerprint` (model type, layers, widths,
heads, KV heads, head_dim, vocabulary, RoPE theta), plus ``architecture`` (the model's class),
``rope`` (its full RoPE parameters: type, scaling), ``dtype`` (of its weights: the cache's exact
parts and the numbers of every later layer depend on it) and ``weights``: the SHA-256 of the first
`WEIGHT_ROWS` rows of the input embedding matrix, as float32 bytes (cheap — 64 x hidden values —
and different for any two trained or randomly initialised models; not a hash of every weight, so a
fine-tune that leaves those embedding rows unchanged is not told apart).

`differences(saved, current)` lists the fields that differ, as text for messages; `config_differences`
does the same for two cache configs (`CacheConfig.to_dict` trees), naming dotted fields.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..config_file import model_fingerprint as config_fingerprint

WEIGHT_ROWS = 64


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The fingerprint of ``model`` (a transformers model) that a saved cache records (see module)."""
    out: dict[str, Any] = {"architecture": type(model).__name__, **config_fingerprint(model.config)}
    text = model.config.get_text_config(decoder=True)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    out["rope"] = json.dumps(rope, sort_keys=True, default=str)
    params = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    out["dtype"] = None if params is None else str(params.dtype).removeprefix("torch.")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        rows = weight.detach()[:WEIGHT_ROWS].float().cpu().contiguous()
        out["weights"] = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:32]
    else:
        out["weights"] = None
    return out


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"<field> <saved> (this model: <current>)"`` for every field where the two fingerprints differ."""
    names = list(dict.fromkeys([*saved, *current]))
    return [
        f"{name} {saved.get(name)!r} (this model: {current.get(name)!r})"
        for name in names
        if saved.get(name) != current.get(name)
    ]


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``"<dotted field> <saved> (this cache: <current>)"`` for every leaf where two config dicts differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in dict.fromkeys([*saved, *current]):
            out += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if saved == current or (isinstance(saved, (list, tuple)) and list(saved) == list(current or [])):
        return []
    return [f"{prefix.rstrip('.')} {saved!r} (this cache: {current!r})"]
