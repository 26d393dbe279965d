"""kvsqueeze: quantized, packed key/value caches for Hugging Face transformers.

    from kvsqueeze import SqueezedCache, load_model
    model, tokenizer = load_model("smollm2-135m")
    cache = SqueezedCache.from_model(model, "k4v2")
    model.generate(**inputs, cache=cache)

Fused read path (attention computed on the packed codes):

    model, tokenizer = load_model("smollm2-135m", attn_implementation="kvsqueeze")
    cache = SqueezedCache.from_model(model, "k4v4")  # follows the model: fused

Importing kvsqueeze changes nothing in transformers; transformers itself is imported lazily, and
``attn_implementation="kvsqueeze"`` exists only after `register()` (called by the two lines above).
"""

from __future__ import annotations

from typing import Any

from .config import PRESETS, CacheConfig, QuantSpec, preset

__all__ = [
    "PRESETS", "CacheConfig", "KVPool", "QuantSpec", "SqueezedCache", "load_model", "preset", "register",
    "use_fused_attention",
]  # fmt: skip
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "SqueezedCache":
        from .integrations.cache import SqueezedCache

        return SqueezedCache
    if name == "KVPool":
        from .storage.prefix_cache import KVPool

        return KVPool
    if name == "register":
        from .integrations.attention import register

        return register
    if name == "use_fused_attention":
        from .integrations.attention import use_fused_attention

        return use_fused_attention
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'kvsqueeze' has no attribute {name!r}")
