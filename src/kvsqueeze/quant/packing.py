"""Bit-packing of integer codes into uint8 along the last dimension.

Layout ("planar"): for ``bits`` in {2, 4, 8} with ``n = 8 // bits`` codes per byte and a last
dimension of ``size`` codes, byte ``j`` holds the codes of elements ``j + k * size / n`` for
``k = 0 .. n-1`` at bit offset ``k * bits``. Unpacking is therefore ``n`` contiguous slices,
each one shift and one mask away from the packed bytes, which is what a reader (torch or a
fused kernel) wants.

3-bit codes are packed for real: 8 codes in 3 bytes. Byte plane ``p`` (``p = 0, 1, 2``) of
group ``j`` holds bits ``8p .. 8p+7`` of the 24-bit word ``sum_k code[j + k * size / 8] << 3k``.
"""

from __future__ import annotations

import torch


def packed_size(size: int, bits: int) -> int:
    """Bytes needed for ``size`` codes of ``bits`` bits (``size`` must tile whole bytes)."""
    return size * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (values < 2**bits) of shape (..., size) into uint8 (..., size * bits / 8)."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 3:
        return _pack3(codes)
    n = 8 // bits
    planes = codes.to(torch.uint8).unflatten(-1, (n, -1))
    out = planes[..., 0, :].clone()
    for k in range(1, n):
        out |= planes[..., k, :] << (k * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `pack`: uint8 (..., size * bits / 8) -> codes (..., size).

    With ``out`` (any dtype, shape (..., size)), the codes are written there, converted to its
    dtype, and ``out`` is returned; this avoids a temporary full-size tensor.
    """
    size = packed.shape[-1] * 8 // bits
    if out is None:
        out = torch.empty(*packed.shape[:-1], size, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return out.copy_(packed)
    if bits == 3:
        return _unpack3(packed, out)
    n, mask = 8 // bits, (1 << bits) - 1
    width = size // n
    for k in range(n):
        plane = packed if k == 0 else packed >> (k * bits)
        if k < n - 1:
            plane = plane & mask
        out[..., k * width : (k + 1) * width].copy_(plane)
    return out


def _pack3(codes: torch.Tensor) -> torch.Tensor:
    planes = codes.to(torch.int32).unflatten(-1, (8, -1))
    word = planes[..., 0, :].clone()
    for k in range(1, 8):
        word |= planes[..., k, :] << (3 * k)
    return torch.cat([((word >> (8 * p)) & 0xFF).to(torch.uint8) for p in range(3)], dim=-1)


def _unpack3(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int32).unflatten(-1, (3, -1))
    word = b[..., 0, :] | (b[..., 1, :] << 8) | (b[..., 2, :] << 16)
    width = word.shape[-1]
    for k in range(8):
        out[..., k * width : (k + 1) * width].copy_((word >> (3 * k)) & 7)
    return out
