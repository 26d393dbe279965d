"""A ragged batch for the engine: several sequences, each with its own `SqueezedCache`, in one forward.

The engine (`kvsqueeze.engine`) runs the model once per step on the new tokens of every scheduled
sequence laid end to end — ``input_ids`` (1, T) with ``T = n_1 + … + n_B`` and each token's own
position in ``position_ids`` (1, T) — prefill chunks and decode tokens mixed, no padding. This
module is the seam that makes a stock transformers model do that:

* `SequenceBatch` is the ``cache=`` of that forward. ``update(key, value, layer_idx)`` receives the
  new keys/values (1, kv_heads, T, head_dim), gives each sequence its slice through its own
  `SqueezedCache` (which stores them on the shared `KVPool` and returns what its attention reads:
  `PackedKV` views on the fused path, dense tensors on the reference path), and returns a
  `RaggedKV` pair that carries those per-sequence reads.
* ``attn_implementation="kvsqueeze_ragged"`` (`register_ragged`) is the attention that reads them:
  sequence by sequence, the query slice attends to its own held tokens plus its new ones (causal,
  aligned to the end: query i of n sees every held token and new tokens 0..i), through the
  kvsqueeze attention (`integrations.attention.kvsqueeze_attention`), so the fused kernels, token
  policies and their scorers work as in a single-sequence forward. No mask is built by transformers
  for this name (it is not registered as a mask function); only full-attention models are accepted
  (`check_model`).

Each sequence's cache is a batch of one, so a sequence holds only its own tokens: rows of different
lengths cost nothing for padding.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import NO_EFFECT, kvsqueeze_attention
from .cache import FULL_ATTENTION, SqueezedCache
from .prefix import note_tokens, publish
from .ragged_decode import DecodeReader

NAME = "kvsqueeze_ragged"


class RaggedKV(torch.Tensor):
    """The new keys (``index`` 0) or values (1) of a ragged batch, (1, kv_heads, T, head_dim), with the
    `SequenceBatch` and layer they belong to.

    The sequences' caches are updated by the ``kvsqueeze_ragged`` attention itself, one sequence at a
    time right before its read, so that one scratch workspace serves every sequence of the batch (the
    reference path dequantizes a sequence's history into it). Any other operation on it raises
    RuntimeError."""

    states: torch.Tensor
    batch: SequenceBatch
    layer_idx: int
    index: int

    @staticmethod
    def __new__(cls, states: torch.Tensor, batch: SequenceBatch, layer_idx: int, index: int) -> RaggedKV:
        return torch.Tensor._make_wrapper_subclass(
            cls, states.shape, dtype=states.dtype, device=states.device, requires_grad=False
        )

    def __init__(self, states: torch.Tensor, batch: SequenceBatch, layer_idx: int, index: int) -> None:
        self.states, self.batch, self.layer_idx, self.index = states, batch, layer_idx, index

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise RuntimeError(
            f"RaggedKV: {func} on a ragged batch; only attn_implementation={NAME!r} reads it (the engine "
            "sets it on the model)"
        )

    def __repr__(self) -> str:
        kind = ("keys", "values")[self.index]
        return f"RaggedKV({kind}, layer={self.layer_idx}, sequences={len(self.batch.caches)})"


class _BatchLayer(CacheLayerMixin):
    """Mask sizes of the flat batch; storage lives in each sequence's own cache."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> Any:  # SequenceBatch.update does the work
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class SequenceBatch(Cache):
    """The ``cache=`` of one engine step: ``caches[i]`` takes the next ``lengths[i]`` new tokens.

    ``caches``: one `SqueezedCache` (batch 1) per sequence, in the order of their tokens in the
    flat batch; ``lengths``: new tokens per sequence (each ≥ 1); ``token_ids``: their ids, (1, T)
    int64, followed for prefix sharing when a cache is on a shared pool; ``decode_reader``: reads and
    stores decode tokens the short way where it can (`ragged_decode`; None: every token through the
    general path). Raises ValueError when they do not match."""

    def __init__(
        self,
        caches: list[SqueezedCache],
        lengths: list[int],
        token_ids: torch.Tensor,
        decode_reader: DecodeReader | None = None,
    ) -> None:
        if (
            len(caches) != len(lengths)
            or not caches
            or min(lengths) < 1
            or sum(lengths) != token_ids.shape[-1]
        ):
            raise ValueError(
                f"SequenceBatch: {len(caches)} caches, lengths {lengths}, {token_ids.shape[-1]} token ids; "
                "allowed: one length >= 1 per cache, summing to the number of token ids"
            )
        super().__init__(layers=[_BatchLayer() for _ in caches[0].layers])
        self.caches, self.lengths = caches, lengths
        self.decode_reader = decode_reader
        self.starts = [0]
        for n in lengths:
            self.starts.append(self.starts[-1] + n)
        for cache, a, b in zip(caches, self.starts, self.starts[1:], strict=False):
            note_tokens(cache, token_ids[:, a:b])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, kv_heads, T, head_dim) new states -> `RaggedKV` views (stored by the attention)."""
        return RaggedKV(key_states, self, layer_idx, 0), RaggedKV(value_states, self, layer_idx, 1)

    def finish(self) -> None:
        """After the forward: every sequence's cache publishes its new full blocks (prefix sharing)."""
        for cache in self.caches:
            publish(cache)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _end_aligned_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool (1, 1, q_len, kv_len): query i of the last ``q_len`` positions sees keys 0..kv_len-q_len+i;
    None for one query (it sees everything)."""
    if q_len == 1:
        return None
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)
    return mask[None, None]


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for a `SequenceBatch`: query (1, q_heads, T, head_dim), key
    and value `RaggedKV` -> ((1, T, q_heads, head_dim), None). Each sequence's cache stores its new
    tokens, then its queries read them (causal, end-aligned). Raises ValueError for other inputs."""
    if not isinstance(key, RaggedKV) or not isinstance(value, RaggedKV):
        raise ValueError(
            f"attn_implementation {NAME!r} reads the ragged batch of kvsqueeze's engine; got {type(key).__name__} "
            "keys (use 'kvsqueeze' or 'sdpa' for ordinary forwards)"
        )
    batch, layer = key.batch, key.layer_idx
    reader = batch.decode_reader if not dropout and not _has_options(kwargs) else None
    rounded: dict[torch.dtype | None, tuple[torch.Tensor, torch.Tensor] | None] = {}
    outs: list[torch.Tensor | None] = []
    short: list[tuple[int, Any, Any, torch.Tensor, torch.Tensor]] = []  # (slot, store, inputs, key, value)
    for cache, a, b in zip(batch.caches, batch.starts, batch.starts[1:], strict=False):
        cache_layer = cache.layers[layer]
        if reader is not None and b - a == 1 and reader.eligible(cache_layer, query):
            store = cache_layer.store
            if store.exact_dtype not in rounded:  # once per layer for the whole batch
                states = [reader.exact_states(x.states, store.exact_dtype) for x in (key, value)]
                rounded[store.exact_dtype] = None if states[0] is None or states[1] is None else tuple(states)
            exact = rounded[store.exact_dtype]
            if exact is not None:
                inputs = reader.inputs(
                    store, query[:, :, a:b], key.states[:, :, a:b], value.states[:, :, a:b]
                )
                short.append((len(outs), store, inputs, exact[0][:, :, a:b], exact[1][:, :, a:b]))
                outs.append(None)
                continue
        # the layer itself: the engine checked lengths and shapes when it admitted the request
        k, v = cache_layer.update(key.states[:, :, a:b], value.states[:, :, a:b])
        mask = _end_aligned_mask(b - a, k.shape[-2], query.device)
        out, _ = kvsqueeze_attention(
            module, query[:, :, a:b], k, v, mask, dropout=dropout, scaling=scaling, is_causal=True, **kwargs
        )
        outs.append(out)
    if short:  # every decode token of the short path in one kernel call, then stored
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        results = reader.attend([s[2] for s in short], scale)
        for (slot, store, _, k, v), out in zip(short, results, strict=True):
            outs[slot] = out
            store.append_to_window(k, v)
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], None


def _has_options(kwargs: dict[str, Any]) -> bool:
    """Whether the attention call carries options beyond what plain causal attention needs (sinks,
    softcap, indices, position bias, weights): those take the general path, which honours or refuses
    each (`integrations.attention.attention_options`)."""
    return any(
        value is not None and value is not False for name, value in kwargs.items() if name not in NO_EFFECT
    )


def register_ragged() -> None:
    """Make ``attn_implementation="kvsqueeze_ragged"`` available (idempotent; no mask function, so
    transformers builds no mask for it)."""
    from transformers import AttentionInterface

    from .attention import register

    register()
    AttentionInterface.register(NAME, ragged_attention)


def check_model(model: Any) -> None:
    """Raise ValueError unless every attention layer of ``model`` is full attention (the ragged batch
    builds its own causal masks and has no sliding windows)."""
    cfg = model.config.get_text_config(decoder=True)
    kinds = set(getattr(cfg, "layer_types", None) or [FULL_ATTENTION])
    if kinds != {FULL_ATTENTION}:
        raise ValueError(
            f"model: layer_types {sorted(kinds)}; the engine serves models whose layers are all "
            f"{FULL_ATTENTION!r} (sliding-window layers are not supported yet)"
        )
