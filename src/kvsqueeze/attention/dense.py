"""Dense reference attention for the options transformers' SDPA function does not implement.

`dense_attention` computes, in float32, what the eager attention functions of transformers models
compute: scores ``query @ key^T * scaling``, then soft-capping ``tanh(s / softcap) * softcap``
(Gemma 2), then the position bias (T5) and the mask, then a softmax whose denominator also holds one
sink logit per query row (GPT-OSS ``s_aux``, Inkling ``sinks``; the sink's value is zero), then
dropout, then the weighted sum of the values. It is the reference path of the kvsqueeze attention
for these options, and returns the attention weights when asked (``output_attentions``).

Without weights to return, query rows are processed in chunks, so the scores never take more than
about ``SCORE_BUDGET`` floats.
"""

from __future__ import annotations

import torch

SCORE_BUDGET = 1 << 25  # floats of scores held at once (128 MiB)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Bool (q_len, kv_len), True where query i may attend key t, as SDPA's ``is_causal``: upper-left
    aligned (query i sees keys 0..i) for several queries, every key for one query."""
    if q_len == 1:
        return torch.ones(1, kv_len, dtype=torch.bool, device=device)
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    *,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query`` (batch, q_heads, q_len, head_dim) over ``key`` and ``value`` (batch,
    kv_heads, kv_len, head_dim | v_head_dim), q_heads a multiple of kv_heads.

    ``attention_mask``: None or (batch | 1, q_heads | 1, q_len, kv_len), bool (True: attend) or
    additive float; ``causal`` applies when it is None (see `causal_mask`). ``sinks``: None or sink
    logits (batch, q_heads, q_len). ``position_bias``: None or additive (batch | 1, q_heads | 1,
    q_len, kv_len). ``dropout``: probability of dropping a weight (applied when > 0, as SDPA does).

    Returns the output (batch, q_len, q_heads, v_head_dim) in the query's dtype and, with
    ``need_weights``, the weights (batch, q_heads, q_len, kv_len) (else None). Rows that see no key
    give 0.
    """
    b, hq, lq, _ = query.shape
    groups = hq // key.shape[1]
    key, value = (x.float().repeat_interleave(groups, dim=1) for x in (key, value))
    if attention_mask is None and causal:
        attention_mask = causal_mask(lq, key.shape[-2], query.device)
    rows = lq if need_weights else max(1, SCORE_BUDGET // max(1, b * hq * key.shape[-2]))
    outs, weights = [], []
    for i in range(0, lq, rows):
        rs = slice(i, i + rows)
        out, w = _rows(query[:, :, rs], key, value, _rows_of(attention_mask, rs), scaling,
                       None if sinks is None else sinks[:, :, rs], softcap, _rows_of(position_bias, rs), dropout)  # fmt: skip
        outs.append(out)
        weights.append(w)
    out = torch.cat(outs, dim=2).to(query.dtype).transpose(1, 2).contiguous()
    return out, (weights[0].to(query.dtype) if need_weights else None)


def _rows_of(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows ``rows`` of a (.., q_len, kv_len) tensor that may broadcast over q_len."""
    return t if t is None or t.shape[-2] == 1 else t[..., rows, :]


def _rows(query, key, value, mask, scaling, sinks, softcap, position_bias, dropout):
    scores = (query.float() @ key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias.float()
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        )
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().unsqueeze(-1))
    probs = torch.exp(scores - lse).nan_to_num(0.0)  # rows that see nothing (lse = -inf) give 0
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return probs @ value, probs
