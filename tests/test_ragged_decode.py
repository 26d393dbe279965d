"""`fused_attention_many` (the engine's decode kernel call): each problem's result equals a call of
its own to the bit, whatever the lengths (one tile to several splits of the tokens), and errors of
one problem are raised, not swallowed by the threads."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.kernels import cpu
from kvsqueeze.kernels.build import cpu_extension
from kvsqueeze.kernels.sources import fp8_tables, source_meta
from kvsqueeze.quant.exact import ExactTensor
from kvsqueeze.quant.packed import PackedTensor
from kvsqueeze.quant.spec import Axis, QuantSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels not built")


def _problem(g: torch.Generator, history: int, packed: bool) -> tuple:
    """query (1, 9, 1, 64) over [history tokens (packed int4 or exact fp16) | 1 new exact token]."""
    query = torch.randn(1, 9, 1, 64, generator=g)
    k, v = (torch.randn(1, 3, history, 64, generator=g) for _ in range(2))
    if packed:
        hist_k = PackedTensor.from_float(k, QuantSpec(bits=4, axis=Axis.CHANNEL, group_size=64))
        hist_v = PackedTensor.from_float(v, QuantSpec(bits=4, axis=Axis.TOKEN, group_size=64))
    else:
        hist_k, hist_v = ExactTensor(k.half()), ExactTensor(v.half())
    new_k, new_v = (ExactTensor(torch.randn(1, 3, 1, 64, generator=g)) for _ in range(2))
    tensors: list[torch.Tensor] = []
    meta = source_meta(hist_k, tensors) + source_meta(hist_v, tensors)
    meta += source_meta(new_k, tensors) + source_meta(new_v, tensors)
    return query, tensors, meta, [history, 1]


@pytest.mark.parametrize("threads", [1, 2])
def test_many_equals_one_call_each(threads: int) -> None:
    ext = cpu_extension()
    g = torch.Generator().manual_seed(3)
    problems = [
        _problem(g, n, packed)
        for n, packed in [(64, True), (4992, True), (1, False), (3001, False), (704, True)]
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = [
            ext.fused_attention(q, t, m, n, None, 0.125, True, fp8_tables(), None) for q, t, m, n in problems
        ]
        many = ext.fused_attention_many(
            [p[0] for p in problems], [p[1] for p in problems], [p[2] for p in problems], [p[3] for p in problems],
            0.125, fp8_tables(),
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert len(many) == len(alone)
    for a, b in zip(alone, many, strict=True):
        assert a.shape == b.shape == (1, 1, 9, 64)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_many_raises_the_error_of_a_bad_problem() -> None:
    ext = cpu_extension()
    g = torch.Generator().manual_seed(4)
    good = _problem(g, 128, True)
    bad = _problem(g, 128, True)
    bad = (bad[0], bad[1], bad[2], [256, 1])  # more tokens than the tensors hold
    with pytest.raises(RuntimeError, match="kvsqueeze"):
        ext.fused_attention_many(
            [good[0], bad[0]], [good[1], bad[1]], [good[2], bad[2]], [good[3], bad[3]], 0.125, fp8_tables()
        )
