"""`ClassStore`: the tokens of one precision class of one layer (keys and values).

Packed classes take tokens in whole blocks (per-channel groups span ``block_size`` tokens), but a
precision plan sends any number of tokens to a class: up to ``block_size - 1`` of them wait exact
in a staging buffer until a block is full, then are quantized once. The exact class has no
staging and no pages: `ExactChunks`. Staging buffers hold exactly their tokens (``step=1``).
Order inside a class does not matter to attention (keys are stored post-RoPE). Tokens are rounded
to the class dtype (`set_dtype`; the store's exact dtype) before they are staged, stored or
quantized, so a packed block does not depend on which of its tokens waited in the staging buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.exact import ExactTensor
from ..quant.spec import QuantSpec
from .exact_buffer import ExactBuffer, ExactChunks
from .pages import PagedStore, SegmentTuple


class ClassStore:
    """Keys and values of one class, (batch, kv_heads, tokens, head_dim) each."""

    def __init__(
        self,
        key: QuantSpec | None,
        value: QuantSpec | None,
        page_tokens: int,
        block_size: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.block_size = block_size
        self.exact = key is None and value is None
        if self.exact:  # chunks without unused rows (no page tail)
            self.pages_k, self.pages_v = ExactChunks(), ExactChunks()
            self.stage_k = self.stage_v = None
        else:
            self.pages_k, self.pages_v = (
                PagedStore(key, block_size, page_tokens),
                PagedStore(value, block_size, page_tokens),
            )
            self.stage_k, self.stage_v = ExactBuffer(block_size, step=1), ExactBuffer(block_size, step=1)
        self.set_dtype(dtype)

    @property
    def num_tokens(self) -> int:
        staged = self.stage_k.num_tokens if self.stage_k is not None else 0
        return self.pages_k.num_tokens + staged

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        """Store tokens in ``dtype`` from now on (None: their own dtype); staged tokens are converted."""
        self.dtype = dtype
        for buf in self.buffers():
            if not isinstance(buf, PagedStore):
                buf.set_dtype(dtype)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype is None else x.to(self.dtype)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``key``, ``value`` (batch, kv_heads, n, head_dim); whole blocks are quantized now."""
        if key.shape[-2] == 0:
            return
        key, value = self._cast(key), self._cast(value)
        if self.exact:
            self.pages_k.append(key)
            self.pages_v.append(value)
            return
        for stage, pages, new in ((self.stage_k, self.pages_k, key), (self.stage_v, self.pages_v, value)):
            held = stage.view()
            pending = new if held is None else torch.cat([held.to(new.dtype), new], dim=-2)
            full = pending.shape[-2] // self.block_size * self.block_size
            if full:  # packed pages quantize from float32 (of the rounded tokens); exact pages keep them
                block = pending[:, :, :full]
                pages.append(block if pages.spec is None else block.float())
            stage.assign(pending[:, :, full:])

    def segments(self) -> list[SegmentTuple]:
        """The held tokens as segments: packed pages, then the staging buffer."""
        if self.exact:
            return [
                (ExactTensor(k), ExactTensor(v), k.shape[-2])
                for k, v in zip(self.pages_k.views(), self.pages_v.views(), strict=True)
            ]
        out: list[SegmentTuple] = [
            (k, v, k.num_tokens) for k, v in zip(self.pages_k.filled(), self.pages_v.filled(), strict=True)
        ]
        if self.stage_k is not None and self.stage_k.num_tokens:
            out.append(
                (ExactTensor(self.stage_k.view()), ExactTensor(self.stage_v.view()), self.stage_k.num_tokens)
            )
        return out

    def parts(self, name: str) -> dict[str, int]:
        """Bytes held, by part, prefixed with the class ``name``."""
        out = {f"{name}_keys": self.pages_k.nbytes, f"{name}_values": self.pages_v.nbytes}
        if self.stage_k is not None:
            out[f"{name}_staging"] = self.stage_k.nbytes + self.stage_v.nbytes
        return out

    def buffers(self) -> list:
        return [b for b in (self.pages_k, self.pages_v, self.stage_k, self.stage_v) if b is not None]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers():
            buf.map_batch(fn)

    def clear(self) -> None:
        for buf in self.buffers():
            buf.clear()
