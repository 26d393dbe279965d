"""`PagedStore`: one layer's packed keys (or values), in preallocated pages that grow one at a time.

A page holds ``page_tokens`` tokens in one format (`PackedTensor`, or `ExactTensor` when the spec
is None). An optional `PageTransform` (pre-RoPE, rotation) is applied before quantization; the
readers undo it with `restore_`. Tokens are appended in whole blocks, written once and never re-quantized; appending
costs O(new tokens) and never copies what is already stored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..quant.spec import QuantSpec
from .transform import PageTransform

Page = PackedTensor | ExactTensor


class PagedStore:
    """Packed history of one tensor kind of one layer, shape (batch, kv_heads, num_tokens, head_dim)."""

    def __init__(
        self, spec: QuantSpec | None, page_tokens: int, transform: PageTransform | None = None
    ) -> None:
        self.spec = spec
        self.page_tokens = page_tokens
        self.transform = None if transform is None or transform.is_identity or spec is None else transform
        self.pages: list[Page] = []
        self.num_tokens = 0

    def _new_page(self, like: torch.Tensor) -> Page:
        b, h, _, d = like.shape
        if self.spec is None:
            return ExactTensor.empty(b, h, self.page_tokens, d, like.dtype, like.device)
        return PackedTensor.empty(b, h, self.page_tokens, d, self.spec, like.device)

    def _encode(self, x: torch.Tensor) -> Page:
        return ExactTensor(x) if self.spec is None else PackedTensor.from_float(x, self.spec)

    def append(self, x: torch.Tensor) -> None:
        """Quantize and store ``x`` (batch, kv_heads, n, head_dim), n a whole number of blocks."""
        if self.transform is not None:
            x = self.transform.encode(x, self.num_tokens)
        encoded = self._encode(x)
        done = 0
        while done < x.shape[-2]:
            page_idx, offset = divmod(self.num_tokens, self.page_tokens)
            if page_idx == len(self.pages):
                self.pages.append(self._new_page(x))
            n = min(self.page_tokens - offset, x.shape[-2] - done)
            self.pages[page_idx].slice_tokens(offset, offset + n).copy_(encoded.slice_tokens(done, done + n))
            done += n
            self.num_tokens += n

    def filled(self) -> list[Page]:
        """Views of the stored tokens, page by page (what a fused reader iterates over)."""
        out = []
        for i, page in enumerate(self.pages):
            n = min(self.page_tokens, self.num_tokens - i * self.page_tokens)
            if n > 0:
                out.append(page.slice_tokens(0, n))
        return out

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write all stored tokens, dequantized, into ``out`` (batch, kv_heads, num_tokens, head_dim)."""
        start = 0
        for page in self.filled():
            page.dequantize(out=out[:, :, start : start + page.num_tokens])
            start += page.num_tokens
        return self.restore_(out, 0)

    def restore_(self, out: torch.Tensor, start: int) -> torch.Tensor:
        """In place: undo the transform on dequantized stored tokens ``start ..`` held in ``out``
        (batch, kv_heads, n, head_dim); a no-op without a transform."""
        return out if self.transform is None else self.transform.decode_(out, start)

    @property
    def nbytes(self) -> int:
        """Bytes held by all pages, including the unused tail of the last page."""
        return sum(page.nbytes for page in self.pages)

    def tensors(self) -> list[torch.Tensor]:
        """The storage of every page (for walks independent of `nbytes`)."""
        return [t for page in self.pages for t in page.tensors()]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (select, reorder, repeat) to every page."""
        self.pages = [page.map(fn) for page in self.pages]

    def clear(self) -> None:
        self.pages = []
        self.num_tokens = 0
