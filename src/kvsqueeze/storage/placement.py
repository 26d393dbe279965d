"""Where the tokens leaving a layer's residual window go: the placement strategy of a `LayerStore`.

`SequencePlacement` (no token policy): every block, in sequence order, to one packed history (a
`PackedClass` on the layer's block pools, shareable through a `KVPool`). Stored column ``c`` is
token ``c``, so the store can roll back (`LayerStore.crop`) and keep row sinks of padded batches.

`policy_placement.PolicyPlacement` (``CacheConfig.tokens``): each token to a precision class or
evicted, by roles and importance.

Both answer the same calls (`place`, `segments`, `restore_`, the scorer hooks `stashed`,
`took_sinks`, `observe`, and the bookkeeping), so the store never asks which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import CacheConfig
from ..policies.classes import Precision
from ..policies.plan import Counts
from .block_pool import BlockPool
from .pages import Page, SegmentTuple
from .state import StateDict
from .token_class import PackedClass
from .transform import PageTransform, PartTransform


class SequencePlacement:
    """The packed history of a plain store: keys and values (batch, kv_heads, tokens, head_dim) in
    blocks of the config's specs, in sequence order."""

    positional = True  # stored order is sequence order: rollback and row sinks work
    defers = False  # new tokens are placed at `LayerStore.append`, before the attention reads them
    preferred_dtype: str | None = None
    num_evicted = 0
    counts = Counts()  # nothing is decided by a token policy
    roles: torch.Tensor | None = None

    def __init__(
        self,
        config: CacheConfig,
        transforms: tuple[PageTransform | None, PageTransform | None] = (None, None),
        name: str = "layer",
        pools: tuple[BlockPool, BlockPool] | None = None,
    ) -> None:
        self.history = PackedClass(
            config.key, config.value, config.block_size, config.page_tokens, transforms, name, pools
        )
        self.classes = {Precision.LOW: self.history}
        self.lossy = not config.is_exact  # exact parts go 16-bit for a float32 model only when lossy

    @property
    def num_tokens(self) -> int:
        return self.history.num_tokens

    @property
    def batch_size(self) -> int:
        return self.history.batch_size

    # --- the scorer hooks: nothing to score ----------------------------------------------------------
    def stashed(self, like: torch.Tensor) -> None:
        pass

    def took_sinks(self, window_tokens: int, num_sinks: int) -> None:
        pass

    def observe(
        self,
        query: torch.Tensor,
        sinks: torch.Tensor | None,
        window: torch.Tensor | None,
        new: torch.Tensor,
        scaling: float,
    ) -> None:
        pass

    def set_roles(self, roles: torch.Tensor) -> None:
        raise ValueError("roles: this cache has no token policy (CacheConfig.tokens is None)")

    # --- placing and reading -------------------------------------------------------------------------
    def place(
        self, key: torch.Tensor, value: torch.Tensor, first: int, padding: torch.Tensor | None = None
    ) -> None:
        """Pack ``key``, ``value`` (batch, kv_heads, n, head_dim), whole blocks leaving the window
        (``first``: the seen position of the first; the history is contiguous, so unused);
        ``padding`` (batch, n / block_size) bool: blocks of left padding, not stored (`PagedStore.append`)."""
        self.history.append(key, value, padding=padding)

    def segments(self) -> list[SegmentTuple]:
        return self.history.segments()

    def restore_(self, part: Page, index: int, out: torch.Tensor) -> None:
        self.history.restore_(part, index, out)

    def read_transform(self, part: Page, index: int) -> PartTransform | None:
        return self.history.read_transform(part, index)

    # --- bookkeeping ---------------------------------------------------------------------------------
    def token_counts(self, evicted: int) -> dict[str, int]:
        """``packed`` tokens, or ``exact blocks`` when the blocks hold exact values (preset ``none``)."""
        exact = self.history.pages_k.is_exact and self.history.pages_v.is_exact
        return {"exact blocks" if exact else "packed": self.history.pages_k.num_tokens}

    def parts(self) -> dict[str, int]:
        pages_k, pages_v = self.history.pages_k, self.history.pages_v
        return {
            "packed_keys": pages_k.block_nbytes,
            "packed_values": pages_v.block_nbytes,
            "block_tables": pages_k.tables.nbytes + pages_v.tables.nbytes,
        }

    def constants(self) -> list[torch.Tensor]:
        return self.history.constants()

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        self.history.set_dtype(dtype)

    def buffers(self) -> list:
        return self.history.buffers()

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.history.map_batch(fn)

    def clear(self) -> None:
        self.history.clear()

    def save_state(self, state: StateDict) -> None:
        """The packed ``history`` (`PackedClass.save_state`)."""
        self.history.save_state(state.child("history"))

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        self.history.load_state(state.child("history"), device)
