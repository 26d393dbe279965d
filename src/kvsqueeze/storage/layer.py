"""`LayerStore`: everything one attention layer keeps — exact sinks, packed history, exact window.

Token order along the sequence: ``[sinks | packed history | residual window]``. The policy
decides, per update, how many incoming tokens join the sinks and how many whole blocks leave
the residual window for the packed pages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import CacheConfig
from ..policies.window import SinkWindowPolicy
from .exact_buffer import ExactBuffer
from .pages import PagedStore
from .transform import PageTransform


class LayerStore:
    """Keys and values of one layer, shape (batch, kv_heads, tokens, head_dim) each."""

    def __init__(
        self,
        config: CacheConfig,
        key_transform: PageTransform | None = None,
        value_transform: PageTransform | None = None,
    ) -> None:
        self.policy = SinkWindowPolicy(config.sink_tokens, config.residual_window, config.block_size)
        self.sink_k, self.sink_v = ExactBuffer(config.sink_tokens), ExactBuffer(config.sink_tokens)
        window_capacity = max(config.residual_window, config.block_size)
        self.window_k, self.window_v = ExactBuffer(window_capacity), ExactBuffer(window_capacity)
        self.packed_k = PagedStore(config.key, config.page_tokens, key_transform)
        self.packed_v = PagedStore(config.value, config.page_tokens, value_transform)

    @property
    def num_tokens(self) -> int:
        return self.sink_k.num_tokens + self.packed_k.num_tokens + self.window_k.num_tokens

    @property
    def batch_size(self) -> int:
        """Batch size of the held tokens (0 when empty)."""
        for buf in (self.sink_k, self.window_k):
            if buf.data is not None:
                return buf.data.shape[0]
        pages = self.packed_k.pages
        return pages[0].tensors()[0].shape[0] if pages else 0

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store new tokens ``key``, ``value`` (batch, kv_heads, n, head_dim)."""
        plan = self.policy.plan(self.sink_k.num_tokens, self.window_k.num_tokens, key.shape[-2])
        s = plan.to_sinks
        if s:
            self.sink_k.append(key[:, :, :s])
            self.sink_v.append(value[:, :, :s])
        for window, packed, new in (
            (self.window_k, self.packed_k, key),
            (self.window_v, self.packed_v, value),
        ):
            new = new[:, :, s:]
            if plan.to_quantize == 0:
                window.append(new)
                continue
            held = window.view()
            pending = new if held is None else torch.cat([held, new], dim=-2)
            packed.append(pending[:, :, : plan.to_quantize])
            window.assign(pending[:, :, plan.to_quantize :])

    def parts(self) -> dict[str, int]:
        """Bytes held, by part."""
        return {
            "sinks": self.sink_k.nbytes + self.sink_v.nbytes,
            "packed_keys": self.packed_k.nbytes,
            "packed_values": self.packed_v.nbytes,
            "residual": self.window_k.nbytes + self.window_v.nbytes,
        }

    @property
    def nbytes(self) -> int:
        return sum(self.parts().values())

    def buffers(self) -> list:
        return [self.sink_k, self.sink_v, self.window_k, self.window_v, self.packed_k, self.packed_v]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers():
            buf.map_batch(fn)

    def clear(self) -> None:
        for buf in self.buffers():
            buf.clear()
