"""`MixedLayerStore`: one layer whose tokens have per-token precision classes, or are evicted.

Held parts, each a list of segments for attention (order does not matter: keys are post-RoPE):
``[sinks | exact class | high class | low class | residual window]`` plus, between a forward and
the end of its attention, the forward's own new tokens (``pending``). A forward:

1. `stash` keeps the new tokens pending, rounded to the exact dtype (no copy when they are in it);
2. the attention reads the held segments plus the pending tokens; an attention scorer `observe`s
   the last queries (fused path) and accumulates scores of the undecided tokens;
3. `settle` moves the pending tokens into the window; whole blocks that leave it get their
   classes from the `TokenPolicy` and go, once, to their class store (or are dropped).

``num_seen`` counts every token ever stored (positions), ``num_tokens`` those held.

Exact dtype (`set_exact_dtype`, as `LayerStore`): every token is rounded to it when it is stashed,
so sinks, window, staging and the exact class hold it and packed blocks are quantized from it,
whichever way a token went; a store whose exact values leave its range widens to theirs, with a
warning. `exact_dtype_for` resolves ``CacheConfig.exact_dtype`` for a model: ``"auto"`` takes
``tokens.exact_dtype`` when set, and 16 bits for a float32 model when the policy quantizes or
evicts (a policy whose every class is exact keeps the model's dtype: it reproduces DynamicCache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import CacheConfig, exact_storage_dtype
from ..policies.classes import Precision, Role, precision
from ..policies.plan import Counts, TokenPolicy
from ..policies.window import SinkWindowPolicy
from ..quant.exact import ExactTensor
from .class_store import ClassStore, SegmentTuple
from .exact_buffer import ExactBuffer
from .layer import LayerStore


class MixedLayerStore:
    """Keys and values of one layer, (batch, kv_heads, tokens, head_dim), by precision class."""

    def __init__(self, config: CacheConfig, name: str = "layer") -> None:
        assert config.tokens is not None
        self.tokens: TokenPolicy = config.tokens
        self.name = name
        self.exact_dtype_choice = config.exact_dtype  # CacheConfig.exact_dtype, see `exact_dtype_for`
        # None: the dtype of the incoming tokens (until `set_exact_dtype`)
        self.exact_dtype = getattr(torch, self.tokens.exact_dtype) if self.tokens.exact_dtype else None
        self.policy = SinkWindowPolicy(config.sink_tokens, config.residual_window, config.block_size)
        self.sink_k, self.sink_v = ExactBuffer(config.sink_tokens), ExactBuffer(config.sink_tokens)
        cap = max(config.residual_window, config.block_size)
        self.window_k, self.window_v = ExactBuffer(cap, step=1), ExactBuffer(cap, step=1)
        b = config.block_size
        self.classes = {
            Precision.EXACT: ClassStore(None, None, b, b),
            Precision.HIGH: ClassStore(self.tokens.high_key, self.tokens.high_value, config.page_tokens, b),
            Precision.LOW: ClassStore(config.key, config.value, config.page_tokens, b),
        }
        self.key_scorer = self.tokens.key_scorer()
        self.attention_scorer = self.tokens.attention_scorer()
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scores: torch.Tensor | None = None  # (batch, kv_heads, window + pending), attention scorer
        self.roles: torch.Tensor | None = None  # (batch, marked tokens) int8
        self.counts = Counts()
        self.num_seen = 0
        self.set_exact_dtype(self.exact_dtype)

    @property
    def num_tokens(self) -> int:
        held = (
            self.sink_k.num_tokens
            + self.window_k.num_tokens
            + sum(c.num_tokens for c in self.classes.values())
        )
        return held + (0 if self.pending is None else self.pending[0].shape[-2])

    @property
    def batch_size(self) -> int:
        for buf in (self.sink_k, self.window_k):
            if buf.data is not None:
                return buf.data.shape[0]
        return 0 if self.pending is None else self.pending[0].shape[0]

    def set_exact_dtype(self, dtype: torch.dtype | None) -> None:
        """Store every token in ``dtype`` from now on (see `LayerStore.set_exact_dtype`); held exact
        tokens are converted (frozen chunks of the exact class keep theirs)."""
        self.exact_dtype = dtype
        for buf in (self.sink_k, self.sink_v, self.window_k, self.window_v):
            buf.set_dtype(dtype)
        for store in self.classes.values():
            store.set_dtype(dtype)
        if self.pending is not None and dtype is not None:
            self.pending = (self.pending[0].to(dtype), self.pending[1].to(dtype))

    # rounding to the exact dtype, widening with a RuntimeWarning on overflow: LayerStore's, shared
    # (it reads ``exact_dtype`` and ``name`` and calls ``set_exact_dtype``, all defined here too)
    _to_exact = LayerStore._to_exact

    def exact_dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The exact dtype of this store in a model computing in ``model_dtype`` (module docstring)."""
        choice = self.exact_dtype_choice
        if choice == "auto" and self.tokens.exact_dtype is not None:
            choice = self.tokens.exact_dtype
        return exact_storage_dtype(choice, model_dtype, self.lossy)

    @property
    def lossy(self) -> bool:
        """Whether the policy can send a token to a packed class or evict it."""
        t = self.tokens
        used = {precision(t.default, "tokens.default")}
        used |= {precision(p, "tokens.roles") for _, p in t.roles.rules}
        if t.keep_high:
            used.add(Precision.HIGH)
        if t.evict:
            used.add(Precision.EVICT)
        return Precision.EVICT in used or any(not self.classes[c].exact for c in used - {Precision.EVICT})

    def segments(self) -> list[SegmentTuple]:
        """Held tokens (pending excluded) as (keys, values, num_tokens) segments."""
        out: list[SegmentTuple] = []
        for k, v in ((self.sink_k, self.sink_v),):
            if k.num_tokens:
                out.append((ExactTensor(k.view()), ExactTensor(v.view()), k.num_tokens))
        for store in self.classes.values():
            out += store.segments()
        if self.window_k.num_tokens:
            out.append(
                (
                    ExactTensor(self.window_k.view()),
                    ExactTensor(self.window_v.view()),
                    self.window_k.num_tokens,
                )
            )
        return out

    def stash(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Hold new ``key``, ``value`` (batch, kv_heads, n, head_dim) until `settle`."""
        assert self.pending is None, "stash twice without settle"
        self.pending = (self._to_exact(key), self._to_exact(value))
        self.num_seen += key.shape[-2]
        if self.attention_scorer is not None:
            b, h, n, _ = key.shape
            fresh = torch.zeros(b, h, n, device=key.device)
            self.scores = fresh if self.scores is None else torch.cat([self.scores, fresh], dim=-1)

    def observe(self, query: torch.Tensor, scaling: float) -> None:
        """Accumulate attention scores of the window and pending tokens from ``query`` (batch,
        q_heads, n, head_dim), the pending tokens' queries."""
        if self.attention_scorer is None or self.pending is None:
            return
        new_k = self.pending[0]
        window = self.window_k.view()
        undecided = new_k if window is None else torch.cat([window.to(new_k.dtype), new_k], dim=-2)
        self.scores += self.attention_scorer.observe(
            query, self.sink_k.view(), undecided, new_k.shape[-2], scaling
        )

    def settle(self) -> None:
        """Move the pending tokens in; whole blocks leaving the window go to their classes."""
        if self.pending is None:
            return
        key, value = self.pending
        self.pending = None
        plan = self.policy.plan(self.sink_k.num_tokens, self.window_k.num_tokens, key.shape[-2])
        s, w = plan.to_sinks, self.window_k.num_tokens
        if s:
            self.sink_k.append(key[:, :, :s])
            self.sink_v.append(value[:, :, :s])
            key, value = key[:, :, s:], value[:, :, s:]
            if self.scores is not None:
                self.scores = torch.cat([self.scores[..., :w], self.scores[..., w + s :]], dim=-1)
        n = plan.to_quantize
        if n == 0:
            self.window_k.append(key)
            self.window_v.append(value)
            return
        held_k, held_v = self.window_k.view(), self.window_v.view()
        cand_k = key if held_k is None else torch.cat([held_k, key], dim=-2)
        cand_v = value if held_v is None else torch.cat([held_v, value], dim=-2)
        first = self.num_seen - cand_k.shape[-2]  # position of the oldest undecided token
        self._place(cand_k[:, :, :n], cand_v[:, :, :n], first)
        self.window_k.assign(cand_k[:, :, n:])
        self.window_v.assign(cand_v[:, :, n:])
        if self.scores is not None:
            self.scores = self.scores[..., n:].contiguous()

    def _roles(self, batch: int, start: int, num: int, device: torch.device) -> torch.Tensor:
        out = torch.full((batch, num), int(Role.TEXT), dtype=torch.int8, device=device)
        if self.roles is not None and start < self.roles.shape[-1]:
            marked = self.roles[:, start : start + num].to(device)
            out[:, : marked.shape[-1]] = marked
        return out

    def _place(self, key: torch.Tensor, value: torch.Tensor, first: int) -> None:
        """Send leaving tokens ``key``, ``value`` (batch, kv_heads, n, head_dim) to their classes."""
        b, h, n, d = key.shape
        scores = None
        if self.attention_scorer is not None:
            scores = self.scores[..., :n]
        elif self.key_scorer is not None:
            scores = self.key_scorer.score(key)
        classes, self.counts = self.tokens.classes(
            self._roles(b, first, n, key.device), scores, h, self.counts
        )
        for cls, store in self.classes.items():
            mask = classes == int(cls)
            per_row = mask.sum(-1)
            count = int(per_row[0, 0])
            if (per_row != count).any():
                raise ValueError(
                    f"roles: rows of the batch send different numbers of tokens to class {cls.name.lower()}; "
                    "token-role policies need the same role layout in every row (use batch size 1)"
                )
            if count == 0:
                continue
            idx = (
                (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :count, None].expand(b, h, count, d)
            )
            store.append(key.gather(2, idx), value.gather(2, idx))

    def token_counts(self) -> dict[str, int]:
        """Tokens held, by part: ``sinks``, ``window`` (pending tokens included), one entry per
        precision class (``exact``, ``high``, ``low``) and ``evicted`` (seen, no longer held)."""
        pending = 0 if self.pending is None else self.pending[0].shape[-2]
        out = {"sinks": self.sink_k.num_tokens, "window": self.window_k.num_tokens + pending}
        for cls, store in self.classes.items():
            out[cls.name.lower()] = store.num_tokens
        out["evicted"] = self.num_seen - self.num_tokens
        return out

    def parts(self) -> dict[str, int]:
        """Bytes held, by part."""
        out = {"sinks": self.sink_k.nbytes + self.sink_v.nbytes}
        for cls, store in self.classes.items():
            out.update(store.parts(cls.name.lower()))
        out["residual"] = self.window_k.nbytes + self.window_v.nbytes
        pending = 0 if self.pending is None else sum(t.numel() * t.element_size() for t in self.pending)
        out["pending"] = pending
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.parts().values())

    def buffers(self) -> list:
        out = [self.sink_k, self.sink_v, self.window_k, self.window_v]
        for store in self.classes.values():
            out += store.buffers()
        return out

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers():
            buf.map_batch(fn)
        if self.pending is not None:
            self.pending = (fn(self.pending[0]), fn(self.pending[1]))
        for name in ("scores", "roles"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def clear(self) -> None:
        for buf in self.buffers():
            buf.clear()
        self.pending = self.scores = None
        self.counts = Counts()
        self.num_seen = 0
