"""Quantization scheme: pure torch, no transformers."""

from .packed import PackedTensor
from .packing import pack, unpack
from .primitives import choose_qparams, dequantize, quantize
from .spec import Axis, Format, QuantSpec

__all__ = [
    "Axis",
    "Format",
    "PackedTensor",
    "QuantSpec",
    "choose_qparams",
    "dequantize",
    "pack",
    "quantize",
    "unpack",
]
