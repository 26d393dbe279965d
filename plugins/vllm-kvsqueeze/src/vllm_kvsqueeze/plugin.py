"""The ``vllm.general_plugins`` entry point: `register`, called by vLLM in every process it starts.

What it registers today (a skeleton; see ``docs/vllm_plugin.md`` in the kvsqueeze repository):

- one ``--kv-cache-dtype`` per mappable kvsqueeze preset, ``kvsqueeze_<preset>`` (e.g.
  ``kvsqueeze_k4v4``), through vLLM's ``vllm.config.kv_cache_dtype.register_kv_cache_dtype`` when the
  installed vLLM has it: stored as uint8 pages of `layout.PageLayout`, quantized, dispatched by the
  backend (``KVQuantMode.BACKEND`` where it exists);
- no attention backend: the kernel that reads these pages is not written (it needs a GPU to be
  validated), so every handler reports ``supports_platform() == False`` and vLLM refuses the dtype
  with its own message instead of running a cache nobody reads.

Registration is idempotent (vLLM may load plugins more than once per process) and never fails vLLM's
start: a vLLM without the hook gets nothing registered and a warning naming the missing hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("vllm_kvsqueeze")
DTYPE_PREFIX = "kvsqueeze_"
DTYPE_HOOK = "vllm.config.kv_cache_dtype"
NO_BACKEND = (
    "the kvsqueeze attention backend is not implemented yet (GPU validation pending; see "
    "docs/vllm_plugin.md), so no platform supports this KV cache dtype"
)


@dataclass(frozen=True)
class Registration:
    """What `register` did: the ``--kv-cache-dtype`` names registered (this call or an earlier one),
    and the vLLM hooks it looked for and did not find."""

    dtypes: tuple[str, ...]
    missing_hooks: tuple[str, ...] = ()
    attention_backend: bool = False


def mappable_presets() -> dict[str, object]:
    """kvsqueeze presets one page format expresses (packed keys and values, same on every layer, no
    transform, plain integer or FP8 codes the fused kernels read): name -> CacheConfig."""
    from kvsqueeze.config import PRESETS

    def plain(spec: object) -> bool:  # integer or FP8 codes, no codebook, no outlier side store
        return spec is not None and not spec.is_codebook and not spec.has_outliers

    return {
        name: config
        for name, config in PRESETS.items()
        if plain(config.key)
        and plain(config.value)
        and not (config.rotate_keys or config.rotate_values or config.pre_rope_keys)
        and config.tokens is None
        and not config.layer_overrides
    }


def dtype_name(preset: str) -> str:
    return DTYPE_PREFIX + preset.replace("-", "_")


def handler_class(name: str, preset: str, quant_mode: object) -> type:
    """A ``KVCacheDTypeHandler`` for ``name`` (uint8 pages, quantized, self-dispatched, no platform)."""

    class KVSqueezeDTypeHandler:
        __doc__ = f"--kv-cache-dtype {name}: kvsqueeze preset {preset!r} in vLLM pages (layout.PageLayout)."

        def torch_dtype(self):
            import torch

            return torch.uint8

        def is_quantized(self) -> bool:
            return True

        def quant_mode(self):
            return quant_mode

        def supports_platform(self, platform: object) -> bool:
            log.warning("%s: %s", name, NO_BACKEND)
            return False

    KVSqueezeDTypeHandler.name = name
    KVSqueezeDTypeHandler.preset = preset
    KVSqueezeDTypeHandler.__qualname__ = KVSqueezeDTypeHandler.__name__ = f"KVSqueezeDTypeHandler_{preset}"
    return KVSqueezeDTypeHandler


def register() -> Registration:
    """Register kvsqueeze's KV cache dtypes with the running vLLM (see the module docstring). Raises
    RuntimeError when vLLM is not installed (this is a vLLM plugin)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("vllm-kvsqueeze is a vLLM plugin: install vllm first (pip install vllm)") from None
    try:
        from vllm.config.kv_cache_dtype import get_kv_cache_dtype_handler, register_kv_cache_dtype
        from vllm.v1.kv_cache_interface import KVQuantMode
    except ImportError as err:
        log.warning(
            "vllm-kvsqueeze: this vLLM has no %s hook (%s); no KV cache dtype registered", DTYPE_HOOK, err
        )
        return Registration((), (f"{DTYPE_HOOK}.register_kv_cache_dtype",))
    mode = getattr(KVQuantMode, "BACKEND", KVQuantMode.NONE)
    names = []
    for preset in mappable_presets():
        name = dtype_name(preset)
        held = get_kv_cache_dtype_handler(name)
        if held is None or getattr(held, "preset", None) != preset:
            register_kv_cache_dtype(name)(handler_class(name, preset, mode))
        names.append(name)
    log.info("vllm-kvsqueeze: registered --kv-cache-dtype %s (%s)", ", ".join(names), NO_BACKEND)
    return Registration(tuple(names))
