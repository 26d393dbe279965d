"""The no-quantization format: `ExactSpec` (its size, like `QuantSpec`) and `ExactTensor` (its values,
with the same interface as `PackedTensor`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ExactSpec:
    """Values kept as they are, in ``dtype``: the storage format of exact blocks, and the unit of every
    "as many bytes as an fp16 cache" formula (``FP16.bytes_per_token``).

    ``dtype`` None: not fixed yet; a `storage.block_pool.BlockPool` fixes it at its first write (the
    dtype of the tokens, already rounded to the cache's exact dtype) and widens it when wider tokens
    arrive. A `CacheConfig` says "exact" with a None key or value spec; `storage_spec` turns that
    into an `ExactSpec`.
    """

    dtype: torch.dtype | None = None

    is_exact = True
    is_plain = True  # the native kernels read exact values

    @property
    def itemsize(self) -> int:
        """Bytes of one element; ValueError while ``dtype`` is not fixed."""
        if self.dtype is None:
            raise ValueError(
                "ExactSpec: dtype None (not fixed yet) has no size; allowed: a torch float dtype"
            )
        return self.dtype.itemsize

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.itemsize

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> float:
        """Stored bytes per token of one layer's keys (or values): ``kv_heads x head_dim`` elements."""
        return float(num_kv_heads * head_dim * self.itemsize)

    @staticmethod
    def for_itemsize(itemsize: int) -> ExactSpec:
        """The float spec of ``itemsize`` bytes per element (2: float16, 4: float32, 8: float64)."""
        dtypes = {2: torch.float16, 4: torch.float32, 8: torch.float64}
        if itemsize not in dtypes:
            raise ValueError(f"exact_bytes: {itemsize!r}; allowed: {list(dtypes)}")
        return ExactSpec(dtypes[itemsize])

    def kv_bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes per token of keys and values over ``num_layers`` layers (``FP16``: an fp16 cache)."""
        return 2 * num_layers * round(self.bytes_per_token(num_kv_heads, head_dim))


FP16 = ExactSpec(torch.float16)
"""The baseline every ratio is measured against: an fp16 cache (transformers' DynamicCache in fp16)."""


def storage_spec(spec: Any) -> Any:
    """The storage format of a `CacheConfig` spec: a `QuantSpec` as it is, None (exact) as `ExactSpec()`."""
    return ExactSpec() if spec is None else spec


@dataclass
class ExactTensor:
    """Values kept as they are, shape (batch, kv_heads, tokens, head_dim)."""

    values: torch.Tensor

    @staticmethod
    def empty(
        batch_size: int,
        num_heads: int,
        num_tokens: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> ExactTensor:
        return ExactTensor(
            torch.empty(batch_size, num_heads, num_tokens, head_dim, dtype=dtype, device=device)
        )

    @property
    def num_tokens(self) -> int:
        return self.values.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def tensors(self) -> list[torch.Tensor]:
        return [self.values]

    def slice_tokens(self, start: int, stop: int) -> ExactTensor:
        return ExactTensor(self.values[:, :, start:stop])

    def copy_(self, other: ExactTensor) -> None:
        self.values.copy_(other.values)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExactTensor:
        return ExactTensor(fn(self.values))

    def dequantize(self, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if out is None:
            return self.values.to(dtype or self.values.dtype, copy=True)
        return out.copy_(self.values)
