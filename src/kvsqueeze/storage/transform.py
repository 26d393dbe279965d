"""`PageTransform`: what happens to keys or values on their way into packed pages and back out.

Encode (before quantization), for tokens whose first one sits at cache position ``start``:

1. pre-RoPE (keys, KVQuant): undo the model's rotary embedding at each token's position;
2. rotation (QuaRot / llama.cpp): ``x @ Q`` with a seeded orthogonal ``Q`` (`quant.rotation`).

Decode (after dequantization, in place) runs the inverse steps in reverse order, so the reference
path hands attention ordinary post-RoPE keys and values: ``Q @ Q.T == I`` and RoPE is a rotation,
so attention is unchanged up to the quantization error. Exact tokens (sinks, residual window, new
tokens) never pass through a transform.

Positions are cache indices: packed token ``j`` of a plain store sits at ``position_offset + j``
(the sinks come first); the classes of a token policy give each token's position instead (a
(batch, kv_heads, n) tensor, their tokens are not contiguous). For left-padded batches this differs from the model's position ids by the padding, which
only shifts the pre-RoPE domain of those rows: decode still inverts encode exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..quant.rope import Rope
from ..quant.rotation import rotate, rotation_matrix, unrotate_


@dataclass(frozen=True)
class PageTransform:
    """``rotation`` (head_dim, head_dim) orthogonal or None; ``rope`` for pre-RoPE keys or None."""

    rotation: torch.Tensor | None = None
    rope: Rope | None = None
    position_offset: int = 0

    @property
    def is_identity(self) -> bool:
        return self.rotation is None and self.rope is None

    def tensors(self) -> list[torch.Tensor]:
        """The constants this transform holds (rotation matrix, RoPE frequencies); shared by the
        layers of a cache (and by caches of one head_dim and seed), so counted once per cache."""
        return [
            t for t in (self.rotation, None if self.rope is None else self.rope.inv_freq) if t is not None
        ]

    def encode(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """``x`` (batch, kv_heads, n, head_dim), packed tokens ``start .. start + n - 1`` (or at the
        cache positions ``start`` (batch, kv_heads, n) int), transformed."""
        if self.rope is not None:
            x = self.rope.apply(x, self._positions(start), inverse=True)
        if self.rotation is not None:
            x = rotate(x, self.rotation)
        return x

    def decode_(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """In place: the inverse of `encode` on dequantized ``x`` (batch, kv_heads, n, head_dim)."""
        if self.rotation is not None:
            unrotate_(x, self.rotation)
        if self.rope is not None:
            x.copy_(self.rope.apply(x, self._positions(start)))
        return x

    def _positions(self, start: int | torch.Tensor) -> int | torch.Tensor:
        """Cache positions: ``position_offset + start`` for a packed index, given ones as they are."""
        return start if isinstance(start, torch.Tensor) else self.position_offset + start


@dataclass(frozen=True)
class PartTransform:
    """The page transform of one stored part (a `PagedPart` of keys or values), for readers that undo
    it themselves instead of calling `PageTransform.decode_` on dequantized tokens (the fused kernels
    rotate the query or the output, and apply RoPE to each key tile).

    ``start``: where the part's tokens sit, as `PageTransform.decode_` takes it: the packed index of
    its first token (an int; token ``t`` at cache position ``transform.position_offset + start + t``)
    or the cache positions of its tokens, (batch, kv_heads, tokens) int32.
    """

    transform: PageTransform
    start: int | torch.Tensor = 0

    @property
    def rotation(self) -> torch.Tensor | None:
        """(head_dim, head_dim) float32 ``Q`` with stored ``x' = x @ Q``, or None."""
        return self.transform.rotation

    @property
    def rope(self) -> Rope | None:
        """The RoPE undone before storing (pre-RoPE keys), or None."""
        return self.transform.rope

    @property
    def first_position(self) -> int:
        """Cache position of token 0 when ``start`` is an int."""
        assert isinstance(self.start, int), "per-token positions: see start"
        return self.transform.position_offset + self.start

    def restore_(self, out: torch.Tensor) -> torch.Tensor:
        """In place: undo the transform on the part's tokens dequantized into ``out`` (batch, kv_heads,
        tokens, head_dim), the first of them the part's first."""
        start = self.start if isinstance(self.start, int) else self.start[:, :, : out.shape[-2]]
        return self.transform.decode_(out, start)


def constants_nbytes(layer_configs: list[CacheConfig], head_dim: int) -> int:
    """Bytes of the transform constants a cache of these layer configs holds (what
    `SqueezedCache.constants_nbytes` walks): one float32 (head_dim, head_dim) rotation per distinct
    seed of a rotating layer, and one (head_dim / 2,) float32 RoPE frequency vector when some layer
    keeps pre-RoPE keys (assuming the model has standard RoPE)."""
    seeds = {c.rotation_seed for c in layer_configs if c.rotate_keys or c.rotate_values}
    rope = any(c.pre_rope_keys for c in layer_configs)
    return len(seeds) * head_dim * head_dim * 4 + (head_dim // 2 * 4 if rope else 0)


def layer_transforms(
    config: CacheConfig, head_dim: int, rope: Rope | None
) -> tuple[PageTransform | None, PageTransform | None]:
    """Key and value transforms of one layer's config; ``rope`` None disables pre-RoPE keys."""
    q = rotation_matrix(head_dim, config.rotation_seed)
    key = PageTransform(
        q if config.rotate_keys else None,
        rope if config.pre_rope_keys else None,
        position_offset=config.sink_tokens,
    )
    value = PageTransform(q if config.rotate_values else None)
    return (None if key.is_identity else key), (None if value.is_identity else value)
