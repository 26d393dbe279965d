"""``attn_implementation="kvsqueeze"``: transformers' attention seam for the fused read path.

`register` adds the attention function (and transformers' SDPA mask builder under the same name)
to transformers' public `AttentionInterface` / `AttentionMaskInterface`. It is explicit and
idempotent; `kvsqueeze.load_model(attn_implementation="kvsqueeze")` and `SqueezedCache.from_model`
call it lazily. Nothing is registered at import.

Read paths. The *fused path* reads the `AttentionParts` behind the `PackedKV` keys a fused
`SqueezedLayer` returns, with the native kernel of the device. Everything else (ordinary tensors:
exact caches, sliding-window layers, no cache, the prefill of an empty cache; devices without a
kernel; options the kernel does not implement) takes the *reference path* on dense keys and values
(dequantized where needed): transformers' `sdpa_attention_forward` when SDPA implements every option
of the call, else `attention.dense.dense_attention`.

Options. Every keyword argument transformers 5.24 passes to an attention function (every
``attention_interface(...)`` call site of its models, plus the `TransformersKwargs` a model forwards),
and what happens to it. Nothing is silently dropped: an option outside this table raises ValueError
naming it, unless its value is None or False.

=======================  ===============================  =============================================
option                   passed by                        kvsqueeze attention
=======================  ===============================  =============================================
attention_mask           every model                      fused kernel (bool or additive, per batch
                                                          and head); reference path
scaling, is_causal       every model                      fused kernel; reference path
s_aux (q_heads,)         GPT-OSS, GraniteSWA, DeepSeek-   fused kernel: one logit per head in the
                         V4, HY-V4, MiMo-V2-Flash, Flint  softmax denominator; dense reference
sinks (b, h, q_len, 1)   Inkling 2                        as s_aux, one logit per query row
softcap                  Gemma 2, T5Gemma, VaultGemma,    dense reference: tanh(s / softcap) * softcap
                         VideoPrism                       on the scaled scores, before bias and mask
position_bias            T5 family, Pix2Struct, UDOP,     SDPA (merged into the mask); dense reference
                         LayoutLMv3, Inkling, ...         when combined with sinks or softcap
dropout > 0              every model, in training         SDPA (``dropout_p``); dense reference when
                                                          combined with sinks, softcap or weights
output_attentions=True   any model's forward kwargs       dense reference, which returns the weights
                                                          (batch, q_heads, q_len, kv_len)
indices (b, q_len, k)    DSA models: DeepSeek-V3.2, GLM-  folded into the mask (only the selected keys
                         MoE-DSA, Mistral-Large-4, ...    stay visible), as these models do themselves
                                                          for eager and SDPA; then any path
sliding_window           hybrid / SWA models              already in the mask: the mask builder
                                                          registered under this name bakes the window
                                                          in (no mask only while it is not exceeded)
position_ids,            forward kwargs                   no effect here: positions are applied by
cache_position,                                           RoPE before the call, packed sequences by
use_cache, seq_idx,                                       the mask builder, the rest concerns other
output_hidden_states,                                     layers or the loss
output_router_logits,
num_items_in_batch
deterministic            ModernBERT (flash only)          honoured: every path here is deterministic
block_indices            MiniMax-M3-VL                    refused: block selection needs the model's
                                                          indexer (use "eager" or "sdpa")
cu_seq_lens_q/_k,        flash varlen calls (packed,      refused: pass an attention_mask, or
max_length_q/_k          unpadded batches)                position_ids for packed sequences
=======================  ===============================  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..attention.dense import causal_mask, dense_attention
from ..attention.fused import fused_attention, fused_backend
from ..attention.packed_view import parts_of

NAME = "kvsqueeze"
# Options with no effect on attention once the mask is built (see the table above).
NO_EFFECT = (
    "sliding_window", "position_ids", "cache_position", "use_cache", "seq_idx", "output_hidden_states",
    "output_router_logits", "num_items_in_batch", "deterministic",
)  # fmt: skip
HONOURED = ("s_aux", "sinks", "softcap", "position_bias", "output_attentions", "indices")
REFUSED = {
    "block_indices": "block-sparse selection needs the model's indexer; load the model with "
    "attn_implementation='eager' or 'sdpa' (they fold it into the mask)",
    **{
        name: "varlen (packed, unpadded) batches are a flash-attention input; pass an attention_mask, or "
        "position_ids for packed sequences"
        for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    },
}


def register() -> None:
    """Make ``attn_implementation="kvsqueeze"`` available to transformers models (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, kvsqueeze_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_fused_attention(model: Any) -> None:
    """Register the kvsqueeze attention and switch ``model`` to it (a no-op when it already uses it).

    The kvsqueeze attention runs transformers' SDPA for anything but fused `SqueezedCache` layers
    (and the dense reference for options SDPA lacks), so other caches on the same model compute
    what they computed with ``"sdpa"`` — or with ``"eager"``, for those options.
    """
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


@dataclass(frozen=True)
class AttentionOptions:
    """The options of one call, validated. ``mask`` is the attention mask with ``indices`` folded in;
    ``sinks`` the sink logits (batch, q_heads, q_len) float32 (``s_aux`` and ``sinks`` combined)."""

    mask: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    softcap: float | None = None
    position_bias: torch.Tensor | None = None
    dropout: float = 0.0
    need_weights: bool = False

    @property
    def kernel_reads(self) -> bool:
        """Whether the fused kernels implement every option (mask, scaling, causal, sinks)."""
        return (
            self.softcap is None and self.position_bias is None and not self.dropout and not self.need_weights
        )

    @property
    def sdpa_reads(self) -> bool:
        """Whether transformers' SDPA function implements every option (mask, dropout, position bias)."""
        return self.sinks is None and self.softcap is None and not self.need_weights


def attention_options(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    causal: bool,
    kwargs: dict[str, Any],
) -> AttentionOptions:
    """Validate the options of a call (see the table in the module docstring) for ``query`` (batch,
    q_heads, q_len, head_dim) and ``key`` (batch, kv_heads, kv_len, head_dim)."""
    for name, value in kwargs.items():
        if name in REFUSED and value is not None:
            raise ValueError(f"{name}: not supported by attn_implementation='{NAME}': {REFUSED[name]}")
        unknown = name not in REFUSED and name not in NO_EFFECT and name not in HONOURED
        if unknown and value is not None and value is not False:
            raise ValueError(
                f"{name}: unknown attention option (value {_show(value)}) for attn_implementation='{NAME}'; "
                f"allowed: {', '.join(HONOURED + NO_EFFECT)}, and any option set to None"
            )
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: {dropout!r}; allowed: a probability in [0, 1)")
    softcap = kwargs.get("softcap")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap: {softcap!r}; allowed: a positive number or None")
    mask = attention_mask
    if kwargs.get("indices") is not None:
        mask = _fold_indices(mask, kwargs["indices"], query, key.shape[-2], causal)
    return AttentionOptions(
        mask=mask,
        sinks=_sink_logits(query, kwargs.get("s_aux"), kwargs.get("sinks")),
        softcap=None if softcap is None else float(softcap),
        position_bias=kwargs.get("position_bias"),
        dropout=float(dropout),
        need_weights=bool(kwargs.get("output_attentions")),
    )


def _show(value: Any) -> str:
    return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:80]


def _sink_logits(
    query: torch.Tensor, s_aux: torch.Tensor | None, sinks: torch.Tensor | None
) -> torch.Tensor | None:
    """(batch, q_heads, q_len) float32 sink logits: ``s_aux`` (q_heads,) per head, ``sinks`` (batch | 1,
    q_heads | 1, q_len | 1, 1) per query row; both present: two extra logits, i.e. their logaddexp."""
    b, hq, lq, _ = query.shape
    rows = []
    if s_aux is not None:
        if s_aux.numel() != hq:
            raise ValueError(
                f"s_aux: shape {tuple(s_aux.shape)}; allowed: one sink logit per query head, ({hq},)"
            )
        rows.append(s_aux.float().reshape(1, hq, 1).expand(b, hq, lq))
    if sinks is not None:
        if sinks.dim() != 4 or any(n not in (1, m) for n, m in zip(sinks.shape, (b, hq, lq, 1), strict=True)):
            raise ValueError(
                f"sinks: shape {tuple(sinks.shape)}; allowed: (batch | 1, q_heads | 1, q_len | 1, 1)"
            )
        rows.append(sinks.float()[..., 0].expand(b, hq, lq))
    if not rows:
        return None
    return rows[0] if len(rows) == 1 else torch.logaddexp(rows[0], rows[1])


def _fold_indices(
    mask: torch.Tensor | None, indices: torch.Tensor, query: torch.Tensor, kv_len: int, causal: bool
) -> torch.Tensor:
    """``mask`` with only the keys ``indices`` (batch, q_len, top_k) selects left visible, as the DSA
    models build it for eager and SDPA; a float mask gets the dtype's minimum at the others."""
    b, _, lq, _ = query.shape
    if indices.dim() != 3 or indices.shape[:2] != (b, lq):
        raise ValueError(
            f"indices: shape {tuple(indices.shape)}; allowed: (batch, q_len, top_k) = ({b}, {lq}, k)"
        )
    keep = torch.zeros(b, lq, kv_len, dtype=torch.bool, device=query.device)
    keep = keep.scatter(-1, indices.long(), True).unsqueeze(1)
    if mask is None:
        return keep & causal_mask(lq, kv_len, query.device) if causal else keep
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, torch.finfo(mask.dtype).min)


def _reference(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    opts: AttentionOptions,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference path on dense ``key``, ``value``: transformers' SDPA function when it implements
    every option, else `dense_attention`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if opts.sdpa_reads:
        return sdpa_attention_forward(
            module, query, key, value, opts.mask, dropout=opts.dropout, scaling=scale, is_causal=causal,
            position_bias=opts.position_bias,
        )  # fmt: skip
    return dense_attention(
        query, key, value, opts.mask, scale, causal, sinks=opts.sinks, softcap=opts.softcap,
        position_bias=opts.position_bias, dropout=opts.dropout, need_weights=opts.need_weights,
    )  # fmt: skip


def kvsqueeze_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function: query (batch, q_heads, q_len, head_dim), key and value
    (batch, kv_heads, kv_len, head_dim) -> ((batch, q_len, q_heads, head_dim), the weights (batch,
    q_heads, q_len, kv_len) when ``output_attentions`` asks for them, else None)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    opts = attention_options(query, key, attention_mask, dropout, causal, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    parts = owner = parts_of(key)
    if parts is not None and not parts.history and parts.drafts is None:
        # prefill of an empty cache: the reference path on the new tokens
        key, value = parts.new.key.values, parts.new.value.values
        parts = None
    kernel = parts is not None and parts.kernel and opts.kernel_reads
    backend = fused_backend(query.device) if kernel else None
    if backend is not None:
        out = fused_attention(query, parts, opts.mask, scale, causal, backend, opts.sinks), None
    else:
        if parts is not None:  # dense, with the verification reads of assisted decoding (if any)
            key, value, mask = parts.dense_inputs(opts.mask)
            opts = replace(opts, mask=mask)
        out = _reference(module, query, key, value, opts, scale, causal)
    if owner is not None:  # token policies score and settle the new tokens after the read
        owner.finish(query, scale)
    return out
