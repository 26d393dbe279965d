"""`StateDict`: what a store holds, as named tensors plus small JSON values — the unit a file saves.

Every part of a layer store (`ExactBuffer`, `Staging`, `PagedStore`, the token classes, the
placements, `RowSinks`, `LayerStore`) writes its state with ``save_state(state)`` and reads it back
with ``load_state(state, device)``, under its own dotted prefix (`child`): e.g.
``layers.3.window.keys.data`` is the residual window's keys of layer 3. A part that is empty writes
no tensor, so the names present say what a cache held. Tensors are taken as they are stored
(contiguous CPU copies, dtypes kept), so loading gives back the same bits.

Loading refuses (`StateError`, a ValueError) a tensor or value that is missing or of another shape
than the reader needs, naming it: `storage.persist` has checked the file's checksum by then, so this
only meets files written by another version or by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..quant.exact import ExactSpec, ExactTensor
from ..quant.packed import PackedTensor
from ..quant.paged import Slab
from ..quant.spec import QuantSpec

SLAB_FIELDS = ("codes", "scale", "zero", "outlier_index", "outlier_value")
"""The tensors of packed blocks (`PackedTensor`); exact blocks hold one, ``values``."""


class StateError(ValueError):
    """Saved state that does not fit the store it is loaded into (a missing or misshapen entry)."""


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float16`` -> ``"float16"`` (None stays None)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def dtype_of(name: str | None, label: str) -> torch.dtype | None:
    """The torch dtype named ``name`` (`dtype_name`'s inverse); StateError naming ``label`` otherwise."""
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise StateError(f"{label}: dtype {name!r} is unknown; allowed: a torch dtype name such as 'float16'")
    return dtype


@dataclass
class StateDict:
    """Flat maps of saved ``tensors`` and JSON-able ``values`` by dotted name; ``prefix`` is where
    this view writes and reads (`child` adds a level)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""

    def child(self, name: str) -> StateDict:
        """The view of part ``name`` (shares the maps)."""
        return StateDict(self.tensors, self.values, f"{self.prefix}{name}.")

    def name(self, key: str) -> str:
        return self.prefix + key

    # --- writing ---------------------------------------------------------------------------------------
    def put(self, key: str, tensor: torch.Tensor | None) -> None:
        """Save ``tensor`` under ``key`` as a contiguous CPU tensor (None: nothing is written)."""
        if tensor is not None:
            self.tensors[self.name(key)] = tensor.detach().to("cpu").contiguous()

    def set(self, key: str, value: Any) -> None:
        """Save a JSON-able ``value`` (int, float, str, None, lists and dicts of them) under ``key``."""
        self.values[self.name(key)] = value

    # --- reading ---------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self.name(key) in self.tensors

    def take(self, key: str, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The tensor saved under ``key`` on ``device`` (None when the part wrote none: it was empty)."""
        tensor = self.tensors.get(self.name(key))
        return tensor if tensor is None or device is None else tensor.to(device)

    def need(
        self, key: str, device: torch.device | str | None = None, dims: int | None = None
    ) -> torch.Tensor:
        """The tensor saved under ``key`` (with ``dims`` dimensions when given); StateError if absent."""
        tensor = self.tensors.get(self.name(key))
        if tensor is None:
            raise StateError(f"state: tensor {self.name(key)!r} is missing")
        if dims is not None and tensor.dim() != dims:
            raise StateError(
                f"state: tensor {self.name(key)!r} has shape {tuple(tensor.shape)}; allowed: {dims} dimensions"
            )
        return tensor if device is None else tensor.to(device)

    def get(self, key: str, default: Any = None) -> Any:
        """The value saved under ``key`` (``default`` when absent)."""
        return self.values.get(self.name(key), default)

    def value(self, key: str) -> Any:
        """The value saved under ``key``; StateError if absent."""
        if self.name(key) not in self.values:
            raise StateError(f"state: value {self.name(key)!r} is missing")
        return self.values[self.name(key)]

    def count(self, key: str, minimum: int = 0) -> int:
        """The integer saved under ``key`` (>= ``minimum``); StateError otherwise."""
        v = self.value(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise StateError(f"state: value {self.name(key)!r} is {v!r}; allowed: an integer >= {minimum}")
        return v


def spec_state(spec: QuantSpec | ExactSpec) -> dict:
    """A block format as JSON: `QuantSpec.to_dict`, or ``{"exact": dtype}`` for an `ExactSpec`."""
    return {"exact": dtype_name(spec.dtype)} if spec.is_exact else spec.to_dict()


def spec_from_state(data: Any, label: str) -> QuantSpec | ExactSpec:
    """The inverse of `spec_state`; StateError naming ``label`` for anything else."""
    if not isinstance(data, dict):
        raise StateError(f"state: {label} is {data!r}; allowed: a block format (a JSON object)")
    if "exact" in data:
        return ExactSpec(dtype_of(data["exact"], label))
    try:
        return QuantSpec.from_dict(data)
    except ValueError as err:
        raise StateError(f"state: {label}: {err}") from None


def put_blocks(state: StateDict, blocks: Slab, spec: QuantSpec | ExactSpec) -> None:
    """Write ``blocks`` (n, kv_heads, block_size, ...) of format ``spec``: ``values`` (exact) or the
    `SLAB_FIELDS` the format has."""
    if spec.is_exact:
        state.put("values", blocks.values)
        return
    for name in SLAB_FIELDS:
        state.put(name, getattr(blocks, name))


def take_blocks(
    state: StateDict, spec: QuantSpec | ExactSpec, block_size: int, device: torch.device | str
) -> Slab:
    """The blocks `put_blocks` wrote, of format ``spec`` and ``block_size`` tokens, on ``device``.
    Raises StateError when a tensor is missing, extra, or of another shape or dtype than ``spec``
    stores for that many blocks."""
    if spec.is_exact:
        values = state.need("values", device, dims=4)
        if values.shape[2] != block_size or not values.is_floating_point():
            raise StateError(
                f"state: {state.name('values')} {tuple(values.shape)} {dtype_name(values.dtype)}; allowed: "
                f"(blocks, kv_heads, {block_size}, head_dim) floating point"
            )
        return ExactTensor(values)
    codes = state.need("codes", dims=4)
    n, heads, _, width = codes.shape
    head_dim = width * 8 // spec.bits
    expected = PackedTensor.empty(n, heads, block_size, head_dim, spec, torch.device("meta"))
    found = {}
    for name in SLAB_FIELDS:
        want, got = getattr(expected, name), state.take(name)
        if (want is None) != (got is None) or (
            got is not None and (got.shape != want.shape or got.dtype != want.dtype)
        ):
            have = "absent" if got is None else f"{tuple(got.shape)} {dtype_name(got.dtype)}"
            need = "absent" if want is None else f"{tuple(want.shape)} {dtype_name(want.dtype)}"
            raise StateError(
                f"state: {state.name(name)} is {have}; allowed for {n} blocks of this format: {need}"
            )
        found[name] = None if got is None else got.to(device)
    return PackedTensor(spec=spec, **found)
