"""`PackedKV`: what a fused-path cache layer returns from ``update`` instead of full K/V.

A tensor of shape (batch, kv_heads, total_tokens, head_dim) that holds no data of its own: it
carries the layer's `AttentionParts` (packed pages and exact parts, read in place). The kvsqueeze
attention reads the parts directly; any other torch operation on it (e.g. transformers' SDPA or
eager attention) first dequantizes it through the reference path, so every attention
implementation keeps working.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from .parts import AttentionParts

KEY, VALUE = 0, 1


class PackedKV(torch.Tensor):
    """Keys (``index`` 0) or values (1) of ``parts``, dequantized only if an operation needs them."""

    parts: AttentionParts
    index: int

    @staticmethod
    def __new__(cls, parts: AttentionParts, index: int) -> PackedKV:
        return torch.Tensor._make_wrapper_subclass(
            cls, parts.shape, dtype=parts.dtype, device=parts.device, requires_grad=False
        )

    def __init__(self, parts: AttentionParts, index: int) -> None:
        self.parts = parts
        self.index = index

    def dense(self) -> torch.Tensor:
        """The full-precision tensor (reference path: dequantized into the shared workspace)."""
        return self.parts.dense(self.index)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def unwrap(x: Any) -> Any:
            return x.dense() if isinstance(x, PackedKV) else x

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))

    def __repr__(self) -> str:  # the default repr would print (and so dequantize) the values
        kind = ("keys", "values")[self.index]
        return f"PackedKV({kind}, shape={tuple(self.shape)}, segments={len(self.parts.segments)})"


def packed_views(parts: AttentionParts) -> tuple[PackedKV, PackedKV]:
    """Key and value views of ``parts``."""
    return PackedKV(parts, KEY), PackedKV(parts, VALUE)


def parts_of(key: torch.Tensor) -> AttentionParts | None:
    """The parts behind a key returned by a fused-path cache layer; None for an ordinary tensor."""
    return key.parts if isinstance(key, PackedKV) else None
