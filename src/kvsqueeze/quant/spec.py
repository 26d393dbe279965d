"""What a quantized K or V tensor looks like: format, bits, grouping axis, group size.

A `QuantSpec` is a frozen value object. It validates itself, knows its own size
(`bits_per_element`, `bytes_per_token`) and round-trips through plain dicts.

Grouping axes, for a tensor of shape (batch, kv_heads, tokens, head_dim):

* ``Axis.TOKEN`` (per-token): one scale (and zero point) per token per ``group_size``
  consecutive channels of ``head_dim``. KIVI's choice for values.
* ``Axis.CHANNEL`` (per-channel): one scale per channel per ``group_size`` consecutive
  tokens. KIVI's choice for keys, whose outliers live in fixed channels.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

import torch

INT_BITS = (2, 3, 4, 8)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Format(enum.Enum):
    """How one element is coded."""

    INT = "int"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"


class Axis(enum.Enum):
    """Along which axis elements share a scale (see module docstring)."""

    TOKEN = "token"
    CHANNEL = "channel"


def _choice(enum_type: type[enum.Enum], field: str, value: object) -> enum.Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = [m.value for m in enum_type]
        raise ValueError(f"{field}: {value!r} is not supported; allowed: {allowed}") from None


@dataclass(frozen=True)
class QuantSpec:
    """Quantization of one tensor kind (keys or values).

    Args:
        bits: bits per code, one of 2, 3, 4, 8 (8 for FP8 formats).
        axis: ``"token"`` or ``"channel"`` grouping (see module docstring).
        group_size: elements sharing one scale: channels (per-token) or tokens (per-channel).
        symmetric: symmetric codes (scale only) instead of scale + zero point.
        format: ``"int"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"`` (FP8 is symmetric, scale only).
        scale_dtype: dtype of the stored scales and zero points.
    """

    bits: int = 4
    axis: Axis = Axis.TOKEN
    group_size: int = 64
    symmetric: bool = False
    format: Format = Format.INT
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", _choice(Format, "format", self.format))
        object.__setattr__(self, "axis", _choice(Axis, "axis", self.axis))
        is_int = isinstance(self.bits, int) and not isinstance(self.bits, bool)  # not 4.0 nor True
        if self.format is Format.INT:
            if not is_int or self.bits not in INT_BITS:
                raise ValueError(
                    f"bits: {self.bits!r} is not supported for integer codes; allowed: {INT_BITS}"
                )
        elif not is_int or self.bits != 8:
            raise ValueError(f"bits: {self.bits!r} is not supported for {self.format.value}; allowed: (8,)")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size!r} must be a positive integer")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype: {self.scale_dtype!r} is not supported; allowed: {list(SCALE_DTYPES)}"
            )

    @property
    def is_fp8(self) -> bool:
        return self.format is not Format.INT

    @property
    def has_zero(self) -> bool:
        """Whether a zero point (offset) is stored beside the scale."""
        return self.format is Format.INT and not self.symmetric

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def metadata_bytes_per_group(self) -> int:
        """Bytes of scale (+ zero point) stored per group."""
        itemsize = torch.empty(0, dtype=self.torch_scale_dtype).element_size()
        return itemsize * (2 if self.has_zero else 1)

    @property
    def bits_per_element(self) -> float:
        """Average stored bits per element, codes plus scales and zero points."""
        return self.bits + 8 * self.metadata_bytes_per_group / self.group_size

    def check_head_dim(self, head_dim: int, field: str = "group_size") -> None:
        """Raise if codes of this spec cannot tile a head of ``head_dim`` channels."""
        codes_per_byte = 8 // self.bits if 8 % self.bits == 0 else 8
        if head_dim % codes_per_byte:
            raise ValueError(
                f"head_dim: {head_dim} cannot be bit-packed at {self.bits} bits; it must be a multiple of "
                f"{codes_per_byte}"
            )
        if self.axis is Axis.TOKEN and head_dim % self.group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ValueError(
                f"{field}: {self.group_size} does not divide head_dim {head_dim} (per-token groups run along "
                f"head_dim); allowed: {divisors}"
            )

    def check_block_size(self, block_size: int, field: str = "group_size") -> None:
        """Raise if per-channel groups do not tile a block of ``block_size`` tokens."""
        if self.axis is Axis.CHANNEL and block_size % self.group_size:
            divisors = [d for d in range(1, block_size + 1) if block_size % d == 0]
            raise ValueError(
                f"{field}: {self.group_size} does not divide block_size {block_size} (per-channel groups run "
                f"along tokens within a block); allowed: {divisors}"
            )

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> float:
        """Stored bytes per token for one layer's keys (or values): codes + scales + zero points."""
        return num_kv_heads * head_dim * self.bits_per_element / 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axis"] = self.axis.value
        d["format"] = self.format.value
        return d

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"QuantSpec: unknown keys {sorted(unknown)}; allowed: {list(cls.__dataclass_fields__)}"
            )
        return cls(**data)
