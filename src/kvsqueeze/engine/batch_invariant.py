"""Batch-invariant matrix products: a token's numbers do not depend on what else the step holds.

A CPU GEMM (oneDNN / MKL behind ``torch.nn.functional.linear``) picks its blocking from the
problem's shape: the same row multiplied by the same weight gives results that differ in the last
bits when the batch has 1, 2–15, 16–56 or more rows (measured on this project's 2-core machine for
the embedded model's 576x1536 ``down_proj``). With an exact cache those bits rarely change a greedy
token; a quantized cache amplifies them — a key a few ULPs to the other side of a rounding boundary
gets another 4-bit code — so under load a request's answer could differ from its answer alone.

`BatchInvariantLinear` removes the cause, as vLLM's ``VLLM_BATCH_INVARIANT`` and SGLang's
``--enable-deterministic-inference`` do on GPUs: within a step, every ``F.linear`` multiplies its rows in
GEMMs of one fixed number of rows (the last tile padded with zeros), so a row's result depends only
on the row and the weight, never on the positions or contents of the other rows
(`tests/test_batch_invariant.py`). The tile is chosen by what the row is, never by the batch: a
prompt token's row goes in tiles of `PROMPT_ROWS` (large GEMMs, as fast per row as unpadded prompt
chunks), a generated token's row in tiles of `DECODE_ROWS` (little padding for small batches), and
a product over other rows (the output head over the sampled rows) in tiles of `OTHER_ROWS`. The
price is the padding: a batch of one decoding sequence computes `DECODE_ROWS` rows per product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Tile sizes, chosen by measurement on the 2-core machine (embedded model's shapes, 2 threads; a tile
# of another size would be as invariant, only slower):
PROMPT_ROWS = 128  # prompt tokens: per row as cheap as a 256-row GEMM (~35 us for a layer's linears)
DECODE_ROWS = 3  # generated tokens: a 3-row GEMM costs what a 1-row one does (~0.27 ms a layer), and
#                  16 decoding sequences in 6 tiles about what one 16-row GEMM does
_LINEAR = F.linear  # the function the mode intercepts (compared by identity)
OTHER_ROWS = 16  # the output head over the sampled rows: 13 ms for 16 rows vs 4.5 ms for one


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed in GEMMs of exactly ``rows`` rows.

    ``x`` (m, in_features), ``weight`` (out_features, in_features), ``bias`` (out_features,) or
    None; returns (m, out_features) in ``x``'s dtype. The last tile is padded with zeros."""
    m = x.shape[0]
    if m == rows:
        return F.linear(x, weight, bias)
    out = x.new_empty((m, weight.shape[0]))
    full = m - m % rows
    for start in range(0, full, rows):
        out[start : start + rows] = F.linear(x[start : start + rows], weight, bias)
    if full < m:
        tile = x.new_zeros((rows, x.shape[1]))
        tile[: m - full] = x[full:]
        out[full:] = F.linear(tile, weight, bias)[: m - full]
    return out


class BatchInvariantLinear:
    """Makes ``torch.nn.functional.linear`` — every ``nn.Linear`` of ``model`` — multiply in tiles of
    fixed row counts (`tiled_linear`) within `step`, through a `TorchFunctionMode` (PyTorch's public
    seam for intercepting functions: the model's modules are not touched).

    Products by the output head's weight (``model.get_output_embeddings()``: its rows are the
    sampled tokens, whose number may equal the step's by chance) and over a number of rows other
    than the step's are tiled by ``other_rows``. Raises ValueError for a tile size < 1."""

    def __init__(self, model: Any, other_rows: int = OTHER_ROWS) -> None:
        _check_rows(other_rows)
        head = model.get_output_embeddings()
        self.head_weight = getattr(head, "weight", None)
        self.other_rows = other_rows

    def step(self, groups: Sequence[tuple[torch.Tensor, int]], num_rows: int) -> _TileMode:
        """A context manager within which products over the step's ``num_rows`` rows (all leading
        dimensions of their input flattened) are tiled by ``groups`` — (row indices (k,) long
        tensor, rows per tile) pairs that cover each row exactly once. Raises ValueError when they
        do not."""
        for _, rows in groups:
            _check_rows(rows)
        groups = [(idx, r) for idx, r in groups if idx.numel()]
        covered = sum(idx.numel() for idx, _ in groups)
        if covered != num_rows or (
            len(groups) > 1 and torch.unique(torch.cat([idx for idx, _ in groups])).numel() != num_rows
        ):
            raise ValueError(
                f"groups: cover {covered} rows; allowed: each of the step's {num_rows} rows exactly once"
            )
        return _TileMode(groups, num_rows, self.head_weight, self.other_rows)


class _TileMode(TorchFunctionMode):
    """`BatchInvariantLinear.step`'s mode: ``F.linear`` → `tiled_linear` by the step's groups."""

    def __init__(
        self, groups: list[tuple[torch.Tensor, int]], num_rows: int, head: torch.Tensor | None, other: int
    ) -> None:
        super().__init__()
        self.groups, self.num_rows, self.head, self.other = groups, num_rows, head, other

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.num_rows or weight is self.head:
            out = tiled_linear(flat, weight, bias, self.other)
        elif len(self.groups) == 1:
            out = tiled_linear(flat, weight, bias, self.groups[0][1])
        else:
            out = flat.new_empty((flat.shape[0], weight.shape[0]))
            for idx, rows in self.groups:
                out[idx] = tiled_linear(flat[idx], weight, bias, rows)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _LINEAR:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dim() >= 1 and weight.dim() == 2 and x.is_floating_point():
                return self.linear(x, weight, bias)
        return func(*args, **kwargs)


def _check_rows(rows: Any) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows per tile: {rows!r}; allowed: an integer >= 1")


def step_groups(
    starts: Sequence[int], counts: Sequence[int], prompt_lens: Sequence[int], device: Any = None
) -> list[tuple[torch.Tensor, int]]:
    """The row classes of a ragged step: sequence ``i`` feeds its tokens ``starts[i]`` to
    ``starts[i] + counts[i] - 1`` end to end; a token before ``prompt_lens[i]`` is a prompt row
    (tiles of `PROMPT_ROWS`), a later one (generated, also when recomputed after preemption) a
    decode row (tiles of `DECODE_ROWS`)."""
    prompt: list[int] = []
    decode: list[int] = []
    row = 0
    for start, n, plen in zip(starts, counts, prompt_lens, strict=True):
        split = min(max(plen - start, 0), n)
        prompt += range(row, row + split)
        decode += range(row + split, row + n)
        row += n
    return [
        (torch.tensor(prompt, dtype=torch.long, device=device), PROMPT_ROWS),
        (torch.tensor(decode, dtype=torch.long, device=device), DECODE_ROWS),
    ]
