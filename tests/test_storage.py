"""Tests for the token policy and the storage: `SinkWindowPolicy`, `PagedStore`, `LayerStore` and
the reference read path `materialize`. All comparisons are bit-exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvsqueeze.attention.reference import Workspace, materialize
from kvsqueeze.config import CacheConfig
from kvsqueeze.policies import SinkWindowPolicy, TokenPlan
from kvsqueeze.quant import PackedTensor, QuantSpec
from kvsqueeze.storage.exact_buffer import ExactBuffer, ExactChunks
from kvsqueeze.storage.layer import LayerStore
from kvsqueeze.storage.pages import PagedStore

HEADS, HEAD_DIM = 2, 64

# --------------------------------------------------------------------------------------- policy

PLAN_CASES = [
    # (sinks, window, block), (num_sinks, num_residual, num_new) -> (to_sinks, to_quantize)
    ("first-tokens-fill-sinks", (4, 64, 32), (0, 0, 2), (2, 0)),
    ("sinks-fill-across-calls", (4, 64, 32), (2, 0, 3), (2, 0)),
    ("sinks-full-then-window", (4, 64, 32), (4, 10, 1), (0, 0)),
    ("prefill-exactly-sinks", (4, 64, 32), (0, 0, 4), (4, 0)),
    ("prefill-fills-window", (4, 64, 32), (0, 0, 68), (4, 0)),
    ("prefill-one-over-window", (4, 64, 32), (0, 0, 69), (4, 32)),
    ("prefill-100", (4, 64, 32), (0, 0, 100), (4, 32)),
    ("prefill-much-larger", (4, 64, 32), (0, 0, 1000), (4, 960)),
    ("prefill-partial-sinks", (4, 64, 32), (1, 0, 200), (3, 160)),
    ("decode-window-full", (4, 64, 32), (4, 64, 1), (0, 32)),
    ("decode-after-flush", (4, 64, 32), (4, 33, 1), (0, 0)),
    ("chunk-of-7-overflows", (4, 64, 32), (4, 60, 7), (0, 32)),
    ("chunk-fits", (4, 64, 32), (4, 57, 7), (0, 0)),
    ("block-equals-window", (4, 64, 64), (4, 64, 1), (0, 64)),
    ("no-sinks", (0, 64, 32), (0, 0, 10), (0, 0)),
    ("no-sinks-overflow", (0, 64, 32), (0, 64, 40), (0, 64)),
    ("window-0-partial-block-stays", (0, 0, 32), (0, 0, 31), (0, 0)),
    ("window-0-one-block", (0, 0, 32), (0, 31, 1), (0, 32)),
    ("window-0-prefill", (0, 0, 32), (0, 0, 100), (0, 96)),
    ("window-0-with-sinks", (4, 0, 32), (0, 0, 70), (4, 64)),
    ("nothing-new", (4, 64, 32), (4, 64, 0), (0, 0)),
]


@pytest.mark.parametrize(
    ("policy_args", "state", "expected"), [pytest.param(p, s, e, id=i) for i, p, s, e in PLAN_CASES]
)
def test_plan_cases(policy_args: tuple, state: tuple, expected: tuple) -> None:
    assert SinkWindowPolicy(*policy_args).plan(*state) == TokenPlan(*expected)


@pytest.mark.parametrize(("sinks", "window", "block"), [(4, 64, 32), (0, 0, 16), (1, 32, 32), (8, 128, 64)])
def test_plan_invariants_over_random_steps(sinks: int, window: int, block: int) -> None:
    policy = SinkWindowPolicy(sinks, window, block)
    gen = torch.Generator().manual_seed(sinks + window)
    num_sinks = residual = packed = 0
    for step in range(300):
        new = int(torch.randint(0, 200 if step % 10 == 0 else 9, (), generator=gen))
        plan = policy.plan(num_sinks, residual, new)
        assert plan.to_quantize % block == 0  # never a partial block
        assert 0 <= plan.to_sinks <= new
        num_sinks += plan.to_sinks
        residual += new - plan.to_sinks
        assert plan.to_quantize <= residual
        residual -= plan.to_quantize
        packed += plan.to_quantize
        total = num_sinks + packed + residual
        assert num_sinks == min(sinks, total)
        if window:
            assert residual <= window
            if packed:
                assert residual >= window - block + 1
        else:
            assert residual < block
        # Flushing is lazy: a block leaves only when the window would overflow.
        if plan.to_quantize:
            assert residual + block > window


# ----------------------------------------------------------------------------------- paged store

STORE_SPECS = [
    pytest.param(QuantSpec(bits=4, axis="token", group_size=32), id="int4-token"),
    pytest.param(QuantSpec(bits=2, axis="channel", group_size=32), id="int2-channel"),
    pytest.param(QuantSpec(bits=3, axis="channel", group_size=16, symmetric=True), id="int3-channel-sym"),
    pytest.param(QuantSpec(bits=8, format="fp8_e4m3", axis="token", group_size=64), id="fp8-token"),
    pytest.param(None, id="exact"),
]
CHUNKS = [32, 96, 32, 64, 160, 32]  # page_tokens 64, block 32: fills, straddles and skips pages


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _reference(x: torch.Tensor, spec: QuantSpec | None, block: int = 32) -> torch.Tensor:
    """What storing ``x`` must give back: each block quantized on its own, or ``x`` itself."""
    if spec is None:
        return x
    parts = [PackedTensor.from_float(c, spec).dequantize(dtype=x.dtype) for c in x.split(block, dim=-2)]
    return torch.cat(parts, dim=-2)


@pytest.mark.parametrize("spec", STORE_SPECS)
def test_paged_store_appends_across_pages(spec: QuantSpec | None) -> None:
    store = PagedStore(spec, 32, page_tokens=64)
    batch = 2
    page_bytes = (
        PackedTensor.empty(batch, HEADS, 64, HEAD_DIM, spec, torch.device("cpu")).nbytes
        if spec
        else (batch * HEADS * 64 * HEAD_DIM * 4)
    )
    chunks, expected_parts, before = [], [], None
    for i, n in enumerate(CHUNKS):
        x = _randn(batch, HEADS, n, HEAD_DIM, seed=i)
        store.append(x)
        chunks.append(x)
        expected_parts.append(PackedTensor.from_float(x, spec).dequantize() if spec else x)
        total = sum(c.shape[-2] for c in chunks)

        assert store.num_tokens == total
        blocks = batch * total // 32  # one block per row and 32 tokens, 2 blocks per slab
        assert store.pool.num_blocks == blocks and len(store.pool.slabs) == -(-blocks // 2)
        held = sum(t.numel() * t.element_size() for t in store.tensors())
        assert store.nbytes == held == store.pool.nbytes + store.tables.nbytes
        assert store.pool.nbytes == total * page_bytes // 64  # the pool holds just its tokens' blocks
        assert [p.num_tokens for p in store.filled()] == [total]

        out = torch.full((batch, HEADS, total, HEAD_DIM), float("nan"))
        assert store.dequantize_into(out) is out
        assert torch.equal(out, torch.cat(expected_parts, dim=-2))
        if before is not None:  # history is never re-quantized
            assert torch.equal(out[:, :, : before.shape[-2]], before)
        before = out

    assert torch.equal(before, _reference(torch.cat(chunks, dim=-2), spec))  # block-wise == chunk-wise
    store.map_batch(lambda t: t.index_select(0, torch.tensor([1, 0])))
    swapped = torch.empty_like(before)
    assert torch.equal(store.dequantize_into(swapped), before.flip(0))
    store.clear()
    assert store.num_tokens == 0 and store.nbytes == 0


def test_paged_store_writes_into_workspace_slice() -> None:
    """dequantize_into a token slice of a larger buffer touches only that slice."""
    spec = QuantSpec(bits=4, axis="channel", group_size=32)
    store = PagedStore(spec, 32, page_tokens=64)
    x = _randn(2, HEADS, 96, HEAD_DIM, seed=1)
    store.append(x)
    buf = torch.zeros(2, HEADS, 200, HEAD_DIM)
    store.dequantize_into(buf[:, :, 50:146])
    assert torch.equal(buf[:, :, 50:146], _reference(x, spec))
    assert not buf[:, :, :50].any() and not buf[:, :, 146:].any()


def test_exact_buffer() -> None:
    buf = ExactBuffer(capacity=8)
    assert buf.view() is None and buf.nbytes == 0
    x = _randn(1, HEADS, 5, HEAD_DIM, seed=2)
    buf.append(x[:, :, :3])
    buf.append(x[:, :, 3:])
    assert torch.equal(buf.view(), x)
    assert buf.nbytes == HEADS * 8 * HEAD_DIM * 4  # allocated once, at capacity
    buf.assign(x[:, :, 4:])
    assert torch.equal(buf.view(), x[:, :, 4:])
    with pytest.raises(AssertionError, match="overflow"):
        buf.append(_randn(1, HEADS, 8, HEAD_DIM, seed=3))


def test_stepped_exact_buffer_holds_its_tokens() -> None:
    row = HEADS * HEAD_DIM * 4  # bytes of one token
    buf = ExactBuffer(capacity=None, step=4)
    x = _randn(1, HEADS, 40, HEAD_DIM, seed=4)
    buf.append(x[:, :, :3])
    assert buf.nbytes == 4 * row
    for i in range(3, 40):  # grows by reallocation, keeping what it held
        buf.append(x[:, :, i : i + 1])
    assert torch.equal(buf.view(), x) and buf.nbytes == 40 * row
    buf.assign(x[:, :, 30:33])  # shrinks to the new size
    assert torch.equal(buf.view(), x[:, :, 30:33]) and buf.nbytes == 4 * row
    bounded = ExactBuffer(capacity=6, step=4)
    bounded.append(x[:, :, :5])
    assert bounded.nbytes == 6 * row  # never beyond capacity
    with pytest.raises(AssertionError, match="overflow"):
        bounded.append(x[:, :, :2])
    with pytest.raises(ValueError, match="unbounded buffer needs a step"):
        ExactBuffer(None)


def test_exact_chunks_freeze_full_chunks_and_hold_no_unused_rows() -> None:
    row = HEADS * HEAD_DIM * 4
    chunks = ExactChunks(chunk_tokens=8)
    x = _randn(1, HEADS, 21, HEAD_DIM, seed=5)
    for a, b in ((0, 3), (3, 12), (12, 21)):
        chunks.append(x[:, :, a:b])
    assert [v.shape[-2] for v in chunks.views()] == [8, 8, 5] and chunks.num_tokens == 21
    assert torch.equal(torch.cat(chunks.views(), dim=2), x) and chunks.nbytes == 21 * row
    chunks.map_batch(lambda t: t.repeat(2, 1, 1, 1))
    assert all(v.shape[0] == 2 for v in chunks.views())
    chunks.clear()
    assert chunks.num_tokens == 0 and chunks.views() == [] and chunks.nbytes == 0


# ----------------------------------------------------------------------------------- layer store

SINKS, WINDOW, BLOCK = 4, 64, 32
LAYER_SPECS = [
    pytest.param(
        QuantSpec(bits=4, axis="channel", group_size=32),
        QuantSpec(bits=4, axis="token", group_size=32),
        id="kivi4",
    ),
    pytest.param(
        QuantSpec(bits=2, axis="channel", group_size=16),
        QuantSpec(bits=3, axis="token", group_size=64),
        id="k2v3",
    ),
    pytest.param(
        QuantSpec(bits=8, format="fp8_e5m2", axis="channel", group_size=32),
        QuantSpec(bits=8, format="fp8_e4m3", axis="token", group_size=64),
        id="fp8",
    ),
    pytest.param(None, QuantSpec(bits=8, symmetric=True, group_size=32), id="exact-keys"),
    pytest.param(None, None, id="exact"),
]
STEPS = [100] + [1] * 34 + [7] * 10  # prefill, decode steps (2 flushes), chunks of 7 (2 flushes)


def _config(key: QuantSpec | None, value: QuantSpec | None) -> CacheConfig:
    return CacheConfig(
        key=key, value=value, sink_tokens=SINKS, residual_window=WINDOW, block_size=BLOCK, page_tokens=64
    )


def _check_parts(store: LayerStore, total: int) -> None:
    sinks, packed, window = store.sink_k.num_tokens, store.packed_k.num_tokens, store.window_k.num_tokens
    assert (store.sink_v.num_tokens, store.packed_v.num_tokens, store.window_v.num_tokens) == (
        sinks,
        packed,
        window,
    )
    assert sinks + packed + window == store.num_tokens == total
    assert sinks == min(SINKS, total)
    assert packed % BLOCK == 0
    assert window <= WINDOW
    if packed:
        assert window >= WINDOW - BLOCK + 1


class _Expected:
    """[sinks | packed | window | new] of one tensor kind: exact copies around the block-wise
    quantized history (each block's reference is computed once, as the store quantizes once)."""

    def __init__(self, spec: QuantSpec | None) -> None:
        self.spec = spec
        self.packed: list[torch.Tensor] = []

    def __call__(self, history: torch.Tensor, new: torch.Tensor, store: LayerStore) -> torch.Tensor:
        s, p = store.sink_k.num_tokens, store.packed_k.num_tokens
        done = sum(t.shape[-2] for t in self.packed)
        if p > done:
            self.packed.append(_reference(history[:, :, s + done : s + p], self.spec))
        parts = [history[:, :, :s], *self.packed, history[:, :, s + p :], new]
        return torch.cat(parts, dim=-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("key_spec", "value_spec"), LAYER_SPECS)
def test_layer_store_sequence(key_spec: QuantSpec | None, value_spec: QuantSpec | None, dtype) -> None:
    store, workspace = LayerStore(_config(key_spec, value_spec)), Workspace()
    batch = 2
    hist_k = torch.empty(batch, HEADS, 0, HEAD_DIM, dtype=dtype)
    hist_v = hist_k.clone()
    expected_k, expected_v = _Expected(key_spec), _Expected(value_spec)
    for i, n in enumerate(STEPS):
        k = _randn(batch, HEADS, n, HEAD_DIM, seed=2 * i, dtype=dtype)
        v = _randn(batch, HEADS, n, HEAD_DIM, seed=2 * i + 1, dtype=dtype)
        keys, values = materialize(store, k, v, workspace)
        assert keys.shape == (batch, HEADS, hist_k.shape[-2] + n, HEAD_DIM) and keys.dtype == dtype
        assert torch.equal(keys, expected_k(hist_k, k, store))
        assert torch.equal(values, expected_v(hist_v, v, store))
        if store.packed_k.num_tokens and n > 1:  # the packed part is exactly what the pages hold
            s, p = store.sink_k.num_tokens, store.packed_k.num_tokens
            pages = torch.empty(batch, HEADS, p, HEAD_DIM, dtype=dtype)
            assert torch.equal(keys[:, :, s : s + p], store.packed_k.dequantize_into(pages))

        store.append(k, v)
        hist_k, hist_v = torch.cat([hist_k, k], dim=-2), torch.cat([hist_v, v], dim=-2)
        _check_parts(store, hist_k.shape[-2])
        assert store.batch_size == batch

    assert store.packed_k.num_tokens > 0 and len(store.packed_k.pool.slabs) > 1  # the run crossed slabs
    parts = store.parts()
    assert store.nbytes == sum(parts.values())
    assert parts["packed_keys"] == store.packed_k.block_nbytes == store.packed_k.pool.nbytes
    assert parts["packed_values"] == store.packed_v.block_nbytes
    assert parts["block_tables"] == store.packed_k.tables.nbytes + store.packed_v.tables.nbytes > 0
    store.clear()
    assert store.num_tokens == 0 and store.nbytes == 0 and store.batch_size == 0


@pytest.mark.parametrize(("key_spec", "value_spec"), LAYER_SPECS)
def test_layer_store_map_batch_swaps_rows(key_spec: QuantSpec | None, value_spec: QuantSpec | None) -> None:
    """Reordering the batch of a filled store equals having fed the reordered batch all along."""
    swap = torch.tensor([1, 0])
    store, swapped_ref = LayerStore(_config(key_spec, value_spec)), LayerStore(_config(key_spec, value_spec))
    ws = Workspace()

    def step(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = _randn(2, HEADS, n, HEAD_DIM, seed=100 + 2 * i)
        return k, _randn(2, HEADS, n, HEAD_DIM, seed=101 + 2 * i)

    for i, n in enumerate([100, 1, 1, 7, 30]):
        k, v = step(i, n)
        store.append(k, v)
        swapped_ref.append(k[swap], v[swap])
    store.map_batch(lambda t: t.index_select(0, swap))
    assert store.num_tokens == swapped_ref.num_tokens == 139
    for i, n in enumerate([1, 40, 7], start=10):  # keeps working after the reorder
        k, v = step(i, n)
        got = [t.clone() for t in materialize(store, k[swap], v[swap], ws)]
        want = materialize(swapped_ref, k[swap], v[swap], ws)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        store.append(k[swap], v[swap])
        swapped_ref.append(k[swap], v[swap])
    # Selecting one row keeps that row only.
    keys_before = materialize(store, *step(99, 1), ws)[0][:, :, :-1].clone()
    store.map_batch(lambda t: t[1:2])
    assert store.batch_size == 1
    assert torch.equal(materialize(store, *(t[1:2] for t in step(99, 1)), ws)[0][:, :, :-1], keys_before[1:2])


def test_materialize_empty_store_returns_inputs() -> None:
    store = LayerStore(_config(None, None))
    k, v = _randn(1, HEADS, 3, HEAD_DIM, seed=0), _randn(1, HEADS, 3, HEAD_DIM, seed=1)
    keys, values = materialize(store, k, v, Workspace())
    assert keys is k and values is v


@pytest.mark.parametrize(("sinks", "window"), [(0, 0), (0, 32), (4, 0)])
def test_layer_store_zero_sinks_or_window(sinks: int, window: int) -> None:
    config = CacheConfig(sink_tokens=sinks, residual_window=window, block_size=32, page_tokens=64, key=None)
    store = LayerStore(config)
    hist = torch.empty(1, HEADS, 0, HEAD_DIM)
    for i, n in enumerate(itertools.chain([50], [1] * 20, [33])):
        k = _randn(1, HEADS, n, HEAD_DIM, seed=i)
        keys, _ = materialize(store, k, k, Workspace())
        assert torch.equal(keys, torch.cat([hist, k], dim=-2))  # keys exact (spec None)
        store.append(k, k)
        hist = torch.cat([hist, k], dim=-2)
        assert store.sink_k.num_tokens == min(sinks, hist.shape[-2])
        assert store.packed_k.num_tokens % 32 == 0
        assert store.window_k.num_tokens <= max(window, 31)
