"""`PagedStore`: one layer's packed keys (or values), in pages of ``page_tokens`` tokens; the last
page grows with its tokens (whole blocks), so the bytes held are the bytes of the tokens stored.

A page holds ``page_tokens`` tokens in one format (`PackedTensor`, or `ExactTensor` when the spec
is None). An optional `PageTransform` (pre-RoPE, rotation) is applied before quantization; the
readers undo it with `restore_`. Tokens are appended in whole blocks, written once and never re-quantized; appending
costs O(new tokens) and never copies what is already stored.

Metadata range (`quant.overflow`): when a block's scales, zero points or outlier values do not
fit the spec's ``scale_dtype`` (K/V beyond ±65504 with float16 metadata), the store switches to
float32 metadata from that block on: ``spec`` becomes the widened spec, the existing pages are
converted (exactly, once) and a `MetadataOverflowWarning` names the store, the magnitude and the
dtype. All pages then share one format and `nbytes` counts the wider metadata.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..kernels.dequantize import dequantize_into
from ..quant.exact import ExactTensor
from ..quant.overflow import MetadataOverflowWarning, metadata_amax
from ..quant.packed import PackedTensor
from ..quant.spec import QuantSpec
from .transform import PageTransform

Page = PackedTensor | ExactTensor


class PagedStore:
    """Packed history of one tensor kind of one layer, shape (batch, kv_heads, num_tokens, head_dim).

    ``name`` (e.g. ``"layer 3 keys"``) only labels the metadata-overflow warning.
    """

    def __init__(
        self,
        spec: QuantSpec | None,
        page_tokens: int,
        transform: PageTransform | None = None,
        name: str = "packed store",
    ) -> None:
        self.spec = spec
        self.name = name
        self.page_tokens = page_tokens
        self.transform = None if transform is None or transform.is_identity or spec is None else transform
        self.pages: list[Page] = []
        self.num_tokens = 0

    def _new_page(self, like: torch.Tensor, tokens: int) -> Page:
        b, h, _, d = like.shape
        if self.spec is None:
            return ExactTensor.empty(b, h, tokens, d, like.dtype, like.device)
        return PackedTensor.empty(b, h, tokens, d, self.spec, like.device)

    def _room(self, like: torch.Tensor, page_idx: int, needed: int) -> Page:
        """Page ``page_idx`` with room for ``needed`` tokens: the last page grows with its tokens
        (whole blocks, up to ``page_tokens``), so a store holds the bytes of its tokens, not of a
        page; earlier pages are full and never touched again."""
        if page_idx == len(self.pages):
            self.pages.append(self._new_page(like, needed))
        page = self.pages[page_idx]
        held = page.num_tokens
        if held < needed:
            grown = self._new_page(like, needed)
            used = min(held, self.num_tokens - page_idx * self.page_tokens)
            grown.slice_tokens(0, used).copy_(page.slice_tokens(0, used))
            self.pages[page_idx] = page = grown
        return page

    def _encode(self, x: torch.Tensor) -> Page:
        return ExactTensor(x) if self.spec is None else PackedTensor.from_float(x, self.spec)

    def append(self, x: torch.Tensor) -> None:
        """Quantize and store ``x`` (batch, kv_heads, n, head_dim), n a whole number of blocks."""
        if self.transform is not None:
            x = self.transform.encode(x, self.num_tokens)
        if self.spec is None and self.pages:  # exact pages share one dtype, widened by their tokens
            wide = torch.promote_types(self.pages[0].values.dtype, x.dtype)
            if wide != self.pages[0].values.dtype:
                self.pages = [ExactTensor(page.values.to(wide)) for page in self.pages]
            x = x.to(wide)
        encoded = self._encode(x)
        if isinstance(encoded, PackedTensor) and encoded.spec is not self.spec:
            self._widen(encoded)
        done = 0
        while done < x.shape[-2]:
            page_idx, offset = divmod(self.num_tokens, self.page_tokens)
            n = min(self.page_tokens - offset, x.shape[-2] - done)
            page = self._room(x, page_idx, offset + n)
            page.slice_tokens(offset, offset + n).copy_(encoded.slice_tokens(done, done + n))
            done += n
            self.num_tokens += n

    def preview(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` (batch, kv_heads, n, head_dim), n whole blocks, as it reads back once appended here
        (quantized, dequantized, transform undone), in ``dtype``; nothing is stored. What the assisted
        decoding's verification reads for tokens plain decoding would already have quantized."""
        encoded = self._encode(x if self.transform is None else self.transform.encode(x, self.num_tokens))
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        dequantize_into(encoded, out)
        return self.restore_(out, self.num_tokens)

    def _widen(self, encoded: PackedTensor) -> None:
        """Switch to the (float32) metadata of ``encoded``, whose own metadata overflowed this spec."""
        assert self.spec is not None
        old, new = self.spec, encoded.spec
        warnings.warn(
            f"{self.name}: K/V metadata (scales, zero points, outlier values) of magnitude up to "
            f"{metadata_amax(encoded.scale, encoded.zero, encoded.outlier_value):.6g} overflow scale_dtype "
            f"{old.scale_dtype} (largest finite {torch.finfo(old.torch_scale_dtype).max:.6g}); this store "
            f"keeps {new.scale_dtype} metadata from now on ({old.bits_per_element:g} -> "
            f"{new.bits_per_element:g} bits per element)",
            MetadataOverflowWarning,
            stacklevel=3,
        )
        self.spec = new
        packed = [page for page in self.pages if isinstance(page, PackedTensor)]
        assert len(packed) == len(self.pages), "a quantized store holds packed pages only"
        self.pages = [page.with_metadata_of(new) for page in packed]

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
        """Bytes held by all pages (the last one holds just its tokens)."""
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
