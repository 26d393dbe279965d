"""`SqueezedCache`: a transformers `Cache` whose full-attention layers store packed K/V.

Only this package imports transformers. Sliding-window (and chunked) attention layers stay
exact and windowed (transformers' own `DynamicSlidingWindowLayer`): they hold at most one
window of tokens, so quantizing them saves little; `memory_report` lists their bytes apart.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from ..attention.packed_view import packed_views
from ..attention.parts import mixed_snapshot, snapshot
from ..attention.reference import Workspace, materialize
from ..config import CacheConfig, resolve_config
from ..storage.layer import LayerStore
from ..storage.mixed import MixedLayerStore
from ..storage.transform import PageTransform, layer_transforms
from .memory import MemoryReport, layer_nbytes
from .rope import rope_for

FULL_ATTENTION = "full_attention"
FUSED_ATTENTION = "kvsqueeze"
EXACT_LAYER_TYPES = ("sliding_attention", "chunked_attention", "dummy")


def check_context(total: int, max_tokens: int | None) -> None:
    """Raise ValueError when ``total`` tokens exceed the model's context ``max_tokens`` (None: no limit)."""
    if max_tokens is not None and total > max_tokens:
        raise ValueError(
            f"sequence length: {total} tokens exceed the model's context of {max_tokens} "
            f"(max_position_embeddings); shorten the prompt or the number of new tokens"
        )


CROP_ERROR = (
    "crop: SqueezedCache cannot roll back tokens (assisted/speculative decoding), "
    "not even with preset 'none'; use transformers' DynamicCache for that feature"
)


class SqueezedLayer(CacheLayerMixin):
    """One full-attention layer: exact sinks, packed history, exact residual window.

    `update` returns keys and values of shape (batch, kv_heads, tokens, head_dim) for this layer's
    attention. Reference path: full-precision tensors, the history dequantized into a workspace
    shared by all layers, the new tokens exact. Fused path (``fused=True``, for
    ``attn_implementation="kvsqueeze"``): `PackedKV` views of the stored parts, read in place by
    the kvsqueeze attention (dequantized on demand by any other operation). It then stores the new
    tokens; tokens that leave the residual window are quantized once, in whole blocks.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        config: CacheConfig,
        workspace: Workspace,
        max_tokens: int | None = None,
        fused: bool = False,
        transforms: tuple[PageTransform | None, PageTransform | None] = (None, None),
    ) -> None:
        super().__init__()
        self.config = config
        self.workspace = workspace
        self.max_tokens = max_tokens
        self.fused = fused
        # token policies and transforms do not combine (CacheConfig rejects it)
        self.store = LayerStore(config, *transforms) if config.tokens is None else MixedLayerStore(config)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend-to keys and values (batch, kv_heads, held + n, head_dim) for new states (…, n, …)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_context(self.get_seq_length() + key_states.shape[-2], self.max_tokens)
        if isinstance(self.store, MixedLayerStore):
            return self._update_mixed(key_states, value_states)
        if self.fused:
            parts = snapshot(self.store, key_states, value_states, self.workspace)
            self.store.append(key_states, value_states)
            return packed_views(parts)
        keys, values = materialize(self.store, key_states, value_states, self.workspace)
        self.store.append(key_states, value_states)
        return keys, values

    def _update_mixed(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-policy layer: read the held classes plus the new tokens, stash the new tokens; they
        are scored and settled once the attention has read them (`AttentionParts.finish`, called by
        the kvsqueeze attention; right here on the reference path)."""
        self.store.settle()  # no-op unless an attention other than kvsqueeze read the last views
        parts = mixed_snapshot(self.store, key, value, self.workspace)
        self.store.stash(key, value)
        if self.fused:
            return packed_views(parts)
        keys, values = parts.dense(0), parts.dense(1)
        self.store.settle()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the held tokens are presented as the most recent positions, so the
        causal mask stays right when tokens were evicted (as transformers' sliding-window layers do)."""
        held = self.store.num_tokens
        return held + query_length, self.get_seq_length() - held

    def get_seq_length(self) -> int:
        """Tokens seen so far (positions); more than the tokens held once some were evicted."""
        return getattr(self.store, "num_seen", self.store.num_tokens)

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def reset(self) -> None:
        self.store.clear()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store.map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Only ``crop(0)`` (a no-op here): packed tokens cannot be rolled back."""
        if tokens_to_remove != 0:
            raise NotImplementedError(CROP_ERROR)

    def offload(self) -> None:
        raise NotImplementedError("offload: SqueezedCache does not offload layers yet")

    prefetch = offload


class SqueezedCache(Cache):
    """A transformers `Cache` that keeps K/V packed in 2–8 bits (see `CacheConfig`).

    Build it for a model with `SqueezedCache.from_model(model, "k4v2")` and pass it as
    ``past_key_values`` to ``model.generate`` or ``model(...)``.

    ``fused`` selects the read path of the layers: the fused path (packed history read in place by
    ``attn_implementation="kvsqueeze"``) or the reference path. None (default) follows the model:
    fused when its config's attention implementation is ``"kvsqueeze"``. Configs the native kernels
    cannot read (codebooks, outliers, rotations, pre-RoPE keys: ``CacheConfig.kernel_readable``)
    always take the reference path (a warning says so when ``fused=True`` was asked for).

    A ``best-*`` preset name resolves to a bundled per-layer calibration when one matches the model
    (`calibration.bundled`; the embedded SmolLM2-135M has one), else to the generic preset.

    ``pre_rope_keys`` needs a model with standard RoPE (`integrations.rope.rope_for`); elsewhere
    the cache warns and keeps post-RoPE keys.
    """

    def __init__(
        self,
        config: str | CacheConfig | dict,
        model_config: Any,
        fused: bool | None = None,
    ) -> None:
        if isinstance(config, str):  # best-* presets: the bundled calibration when it fits this model
            from ..calibration.bundled import bundled_config

            config = bundled_config(config, model_config) or config
        self.cache_config = resolve_config(config)
        text_config = model_config.get_text_config(decoder=True)
        asked = fused
        if fused is None:
            fused = getattr(text_config, "_attn_implementation", None) == FUSED_ATTENTION
        if fused and not self.cache_config.kernel_readable:
            if asked:
                warnings.warn(
                    "fused: this config (codebook/outlier formats, rotation or pre-RoPE keys) is read by the "
                    "reference path only; using it",
                    stacklevel=2,
                )
            fused = False
        self.fused = fused
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = (
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        )
        self.cache_config.check_model(num_kv_heads, head_dim, text_config.num_hidden_layers)
        model_fused = getattr(text_config, "_attn_implementation", None) == FUSED_ATTENTION
        if self.cache_config.needs_attention and not (fused and model_fused):
            raise ValueError(
                "tokens.scorer: 'attention' needs the fused read path (the kvsqueeze attention sees the "
                "queries); load the model with attn_implementation='kvsqueeze' (fused stays None or True); "
                "allowed on the reference path: scorer 'knorm' or 'none'"
            )
        self.rope = None
        if self.cache_config.pre_rope_keys:
            self.rope, why = rope_for(text_config, head_dim)
            if self.rope is None:
                warnings.warn(f"pre_rope_keys: falling back to post-RoPE keys: {why}", stacklevel=2)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.workspace = Workspace()
        self.max_tokens = max_tokens = getattr(text_config, "max_position_embeddings", None)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers: list[CacheLayerMixin] = []
        for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if layer_type == FULL_ATTENTION:
                layer_config = self.cache_config.for_layer(index)
                transforms = layer_transforms(layer_config, head_dim, self.rope)
                layers.append(SqueezedLayer(layer_config, self.workspace, max_tokens, fused, transforms))
            elif layer_type in EXACT_LAYER_TYPES:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
            else:
                raise ValueError(
                    f"layer_types[{index}]: {layer_type!r} is not supported by SqueezedCache; "
                    f"allowed: {[FULL_ATTENTION, *EXACT_LAYER_TYPES]}"
                )
        super().__init__(layers=layers)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the model's context before any layer stores the new tokens, then update ``layer_idx``.

        Checking here (not only in `SqueezedLayer`) keeps every layer's length unchanged when the
        check fails, exact sliding-window layers of hybrid models included.
        """
        layer = self.layers[layer_idx]
        if key_states is not None and hasattr(layer, "get_seq_length"):
            check_context(layer.get_seq_length() + key_states.shape[-2], self.max_tokens)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(0)`` shrinks the exact sliding layers back to their window (as transformers does);
        any real rollback raises NotImplementedError before touching any layer."""
        if tokens_to_remove != 0 and any(isinstance(layer, SqueezedLayer) for layer in self.layers):
            raise NotImplementedError(CROP_ERROR)
        super().crop(tokens_to_remove)

    @classmethod
    def from_model(
        cls, model: Any, config: str | CacheConfig | dict = "k4v2", fused: bool | None = None
    ) -> SqueezedCache:
        """A cache for ``model`` (any transformers causal LM) from a preset name or a config.

        With a model whose attention implementation is ``"kvsqueeze"`` (and ``fused`` None or True)
        the layers take the fused path; the attention is registered first if it is not yet.
        """
        cache = cls(config, model.config, fused)
        cache.warn_if_unsafe(model)
        if cache.fused:
            from .attention import register

            register()
        return cache

    def set_roles(self, roles: torch.Tensor) -> None:
        """Token roles (batch, tokens) int (`kvsqueeze.policies.Role`) of the prompt, before the
        prefill: position i of every sequence gets ``roles[:, i]``; later tokens are text. See
        `kvsqueeze.policies.roles_from_ids` (image/video/audio ids of a model) and `mark_spans`."""
        if self.cache_config.tokens is None:
            raise ValueError("roles: this cache has no token policy (CacheConfig.tokens is None)")
        if roles.dim() != 2:
            raise ValueError(f"roles: shape {tuple(roles.shape)}; allowed: (batch, tokens)")
        for layer in self.layers:
            if isinstance(layer, SqueezedLayer):
                if layer.get_seq_length():
                    raise ValueError("roles: set them before the prefill (this cache already holds tokens)")
                layer.store.roles = roles.to(torch.int8)

    def warn_if_unsafe(self, model: Any) -> list[str]:
        """Warn (and return the reasons) when the config is predicted to turn this model's keys or
        values into noise (`calibration.risk`, from the weights; ``kvsqueeze inspect`` measures it)."""
        from ..calibration.risk import check_config, profiles_from_weights

        if self.cache_config.is_exact:
            return []
        profiles = profiles_from_weights(model)
        inv_freq = None
        if not self.cache_config.pre_rope_keys or self.rope is None:
            rope, _ = rope_for(model.config.get_text_config(decoder=True), self.head_dim)
            inv_freq = None if rope is None else rope.inv_freq
        problems = check_config(profiles, self.cache_config, inv_freq)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
            warnings.warn(
                f"this cache config is predicted UNSAFE for this model ({shown}); run `kvsqueeze inspect "
                "--model ...` and pick its predicted safe configuration",
                stacklevel=3,
            )
        return problems

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (codes, scales, zero points, sinks, residual,
        exact sliding-window layers). The reference path's scratch is reported apart."""
        return sum(layer_nbytes(layer) for layer in self.layers)

    def memory_report(self) -> MemoryReport:
        """Bytes by part, tokens held, bytes per token and the ratio to an fp16 cache."""
        return MemoryReport.from_cache(self)
