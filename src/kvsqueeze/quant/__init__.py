"""Quantization scheme: pure torch, no transformers."""

from .overflow import MetadataOverflowWarning, metadata_overflows, safe_magnitude
from .packed import PackedTensor
from .packing import pack, unpack
from .primitives import choose_qparams, dequantize, quantize
from .spec import Axis, Format, QuantSpec

__all__ = [
    "Axis",
    "Format",
    "MetadataOverflowWarning",
    "PackedTensor",
    "QuantSpec",
    "choose_qparams",
    "dequantize",
    "metadata_overflows",
    "pack",
    "quantize",
    "safe_magnitude",
    "unpack",
]
