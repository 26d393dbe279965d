"""Importance scores of the tokens still in the residual window (higher: more important).

`KeyNormScore` (kvpress' knorm): keys with a small L2 norm draw more attention, so the score is
``-||k||``; it needs nothing but the keys.

`KeyRangeScore` (for mixed precision, not eviction): how much a token stretches the per-channel
ranges of the keys it would be quantized with — the sum over channels of the range lost if the token
is taken out of the group (it is the channel's maximum or minimum). Keeping those tokens exact
narrows every per-channel scale of their group (KVQuant's dense-and-sparse idea, per token).

`AttentionScore` (H2O heavy hitters, SnapKV observation window): the attention probability each
undecided token receives from the last ``observe_window`` queries of every forward, summed over
the query heads of its KV group and accumulated over forwards until the token leaves the window.
Cost per layer and forward: one (batch, q_heads, observe_window, sinks + undecided) logit matrix,
where undecided = residual window + new tokens; the packed history is never read and no
(tokens x tokens) matrix is built, even for a long prefill. The softmax is normalised over the
sinks and the undecided tokens only (not over the packed history), which ranks the undecided
tokens the same way as long as the history's share is similar across a forward's queries.
``pool_size`` > 1 max-pools the scores along the tokens (SnapKV keeps neighbourhoods).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KeyNormScore:
    """Score ``-||k||`` per token."""

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys (batch, kv_heads, tokens, head_dim) -> float32 scores (batch, kv_heads, tokens)."""
        return -keys.float().norm(dim=-1)


@dataclass(frozen=True)
class KeyRangeScore:
    """Per-channel range lost when the token leaves the group of leaving tokens."""

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys (batch, kv_heads, tokens, head_dim) -> float32 scores (batch, kv_heads, tokens)."""
        k = keys.float()
        if k.shape[-2] < 2:
            return torch.zeros(k.shape[:-1], device=k.device)
        top, top_idx = k.topk(2, dim=-2)
        low, low_idx = (-k).topk(2, dim=-2)
        scores = torch.zeros(k.shape[:-1], device=k.device)
        scores.scatter_add_(-1, top_idx[..., 0, :], top[..., 0, :] - top[..., 1, :])
        scores.scatter_add_(-1, low_idx[..., 0, :], low[..., 0, :] - low[..., 1, :])
        return scores


@dataclass(frozen=True)
class AttentionScore:
    """Attention received from the last ``observe_window`` queries, max-pooled over ``pool_size`` tokens."""

    observe_window: int = 32
    pool_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.observe_window, int) or self.observe_window < 1:
            raise ValueError(f"observe_window: {self.observe_window!r} must be an integer >= 1")
        if not isinstance(self.pool_size, int) or self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(f"pool_size: {self.pool_size!r} must be an odd integer >= 1")

    def observe(
        self,
        query: torch.Tensor,
        sinks: torch.Tensor | None,
        undecided: torch.Tensor,
        num_new: int,
        scaling: float,
    ) -> torch.Tensor:
        """Scores (batch, kv_heads, undecided_tokens) of this forward.

        Args:
            query: (batch, q_heads, num_new, head_dim), post-RoPE, the new tokens' queries.
            sinks: (batch, kv_heads, num_sinks, head_dim) or None; only in the softmax normaliser.
            undecided: (batch, kv_heads, undecided_tokens, head_dim): the residual window, then the
                ``num_new`` new tokens (causal among themselves).
        """
        b, hq, q_len, d = query.shape
        hk, n = undecided.shape[1], undecided.shape[2]
        w = min(self.observe_window, q_len)
        q = query[:, :, q_len - w :].float().reshape(b, hk, hq // hk, w, d)
        keys = undecided if sinks is None else torch.cat([sinks, undecided], dim=2)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys.float()) * scaling
        first_new = keys.shape[2] - num_new
        query_pos = torch.arange(q_len - w, q_len, device=query.device)
        key_pos = torch.arange(keys.shape[2], device=query.device) - first_new
        logits.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)[..., keys.shape[2] - n :]
        scores = probs.sum(dim=(2, 3))
        if self.pool_size > 1:
            scores = F.max_pool1d(scores, self.pool_size, stride=1, padding=self.pool_size // 2)
        return scores
