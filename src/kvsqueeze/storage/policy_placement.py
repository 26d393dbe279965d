"""`PolicyPlacement`: the token-policy strategy of a `LayerStore` (``CacheConfig.tokens``).

Whole blocks leaving the residual window get their classes from the `TokenPolicy` (roles first,
then importance budgets, then ``default``): ``exact`` (`ExactClass`), ``high`` and ``low`` (their
specs, `PackedClass` on block pools of their own, with the layer's page transforms), or evicted.
Every (batch, kv head) row sends the same number of tokens to each class, so classes stay
rectangular; order inside a class does not matter (keys are read post-RoPE), and a pre-RoPE class
keeps each token's cache position to restore it.

Importance: a key scorer ranks the leaving tokens themselves; an attention scorer accumulates, in
``scores`` (batch, kv_heads, window + pending), the attention the undecided tokens receive from
the last queries (`observe`, called once the attention has read a step's parts). New tokens are
therefore placed only after the attention (``defers``). Stored columns are not sequence positions
(``positional`` False): no rollback, no left-padded rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, fields

import torch

from ..config import CacheConfig
from ..policies.classes import Precision, Role, precision
from ..policies.plan import Counts, TokenPolicy
from .pages import Page, SegmentTuple
from .state import StateDict, StateError
from .token_class import ExactClass, PackedClass, token_class
from .transform import PageTransform, PartTransform


class PolicyPlacement:
    """Precision classes of one layer, keys and values (batch, kv_heads, tokens, head_dim) each."""

    positional = False
    defers = True

    def __init__(
        self,
        config: CacheConfig,
        transforms: tuple[PageTransform | None, PageTransform | None] = (None, None),
        name: str = "layer",
    ) -> None:
        assert config.tokens is not None
        self.tokens: TokenPolicy = config.tokens
        self.preferred_dtype = self.tokens.exact_dtype  # under exact_dtype "auto"
        b, page = config.block_size, config.page_tokens
        self.classes: dict[Precision, PackedClass | ExactClass] = {
            Precision.EXACT: ExactClass(),
            Precision.HIGH: token_class(
                self.tokens.high_key, self.tokens.high_value, b, page, transforms, f"{name} high"
            ),
            Precision.LOW: token_class(config.key, config.value, b, page, transforms, f"{name} low"),
        }
        self.history = self.classes[Precision.LOW]
        self.key_scorer = self.tokens.key_scorer()
        self.attention_scorer = self.tokens.attention_scorer()
        self.scores: torch.Tensor | None = None  # (batch, kv_heads, window + pending), attention scorer
        self.roles: torch.Tensor | None = None  # (batch, marked tokens) int8
        self.counts = Counts()
        self.num_evicted = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.classes.values())

    @property
    def batch_size(self) -> int:
        return max(c.batch_size for c in self.classes.values())

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
        packed = any(isinstance(self.classes[c], PackedClass) for c in used - {Precision.EVICT})
        return Precision.EVICT in used or packed

    # --- the scorer hooks ----------------------------------------------------------------------------
    def stashed(self, like: torch.Tensor) -> None:
        """New tokens ``like`` (batch, kv_heads, n, head_dim) wait undecided: their scores start at 0."""
        if self.attention_scorer is not None:
            b, h, n, _ = like.shape
            fresh = torch.zeros(b, h, n, device=like.device)
            self.scores = fresh if self.scores is None else torch.cat([self.scores, fresh], dim=-1)

    def took_sinks(self, window_tokens: int, num_sinks: int) -> None:
        """The ``num_sinks`` undecided tokens after the window's ``window_tokens`` became sinks."""
        if self.scores is not None:
            w = window_tokens
            self.scores = torch.cat([self.scores[..., :w], self.scores[..., w + num_sinks :]], dim=-1)

    def observe(
        self,
        query: torch.Tensor,
        sinks: torch.Tensor | None,
        window: torch.Tensor | None,
        new: torch.Tensor,
        scaling: float,
    ) -> None:
        """Accumulate the attention of ``query`` (batch, q_heads, n, head_dim), the queries of the ``new``
        keys (batch, kv_heads, n, head_dim), to the undecided ones (``window``, then ``new``) beside
        the ``sinks``."""
        if self.attention_scorer is None:
            return
        undecided = new if window is None else torch.cat([window.to(new.dtype), new], dim=-2)
        self.scores += self.attention_scorer.observe(query, sinks, undecided, new.shape[-2], scaling)

    def set_roles(self, roles: torch.Tensor) -> None:
        """Token roles (batch, tokens) int8 of the prompt (`Role`); later tokens are text. Kept as a
        copy of this layer's own, so that its bytes are this layer's."""
        self.roles = roles.to(torch.int8, copy=True)

    def _roles(self, batch: int, start: int, num: int, device: torch.device) -> torch.Tensor:
        out = torch.full((batch, num), int(Role.TEXT), dtype=torch.int8, device=device)
        if self.roles is not None and start < self.roles.shape[-1]:
            marked = self.roles[:, start : start + num].to(device)
            out[:, : marked.shape[-1]] = marked
        return out

    # --- placing and reading -------------------------------------------------------------------------
    def place(
        self, key: torch.Tensor, value: torch.Tensor, first: int, padding: torch.Tensor | None = None
    ) -> None:
        """Send leaving tokens ``key``, ``value`` (batch, kv_heads, n, head_dim), the first at seen
        position ``first``, to their classes (or drop them). Raises ValueError when rows of the batch
        would send different numbers of tokens to a class (token roles that differ per row).
        ``padding`` must be None: left-padded batches are refused before (`integrations.cache`)."""
        assert padding is None, "a token policy does not take left-padded batches"
        b, h, n, d = key.shape
        scores = None
        if self.attention_scorer is not None:
            scores = self.scores[..., :n]
        elif self.key_scorer is not None:
            scores = self.key_scorer.score(key)
        classes, self.counts = self.tokens.classes(
            self._roles(b, first, n, key.device), scores, h, self.counts
        )
        kept = 0
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
            kept += count
            order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :count]  # (b, h, count)
            idx = order[..., None].expand(b, h, count, d)
            store.append(key.gather(2, idx), value.gather(2, idx), first + order)
        self.num_evicted += n - kept
        if self.scores is not None:
            self.scores = self.scores[..., n:].contiguous()

    def segments(self) -> list[SegmentTuple]:
        """The held tokens of every class (exact, high, low), each class's blocks then its staging."""
        return [seg for store in self.classes.values() for seg in store.segments()]

    def restore_(self, part: Page, index: int, out: torch.Tensor) -> None:
        for store in self.classes.values():
            if store.restore_(part, index, out):
                return

    def read_transform(self, part: Page, index: int) -> PartTransform | None:
        for store in self.classes.values():
            found = store.read_transform(part, index)
            if found is not None:
                return found
        return None

    # --- bookkeeping ---------------------------------------------------------------------------------
    def token_counts(self, evicted: int) -> dict[str, int]:
        """One entry per class (``exact``, ``high``, ``low``) and ``evicted`` (seen, no longer held)."""
        out = {cls.name.lower(): store.num_tokens for cls, store in self.classes.items()}
        out["evicted"] = evicted
        return out

    def parts(self) -> dict[str, int]:
        """Bytes per class (``<class>_keys``, ``<class>_values``, ``<class>_staging``) and ``scores``:
        the undecided tokens' attention scores and the prompt's token roles."""
        out: dict[str, int] = {}
        for cls, store in self.classes.items():
            out.update(store.parts(cls.name.lower()))
        out["scores"] = sum(t.numel() * t.element_size() for t in self.tensors())
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The policy's own tensors: ``scores`` (batch, kv_heads, undecided) and ``roles`` (batch, marked)."""
        return [t for t in (self.scores, self.roles) if t is not None]

    def constants(self) -> list[torch.Tensor]:
        return [t for store in self.classes.values() for t in store.constants()]

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        for store in self.classes.values():
            store.set_dtype(dtype)

    def buffers(self) -> list:
        return [buf for store in self.classes.values() for buf in store.buffers()] + [self]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for store in self.classes.values():
            store.map_batch(fn)
        for name in ("scores", "roles"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def clear(self) -> None:
        for store in self.classes.values():
            store.clear()
        self.scores = None
        self.counts = Counts()
        self.num_evicted = 0

    def save_state(self, state: StateDict) -> None:
        """Every class (``exact``, ``high``, ``low``), the undecided tokens' ``scores`` (batch, kv_heads,
        tokens) float32 (attention scorer), the ``roles`` (batch, marked tokens) int8, the budget
        ``counts`` and ``num_evicted``."""
        for cls, store in self.classes.items():
            store.save_state(state.child(cls.name.lower()))
        state.put("scores", self.scores)
        state.put("roles", self.roles)
        state.set("counts", asdict(self.counts))
        state.set("num_evicted", self.num_evicted)

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        """Hold what `save_state` wrote; StateError for counts that are not `Counts` fields."""
        for cls, store in self.classes.items():
            store.load_state(state.child(cls.name.lower()), device)
        self.scores = state.take("scores", device)
        roles = state.take("roles")
        self.roles = None if roles is None else roles.to(torch.int8)
        counts = state.value("counts")
        allowed = [f.name for f in fields(Counts)]
        if not isinstance(counts, dict) or any(
            k not in allowed or isinstance(v, bool) or not isinstance(v, int) for k, v in counts.items()
        ):
            raise StateError(f"state: {state.name('counts')} is {counts!r}; allowed: integers for {allowed}")
        self.counts = Counts(**counts)
        self.num_evicted = state.count("num_evicted")
