"""What a quantized K or V tensor looks like: format, bits, grouping axis, group size.

A `QuantSpec` is a frozen value object. It validates itself, knows its own size
(`bits_per_element`, `bytes_per_token`) and round-trips through plain dicts.

Grouping axes, for a tensor of shape (batch, kv_heads, tokens, head_dim):

* ``Axis.TOKEN`` (per-token): one scale (and zero point) per token per ``group_size``
  consecutive channels of ``head_dim``. KIVI's choice for values.
* ``Axis.CHANNEL`` (per-channel): one scale per channel per ``group_size`` consecutive
  tokens. KIVI's choice for keys, whose outliers live in fixed channels.

Formats: integer codes, FP8 codes, and ``"nf"`` non-uniform codes (an index into a codebook of
``2**bits`` levels in [-1, 1], see `codebook`). Any format may keep ``outlier_fraction`` of the
entries of every block of ``outlier_tokens`` tokens exact in a sparse side store (`outliers`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch

from .codebook import check_codebook, normal_float

INT_BITS = (2, 3, 4, 8)
CODEBOOK_BITS = (2, 3, 4)
MAX_OUTLIER_FRACTION = 0.25
OUTLIER_INDEX_BYTES = 2  # int16 position of an outlier entry (`outliers`)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Format(enum.Enum):
    """How one element is coded."""

    INT = "int"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    NF = "nf"


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
        format: ``"int"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` (FP8 is symmetric, scale only) or ``"nf"``
            (codebook indices; asymmetric groups are normalized by their min and max).
        scale_dtype: dtype of the stored scales and zero points (and float32 also of the outlier
            values, which are float16 otherwise). A store whose K/V leave its range switches to
            float32 (`overflow`).
        codebook: ``"nf"`` only: ``2**bits`` increasing levels in [-1, 1] (e.g. fitted by
            ``kvsqueeze calibrate``); None uses the fixed normal-quantile codebook `normal_float`.
        outlier_fraction: fraction of entries per block kept exact aside (dense-and-sparse), in
            [0, 0.25]; 0 disables the side store.
        outlier_tokens: tokens per outlier block (must divide the cache's ``block_size``).
    """

    bits: int = 4
    axis: Axis = Axis.TOKEN
    group_size: int = 64
    symmetric: bool = False
    format: Format = Format.INT
    scale_dtype: str = "float16"
    codebook: tuple[float, ...] | None = None
    outlier_fraction: float = 0.0
    outlier_tokens: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", _choice(Format, "format", self.format))
        object.__setattr__(self, "axis", _choice(Axis, "axis", self.axis))
        is_int = isinstance(self.bits, int) and not isinstance(self.bits, bool)  # not 4.0 nor True
        if self.format is Format.INT:
            if not is_int or self.bits not in INT_BITS:
                raise ValueError(
                    f"bits: {self.bits!r} is not supported for integer codes; allowed: {INT_BITS}"
                )
        elif self.format is Format.NF:
            if not is_int or self.bits not in CODEBOOK_BITS:
                raise ValueError(
                    f"bits: {self.bits!r} is not supported for nf codes; allowed: {CODEBOOK_BITS}"
                )
        elif not is_int or self.bits != 8:
            raise ValueError(f"bits: {self.bits!r} is not supported for {self.format.value}; allowed: (8,)")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size!r} must be a positive integer")
        check_bool(self.symmetric, "symmetric")
        if not isinstance(self.scale_dtype, str) or self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype: {self.scale_dtype!r} is not supported; allowed: {list(SCALE_DTYPES)}"
            )
        self._check_codebook()
        frac = self.outlier_fraction
        if (
            isinstance(frac, bool)
            or not isinstance(frac, (int, float))
            or not 0 <= frac <= MAX_OUTLIER_FRACTION
        ):
            raise ValueError(f"outlier_fraction: {frac!r} must be a number in [0, {MAX_OUTLIER_FRACTION}]")
        tokens = self.outlier_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"outlier_tokens: {tokens!r} must be a positive integer")

    def _check_codebook(self) -> None:
        if self.codebook is None:
            return
        if self.format is not Format.NF:
            raise ValueError(
                f"codebook: given for format {self.format.value!r}; allowed only with format 'nf'"
            )
        numbers = isinstance(self.codebook, (tuple, list)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.codebook
        )
        if not numbers:
            raise ValueError(
                f"codebook: {self.codebook!r} must be a list of {2**self.bits} numbers in [-1, 1]"
            )
        levels = tuple(float(v) for v in self.codebook)
        check_codebook(levels, self.bits)
        object.__setattr__(self, "codebook", levels)

    @property
    def is_fp8(self) -> bool:
        return self.format in (Format.FP8_E4M3, Format.FP8_E5M2)

    @property
    def is_codebook(self) -> bool:
        return self.format is Format.NF

    @property
    def levels(self) -> tuple[float, ...]:
        """The codebook of an ``"nf"`` spec (given or the fixed NF one)."""
        assert self.is_codebook, "levels: only nf specs have a codebook"
        return self.codebook if self.codebook is not None else normal_float(self.bits)

    @property
    def has_outliers(self) -> bool:
        return self.outlier_fraction > 0

    is_exact = False  # `exact.ExactSpec` says True

    @property
    def is_plain(self) -> bool:
        """Integer or FP8 codes without a side store: what the native kernels read."""
        return not self.is_codebook and not self.has_outliers

    @property
    def has_zero(self) -> bool:
        """Whether a zero point (offset) is stored beside the scale."""
        return self.format in (Format.INT, Format.NF) and not self.symmetric

    def outlier_count(self, head_dim: int) -> int:
        """Entries kept exact per block of ``outlier_tokens`` tokens of one head."""
        if not self.has_outliers:
            return 0
        return math.ceil(self.outlier_fraction * self.outlier_tokens * head_dim - 1e-9)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def outlier_value_dtype(self) -> torch.dtype:
        """dtype of the exact values of the outlier side store: float32 with float32 metadata, else
        float16 (`outliers`)."""
        return torch.float32 if self.scale_dtype == "float32" else torch.float16

    @property
    def outlier_entry_bytes(self) -> int:
        """Bytes of one outlier entry: int16 position + value."""
        return OUTLIER_INDEX_BYTES + torch.empty(0, dtype=self.outlier_value_dtype).element_size()

    @property
    def metadata_bytes_per_group(self) -> int:
        """Bytes of scale (+ zero point) stored per group."""
        itemsize = torch.empty(0, dtype=self.torch_scale_dtype).element_size()
        return itemsize * (2 if self.has_zero else 1)

    @property
    def bits_per_element(self) -> float:
        """Average stored bits per element: codes, scales, zero points and the outlier side store
        (nominal ``outlier_fraction``; `bytes_per_token` counts the whole entries really kept)."""
        outliers = 8 * self.outlier_entry_bytes * self.outlier_fraction
        return self.bits + 8 * self.metadata_bytes_per_group / self.group_size + outliers

    def check_head_dim(self, head_dim: int, field: str = "group_size") -> None:
        """Raise if codes of this spec cannot tile a head of ``head_dim`` channels."""
        codes_per_byte = 8 // self.bits if 8 % self.bits == 0 else 8
        if head_dim % codes_per_byte:
            raise ValueError(
                f"head_dim: {head_dim} cannot be bit-packed at {self.bits} bits; it must be a multiple of "
                f"{codes_per_byte}"
            )
        if self.has_outliers and self.outlier_tokens * head_dim > 2**15:
            raise ValueError(
                f"outlier_tokens: {self.outlier_tokens} x head_dim {head_dim} positions do not fit the int16 "
                f"outlier index; allowed: outlier_tokens <= {2**15 // head_dim}"
            )
        if self.axis is Axis.TOKEN and head_dim % self.group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ValueError(
                f"{field}: {self.group_size} does not divide head_dim {head_dim} (per-token groups run along "
                f"head_dim); allowed: {divisors}"
            )

    def check_block_size(self, block_size: int, field: str = "group_size") -> None:
        """Raise if per-channel groups (or outlier blocks) do not tile a block of ``block_size`` tokens."""
        if self.has_outliers and block_size % self.outlier_tokens:
            prefix = field.rsplit(".", 1)[0] + "." if "." in field else ""
            raise ValueError(
                f"{prefix}outlier_tokens: {self.outlier_tokens} does not divide block_size {block_size}"
            )
        if self.axis is Axis.CHANNEL and block_size % self.group_size:
            divisors = [d for d in range(1, block_size + 1) if block_size % d == 0]
            raise ValueError(
                f"{field}: {self.group_size} does not divide block_size {block_size} (per-channel groups run "
                f"along tokens within a block); allowed: {divisors}"
            )

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> float:
        """Stored bytes per token for one layer's keys (or values): codes + scales + zero points +
        outlier side store (whole entries per block)."""
        dense = self.bits + 8 * self.metadata_bytes_per_group / self.group_size
        outliers = self.outlier_entry_bytes * self.outlier_count(head_dim) / self.outlier_tokens
        return num_kv_heads * (head_dim * dense / 8 + outliers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axis"] = self.axis.value
        d["format"] = self.format.value
        d["codebook"] = None if self.codebook is None else list(self.codebook)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        return from_fields(cls, data, "QuantSpec")


def from_fields(cls: type, data: object, label: str) -> Any:
    """``cls(**data)`` for the dataclass ``cls``; ValueError naming ``label`` when ``data`` is not a
    dict, has keys that are not its fields (listing the allowed ones) or misses a required one."""
    allowed = [f.name for f in fields(cls)]
    if not isinstance(data, dict):
        raise ValueError(
            f"{label}: expected a dict (JSON object) of its fields {allowed}, got "
            f"{type(data).__name__} {data!r:.80}"
        )
    unknown = sorted((k for k in data if k not in allowed), key=str)
    if unknown:
        raise ValueError(f"{label}: unknown keys {unknown}; allowed: {allowed}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{label}: missing keys {missing}; required: {required}")
    return cls(**data)


def as_spec(value: object, field: str) -> QuantSpec | None:
    """``value`` as a QuantSpec (given one, a dict of its fields, or None for exact); ValueError naming
    ``field`` otherwise (and prefixing the messages of a bad dict's fields)."""
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, dict):
        try:
            return QuantSpec.from_dict(value)
        except ValueError as err:
            raise ValueError(f"{field}: {err}") from None
    raise ValueError(f"{field}: {value!r} must be a QuantSpec, a dict of its fields, or None (exact)")


def check_int(value: object, field: str, minimum: int | None = None) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        allowed = {None: "an integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{field}: {value!r} must be {allowed}")


def check_bool(value: object, field: str) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}: {value!r} must be True or False (JSON true/false)")


def check_fraction(value: object, field: str, maximum: float = 1.0) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is a number (not a bool) in [0, ``maximum``]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= maximum:
        raise ValueError(f"{field}: {value!r} must be a fraction in [0, {maximum:g}]")
