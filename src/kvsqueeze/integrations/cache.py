"""`SqueezedCache`: a transformers `Cache` whose full-attention layers store packed K/V.

Only this package imports transformers. Sliding-window (and chunked) attention layers stay
exact and windowed (transformers' own `DynamicSlidingWindowLayer`): they hold at most one
window of tokens, so quantizing them saves little; `memory_report` lists their bytes apart.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from ..attention.packed_view import packed_views
from ..attention.parts import dense_parts, snapshot
from ..attention.reference import Workspace, materialize
from ..config import CacheConfig, resolve_config
from ..storage.block_pool import BlockPool
from ..storage.layer import LayerStore
from ..storage.prefix_cache import KVPool
from ..storage.row_sinks import first_real_columns
from ..storage.transform import PageTransform, layer_transforms
from .context import ContextLimit, context_limit
from .memory import MemoryReport, layer_nbytes
from .prefix import match_prefix, note_tokens, prefix_digest, publish, release_blocks
from .rope import rope_for

FULL_ATTENTION = "full_attention"
FUSED_ATTENTION = "kvsqueeze"
EXACT_LAYER_TYPES = ("sliding_attention", "chunked_attention", "dummy")


ROLLBACK_ERROR = (
    "assisted/speculative decoding: a token-policy cache (CacheConfig.tokens: importance-placed or "
    "evicted tokens) cannot roll back rejected tokens; use a preset without a token policy "
    "(e.g. k4v4, int8, best-3bit) or transformers' DynamicCache"
)


LEFT_PADDING_ERROR = (
    "attention_mask: a left-padded batch with a token-policy cache (CacheConfig.tokens) is not supported "
    "(its classes would place padding as tokens); run the rows one by one, or use a preset without a "
    "token policy (its sinks are each row's first real tokens)"
)


def _left_padded(position_ids: torch.Tensor | None, seen: int, batch: int) -> bool:
    """Whether some row of ``position_ids`` (batch, n) starts after the first column (left padding)."""
    found = first_real_columns(position_ids, batch)
    return found is not None and bool((found[0] & (found[1] + seen > 0)).any())


@dataclass
class ForwardShape:
    """What the model's forward pre-hook (`SqueezedCache.from_model`) saw of the current forward:
    ``tokens`` new tokens, of which the first ``chunk`` are read as one chunk (a prompt) and the rest
    one by one (drafts under verification): transformers asks for the logits of the last
    ``logits_to_keep`` tokens, which it then compares with the drafts."""

    tokens: int | None = None
    chunk: int | None = None
    # each row's first real column, from the forward's 2-D attention mask (batch, held + tokens): the
    # first 1 of the row (the mask's width when the row is all padding so far); None without such a mask
    row_starts: torch.Tensor | None = None
    mask_width: int | None = None

    def chunk_for(self, tokens: int, held: int) -> int:
        """The chunk of a forward of ``tokens`` new tokens over ``held`` stored ones: as noted by the
        hook, else every token of the first forward (a prompt) and one token of later ones."""
        if self.tokens == tokens and self.chunk is not None:
            return self.chunk
        return tokens if held == 0 else 1


def _note_forward(module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: note the `ForwardShape` of a forward that uses a `SqueezedCache`. Raises
    ValueError for a forward without new tokens over a non-empty cache (a cache reused without
    `reset` for a prompt no longer than what it holds: the model would fail on an empty tensor)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, SqueezedCache):
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    tokens = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
    if tokens == 0 and cache.get_seq_length():
        raise ValueError(
            f"input_ids: no new tokens for a cache that already holds {cache.get_seq_length()}: generate "
            "treats the cached tokens as the start of the prompt, and this prompt is not longer than them; "
            "call cache.reset() before reusing the cache for another prompt (or pass a new cache)"
        )
    if cache.token_ids is not None:
        note_tokens(cache, kwargs.get("input_ids", args[0] if args else None))
    keep = kwargs.get("logits_to_keep")
    known = tokens is not None and isinstance(keep, int) and 0 < keep <= tokens
    cache.forward_shape.tokens = tokens
    cache.forward_shape.chunk = tokens - keep + 1 if known else None
    mask = kwargs.get("attention_mask")
    starts = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
        real = mask != 0
        width = real.shape[1]
        starts = torch.where(
            real.any(1), real.int().argmax(1), torch.full_like(real[:, 0], width, dtype=torch.long)
        )
    cache.forward_shape.row_starts = starts
    cache.forward_shape.mask_width = mask.shape[1] if starts is not None else None


def _after_forward(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook: drop the forward's row starts (the layers keep their own copies; the cache
    holds nothing `nbytes` does not count); a cache on a shared pool publishes its new full blocks
    (`integrations.prefix`)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, SqueezedCache):
        return
    cache.forward_shape.row_starts = cache.forward_shape.mask_width = None
    if cache.token_ids is not None:
        publish(cache)


class SqueezedLayer(CacheLayerMixin):
    """One full-attention layer: exact sinks, placed tokens (a packed history, or a token policy's
    classes), exact residual window, all in one `LayerStore`.

    `update` returns keys and values of shape (batch, kv_heads, tokens, head_dim) for this layer's
    attention. Reference path: full-precision tensors, the history dequantized into a workspace
    shared by all layers, the new tokens exact. Fused path (``fused=True``, for
    ``attn_implementation="kvsqueeze"``): `PackedKV` views of the stored parts, read in place by
    the kvsqueeze attention (dequantized on demand by any other operation). It then stores the new
    tokens; tokens that leave the residual window are quantized once, in whole blocks.
    """

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        config: CacheConfig,
        workspace: Workspace,
        context: ContextLimit | None = None,
        fused: bool = False,
        transforms: tuple[PageTransform | None, PageTransform | None] = (None, None),
        name: str = "layer",
        forward_shape: ForwardShape | None = None,
        pools: tuple[BlockPool, BlockPool] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.workspace = workspace
        self.forward_shape = forward_shape or ForwardShape()
        self.context = context or ContextLimit(None, "no limit given")
        self.fused = fused
        self.store = LayerStore(config, *transforms, name=name, pools=pools)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # exact parts in 16 bits for a float32 model that quantizes or evicts (CacheConfig.exact_dtype)
        self.store.set_exact_dtype(self.store.exact_dtype_for(self.dtype))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend-to keys and values (batch, kv_heads, held + n, head_dim) for new states (…, n, …)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.context.check(self.get_seq_length() + key_states.shape[-2])
        position_ids = (kwargs.get("kwargs") or kwargs).get("position_ids")
        batch = key_states.shape[0]
        starts = self.forward_shape.row_starts
        if not (
            starts is not None
            and starts.shape[0] == batch
            and self.get_seq_length() + key_states.shape[-2] == self.forward_shape.mask_width
        ):
            starts = None  # no 2-D mask over every column of this forward
        if not self.store.positional and (
            _left_padded(position_ids, self.get_seq_length(), batch)
            or (starts is not None and bool((starts > 0).any()))
        ):
            raise ValueError(LEFT_PADDING_ERROR)
        if starts is not None and self.store.positional:
            # the mask says it exactly
            self.store.row_sinks.set_starts(starts.to(key_states.device), self.get_seq_length())
        else:
            self.store.observe_positions(position_ids, batch)
        # tokens of the last step are accepted (no crop came), or were read by an attention other than
        # kvsqueeze's (no `AttentionParts.finish`): place them first
        self.store.settle()
        drafts = None
        if self.store.record_past and key_states.shape[-2] > 1:  # assisted decoding: a verification
            chunk = self.forward_shape.chunk_for(key_states.shape[-2], self.store.num_tokens)
            drafts = self.store.draft_reads(key_states, value_states, chunk)
        if self.fused:  # the kvsqueeze attention reads the parts, then commits the step (finish)
            parts = snapshot(self.store, key_states, value_states, self.workspace, drafts)
            self.store.append(key_states, value_states)
            return packed_views(parts)
        keys, values = materialize(self.store, key_states, value_states, self.workspace)
        self.store.append(key_states, value_states)
        self.store.commit()  # no queries here: a token policy places its new tokens now
        if drafts is not None:  # read densely by the kvsqueeze attention, which shows each query its copy
            return packed_views(dense_parts(keys, values, key_states.shape[-2], self.workspace, drafts))
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the held tokens are presented as the most recent positions, so the
        causal mask stays right when tokens were evicted (as transformers' sliding-window layers do)."""
        held = self.store.num_tokens
        return held + query_length, self.get_seq_length() - held

    def get_seq_length(self) -> int:
        """Tokens seen so far (positions); more than the tokens held once some were evicted."""
        return self.store.num_seen

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

    @property
    def is_croppable(self) -> bool:
        """True: `crop` rolls back exactly (after `activate_past_recording`); token policies cannot."""
        return self.store.positional

    def activate_past_recording(self) -> None:
        """Keep new tokens exact and pending until the next step or `crop` accepts them, so that
        rejected draft tokens never reach a packed block (transformers calls this before assisted
        decoding). Raises ValueError for token-policy layers, which cannot roll back."""
        if not self.store.positional:
            raise ValueError(ROLLBACK_ERROR)
        self.store.record_past = True

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise ValueError when ``crop(tokens_to_remove)`` cannot roll back exactly (nothing changes)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop: {tokens_to_remove}; allowed: a negative number of newest tokens to remove, or 0"
            )
        if tokens_to_remove and not self.store.positional:
            raise ValueError(ROLLBACK_ERROR)
        self.store.check_crop(-tokens_to_remove)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the ``-tokens_to_remove`` newest tokens (transformers' convention: a negative count),
        leaving the state of a cache that never saw them; ``crop(0)`` accepts the pending tokens.
        Raises ValueError when the tokens cannot be rolled back exactly (see `LayerStore.crop`)."""
        self.check_crop(tokens_to_remove)
        if self.store.positional:
            self.store.crop(-tokens_to_remove)

    def offload(self) -> None:
        raise NotImplementedError("offload: SqueezedCache does not offload layers yet")

    prefetch = offload


class SqueezedCache(Cache):
    """A transformers `Cache` that keeps K/V packed in 2–8 bits (see `CacheConfig`).

    Build it for a model with `SqueezedCache.from_model(model, "k4v2")` and pass it as
    ``cache`` to ``model.generate`` or ``model(...)``.

    ``fused`` selects the read path of the layers: the fused path (packed history read in place by
    ``attn_implementation="kvsqueeze"``) or the reference path. None (default) follows the model:
    fused when its config's attention implementation is ``"kvsqueeze"``. The native kernels read
    every config (``CacheConfig.kernel_readable``: codebooks, outliers, rotations and pre-RoPE keys
    included since issue 16).

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
        pool: KVPool | None = None,
    ) -> None:
        if pool is not None and not isinstance(pool, KVPool):
            raise ValueError(
                f"pool: {type(pool).__name__}; allowed: None (pools of its own) or a kvsqueeze.KVPool"
            )
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused: {fused!r}; allowed: None (follow the model), True or False")
        text_config = model_config.get_text_config(decoder=True)
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = (
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        )
        self.cache_config = self.resolve(config, model_config)
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
        self.cache_config.check_model(
            num_kv_heads, head_dim, text_config.num_hidden_layers, model_config=model_config
        )
        # the engine's ragged attention ("kvsqueeze_ragged") reads through the kvsqueeze attention too
        model_fused = getattr(text_config, "_attn_implementation", None) in (
            FUSED_ATTENTION,
            "kvsqueeze_ragged",
        )
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
        self.forward_shape = ForwardShape()
        self.context = context_limit(text_config)
        if pool is not None:
            pool.bind(
                num_hidden_layers=text_config.num_hidden_layers, num_kv_heads=num_kv_heads, head_dim=head_dim
            )
        self.kv_pool = pool
        self.prefix_digest = prefix_digest(self.cache_config, model_config)
        self.token_ids: list[int] | None = [] if pool is not None else None  # followed for prefix sharing
        self.published, self.last_hash = 0, None
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers: list[CacheLayerMixin] = []
        for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if layer_type == FULL_ATTENTION:
                layer_config = self.cache_config.for_layer(index)
                transforms = layer_transforms(layer_config, head_dim, self.rope)
                pools = None
                if pool is not None and layer_config.tokens is None:
                    slab = max(1, layer_config.page_tokens // layer_config.block_size)
                    pools = tuple(
                        pool.pool((index, kind, spec, layer_config.block_size), slab, f"layer {index} {kind}")
                        for kind, spec in (("keys", layer_config.key), ("values", layer_config.value))
                    )
                layers.append(
                    SqueezedLayer(
                        layer_config,
                        self.workspace,
                        self.context,
                        fused,
                        transforms,
                        f"layer {index}",
                        self.forward_shape,
                        pools,
                    )
                )
            elif layer_type in EXACT_LAYER_TYPES:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
            else:
                raise ValueError(
                    f"layer_types[{index}]: {layer_type!r} is not supported by SqueezedCache; "
                    f"allowed: {[FULL_ATTENTION, *EXACT_LAYER_TYPES]}"
                )
        super().__init__(layers=layers)
        if pool is not None:  # a cache dropped without reset() gives its blocks back
            stores = [x.store for x in layers if isinstance(x, SqueezedLayer) and x.store.positional]
            weakref.finalize(self, release_blocks, stores)
        self._first_squeezed = next((i for i, x in enumerate(layers) if isinstance(x, SqueezedLayer)), -1)

    @staticmethod
    def resolve(config: str | CacheConfig | dict, model_config: Any) -> CacheConfig:
        """The `CacheConfig` a cache for ``model_config`` (a transformers config) builds from ``config``:
        a ``best-*`` preset name becomes the bundled calibration when one fits the model, preset names
        are fitted to its head_dim (`resolve_config`); a `CacheConfig` is returned as it is."""
        if isinstance(config, str):  # best-* presets: the bundled calibration when it fits this model
            from ..calibration.bundled import bundled_config

            config = bundled_config(config, model_config) or config
        text_config = model_config.get_text_config(decoder=True)
        head_dim = (
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        )
        return resolve_config(config, head_dim=head_dim)  # preset names fit head_dim

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the call, then update ``layer_idx`` with ``key_states``, ``value_states`` (batch,
        kv_heads, n, head_dim).

        Raises ValueError (nothing stored) for: ``layer_idx`` outside the model's layers; keys or
        values whose shape is not the model's (kv_heads, head_dim) or whose batch differs from the
        held tokens' (use `reset`, `batch_select_indices` or `reorder_cache`); position ids that
        start before the held tokens end (a cache reused for a new prompt without `reset`); more
        tokens than the model's context; non-finite keys or values for a quantizing layer (NaN or
        inf would spread to every token of its quantization group: the model produced them, e.g.
        an fp16 overflow). Checking here keeps every layer's length unchanged when a check fails,
        exact sliding-window layers of hybrid models included.
        """
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"layer_idx: {layer_idx!r}; allowed: 0 to {len(self.layers) - 1} (the model's layers)"
            )
        layer = self.layers[layer_idx]
        if key_states is not None and isinstance(layer, SqueezedLayer):
            self._check_states(layer, layer_idx, key_states, value_states, kwargs)
        if key_states is not None and hasattr(layer, "get_seq_length"):
            self.context.check(layer.get_seq_length() + key_states.shape[-2])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_states(
        self, layer: SqueezedLayer, index: int, key: torch.Tensor, value: torch.Tensor, kwargs: dict
    ) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        for name, x in (("key_states", key), ("value_states", value)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"update: {name} is {kind}; allowed: a floating-point torch.Tensor")
        if key.dtype != value.dtype or (layer.is_initialized and key.dtype != layer.dtype):
            held = f", layer {index} holds {layer.dtype}" if layer.is_initialized else ""
            raise ValueError(
                f"update: key_states {key.dtype} and value_states {value.dtype}{held}; allowed: one dtype for the "
                "whole cache (build a new cache for a model of another dtype)"
            )
        for name, x in (("key_states", key), ("value_states", value)):
            if x.dim() != 4 or (x.shape[1], x.shape[3]) != expected:
                raise ValueError(
                    f"update: {name} of shape {tuple(x.shape)} for layer {index}; allowed: (batch, "
                    f"{expected[0]}, tokens, {expected[1]}) — this cache was built for a model with "
                    f"{expected[0]} KV heads of head_dim {expected[1]}; build one per model"
                )
        if value.shape[:3] != key.shape[:3]:
            raise ValueError(
                f"update: value_states {tuple(value.shape)} do not match key_states {tuple(key.shape)}"
            )
        held_batch = layer.store.batch_size if layer.get_seq_length() else 0
        if held_batch and key.shape[0] != held_batch:
            raise ValueError(
                f"update: batch size {key.shape[0]} for layer {index}, which holds {held_batch} sequences; "
                "allowed: the same batch (call cache.reset() for new sequences, or batch_select_indices / "
                "reorder_cache to change the batch)"
            )
        seen = layer.get_seq_length()
        position_ids = (kwargs.get("kwargs") or kwargs).get("position_ids")
        if seen and index == self._first_squeezed and position_ids is not None and position_ids.dim() == 2:
            # the longest row's next position: columns held less its left padding (every row of a batch
            # padded to a fixed length is padded; while every row is still padding, which a new prompt
            # also looks like, position 0 says nothing)
            starts = layer.store.row_sinks.starts
            least = 0 if starts is None else int(starts.min())
            start = int(position_ids[:, 0].max())
            seen = seen - least if start or not least else 0
            if start < seen and layer.store.record_past:
                raise ValueError(
                    f"assisted decoding on a cache that already holds {seen} tokens: transformers numbers the new "
                    f"tokens from position {start} (its own DynamicCache then departs from plain greedy decoding); "
                    "start assisted decoding from an empty cache (a new cache, or cache.reset()) with the whole "
                    "conversation as the prompt, or continue this cache without an assistant"
                )
            if start < seen:
                raise ValueError(
                    f"position_ids: the new tokens start at position {start}, but this cache already holds "
                    f"{seen} tokens; call cache.reset() before reusing it for another prompt"
                )
        if not layer.config.is_exact and not bool(torch.isfinite(key).all() and torch.isfinite(value).all()):
            bad = int((~torch.isfinite(key)).sum() + (~torch.isfinite(value)).sum())
            raise ValueError(
                f"update: {bad} non-finite (NaN/inf) values in the new keys/values of layer {index}; "
                "allowed: finite values — quantizing them would spread NaN to every token of their group. "
                "The model produced them (e.g. an fp16 overflow: load it in bfloat16 or float32), or use "
                "preset 'none'"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the ``-tokens_to_remove`` newest tokens of every layer (assisted decoding), exactly:
        the cache is then as if it had never seen them. Checked for every layer before any changes,
        so a refusal (ValueError) leaves the cache whole."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise ValueError(
                f"crop: {tokens_to_remove!r}; allowed: an int, a negative number of newest tokens to remove, or 0"
            )
        for layer in self.layers:
            if isinstance(layer, SqueezedLayer):
                layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)
        if self.token_ids is not None and tokens_to_remove < 0:
            del self.token_ids[tokens_to_remove:]

    @classmethod
    def from_model(
        cls,
        model: Any,
        config: str | CacheConfig | dict = "k4v2",
        fused: bool | None = None,
        pool: KVPool | None = None,
        *,
        risk_check: bool = True,
    ) -> SqueezedCache:
        """A cache for ``model`` (any transformers causal LM) from a preset name or a config.

        ``risk_check``: warn when the config is predicted unsafe for the model (`warn_if_unsafe`, a
        simulation over the weights; False skips it, e.g. for a cache loaded from a file whose config
        was checked when it was made).

        With a model whose attention implementation is ``"kvsqueeze"`` (and ``fused`` None or True)
        the layers take the fused path; the attention is registered first if it is not yet.

        Assisted decoding (``assistant_model=…``, ``prompt_lookup_num_tokens=…``) then gives the
        tokens of plain greedy decoding with this cache when the model's attention is ``"kvsqueeze"``:
        a forward pre-hook on ``model`` (added once) tells the cache which new tokens of a forward are
        drafts, and each draft reads what plain decoding would have read (`LayerStore.draft_reads`).
        """
        if getattr(model, "config", None) is None or not hasattr(model.config, "get_text_config"):
            raise ValueError(
                f"model: {type(model).__name__} is not a transformers model (no .config); allowed: a "
                "PreTrainedModel, e.g. from kvsqueeze.load_model or AutoModelForCausalLM.from_pretrained"
            )
        if isinstance(pool, KVPool) and isinstance(model, torch.nn.Module):
            dtype = next(model.parameters()).dtype
            pool.bind(dtype=str(dtype).removeprefix("torch."))
        cache = cls(config, model.config, fused, pool)
        if pool is not None:
            cache.prefix_digest = prefix_digest(cache.cache_config, model.config, model)
        if risk_check:
            cache.warn_if_unsafe(model)
        if isinstance(model, torch.nn.Module) and getattr(model, "_kvsqueeze_forward_hook", None) is None:
            # assisted decoding: which new tokens of a forward are drafts (`ForwardShape`); prefix
            # sharing: the token ids of each forward, and its full blocks published after it
            model._kvsqueeze_forward_hook = model.register_forward_pre_hook(_note_forward, with_kwargs=True)
            model._kvsqueeze_forward_post_hook = model.register_forward_hook(_after_forward, with_kwargs=True)
        if cache.fused:
            from .attention import register

            register()
        return cache

    def match_prefix(self, input_ids: torch.Tensor) -> int:
        """Take the blocks of the longest prefix of ``input_ids`` (1, tokens) that the shared pool's
        prefix cache holds (see `integrations.prefix`); returns the number of tokens now held (0: no
        hit). Then run the model on the rest, e.g. ``model.generate(input_ids, cache=cache)``.
        Raises ValueError for a cache without ``pool=``, a non-empty cache or a batch."""
        return match_prefix(self, input_ids)

    def reset(self) -> None:
        """Drop every token (blocks of a shared pool go back to it, still findable by prefix)."""
        super().reset()
        self.token_ids = [] if self.kv_pool is not None else None
        self.published, self.last_hash = 0, None

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
                layer.store.set_roles(roles.to(torch.int8))

    def warn_if_unsafe(self, model: Any) -> list[str]:
        """Warn (and return the reasons) when the config is predicted to turn this model's attention
        into noise, or its keys/values overflow the float16 scales and zero points (`calibration.risk`,
        from the weights; ``kvsqueeze inspect`` measures the same error on text beside the decode KL)."""
        from ..calibration.risk import model_risk
        from ..quant.overflow import MetadataOverflowWarning

        if self.cache_config.is_exact:
            return []
        rope, _ = rope_for(model.config.get_text_config(decoder=True), self.head_dim)
        risk = model_risk(model, self.cache_config, rope)
        if risk is None:  # not a layout the risk check reads
            return []
        problems = risk.problems()
        if risk.unsafe:
            warnings.warn(
                f"this cache config is predicted UNSAFE for this model ({problems[0]}); run `kvsqueeze "
                "inspect --model ...` and pick its recommended configuration",
                stacklevel=3,
            )
        overflow = [p for p in problems if "overflow" in p]
        if overflow:
            more = f"; ... {len(overflow) - 2} more" if len(overflow) > 2 else ""
            warnings.warn("; ".join(overflow[:2]) + more, MetadataOverflowWarning, stacklevel=3)
        return problems

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (codes, scales, zero points, sinks, residual,
        block tables, exact sliding-window layers, and once each the constants of its transforms:
        rotation matrices, RoPE frequencies). The reference path's scratch is reported apart."""
        return sum(layer_nbytes(layer) for layer in self.layers) + self.constants_nbytes()

    def constants_nbytes(self) -> int:
        """Bytes of the distinct transform constants the layers hold (0 without transforms)."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            for t in layer.store.constants() if isinstance(layer, SqueezedLayer) else ():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def memory_report(self) -> MemoryReport:
        """Bytes by part, tokens held, bytes per token and the ratio to an fp16 cache."""
        return MemoryReport.from_cache(self)
