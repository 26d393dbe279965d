"""`ExactTensor`: the no-quantization format, with the same interface as `PackedTensor`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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
