"""Saved state below the cache: kvsqueeze files (`storage.persist`: checksum, atomic writes, version),
blocks read out of and added into a `BlockPool` (exact pool state after each call), and the state of
a `PagedStore` whose rows share blocks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from kvsqueeze.config import QuantSpec
from kvsqueeze.quant.exact import ExactSpec, ExactTensor
from kvsqueeze.quant.overflow import MetadataOverflowWarning, widened
from kvsqueeze.storage.block_pool import BlockPool
from kvsqueeze.storage.pages import PagedStore
from kvsqueeze.storage.persist import CacheFileError, checksum, read_file, write_file
from kvsqueeze.storage.state import StateDict, StateError, put_blocks, take_blocks

HEADS, DIM, BS = 2, 64, 16
SPEC = QuantSpec(bits=4, axis="channel", group_size=16)
KIND = "kvsqueeze.test"


def _x(batch: int, tokens: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(batch, HEADS, tokens, DIM, generator=torch.Generator().manual_seed(seed))


# ----- files ---------------------------------------------------------------------------------------


def test_file_round_trips_tensors_and_metadata(tmp_path: Path) -> None:
    tensors = {
        "a.codes": torch.randint(0, 255, (3, 2, 16, 32), dtype=torch.uint8),
        "a.scale": torch.randn(3, 2, 1, 64).half(),
        "b": torch.randn(4, 5).bfloat16(),
        "table": torch.arange(6, dtype=torch.int32).view(2, 3),
    }
    meta = {"token_ids": [1, 2, 3], "config": {"key": None, "bits": 4.5}, "note": "é"}
    path = tmp_path / "f.safetensors"
    written = write_file(path, KIND, tensors, meta)
    assert written == path.stat().st_size and os.listdir(tmp_path) == ["f.safetensors"]
    got, got_meta = read_file(path, KIND)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert all(got[k].dtype == tensors[k].dtype for k in tensors)
    assert got_meta == {**meta, "format_version": 1, "writer": got_meta["writer"]}


def test_checksum_covers_metadata_names_dtypes_shapes_and_bytes() -> None:
    data = bytes(range(16))
    header = {
        "__metadata__": {"format": KIND, "checksum": "x"},
        "t": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
    }
    base = checksum(header, data)
    assert base.startswith("sha256:") and len(base) == 7 + 64
    assert checksum({**header, "__metadata__": {"format": KIND, "checksum": "y"}}, data) == base
    changed = [
        checksum({**header, "__metadata__": {"format": KIND + "!", "checksum": "x"}}, data),
        checksum({**header, "t": {**header["t"], "dtype": "I8"}}, data),
        checksum({**header, "t": {**header["t"], "shape": [4, 4]}}, data),
        checksum({"__metadata__": header["__metadata__"], "u": header["t"]}, data),
        checksum(header, bytes([1]) + data[1:]),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_write_is_atomic_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    write_file(path, KIND, {"t": torch.zeros(3)}, {"n": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses a non-contiguous tensor
        write_file(path, KIND, {"t": torch.zeros(4, 4).t()}, {"n": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["f.safetensors"]
    write_file(path, KIND, {"t": torch.ones(3)}, {"n": 3})
    assert read_file(path, KIND)[1]["n"] == 3 and os.listdir(tmp_path) == ["f.safetensors"]


def test_version_is_checked_before_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    write_file(path, KIND, {"t": torch.zeros(3)}, {})
    raw = path.read_bytes()
    for version, words in (("7", "written by format 7, this version reads 1"), ("0", "format 0, which this")):
        path.write_bytes(raw.replace(b'"format_version":"1"', f'"format_version":"{version}"'.encode()))
        with pytest.raises(CacheFileError, match=words) as refused:
            read_file(path, KIND)
        assert refused.value.reason == "version"
    path.write_bytes(raw.replace(b'"format_version":"1"', b'"format_version":"x"'))
    with pytest.raises(CacheFileError, match="format_version 'x'; allowed: an integer"):
        read_file(path, KIND)


# ----- blocks in and out of a pool ---------------------------------------------------------------


def test_read_then_add_blocks_reproduces_them_in_another_pool() -> None:
    pool = BlockPool(SPEC, BS, per_slab=2)
    ids = pool.allocate(5, like=_x(1, BS))
    pool.write(ids, pool.encode(_x(1, 5 * BS)))
    picked = torch.tensor([4, 0, 3])  # across three slabs
    blocks = pool.read(picked)
    assert blocks.codes.shape == (3, HEADS, BS, DIM // 2) and blocks.scale.shape == (3, HEADS, 1, DIM)
    for i, block in enumerate(picked.tolist()):
        slab, local = divmod(block, 2)
        assert torch.equal(blocks.codes[i], pool.slabs[slab].codes[local])
    other = BlockPool(SPEC, BS, per_slab=4)
    other.allocate(1, like=_x(1, BS))
    other.decref([0])  # one free block: reused first
    new = other.add_blocks(blocks)
    assert new.tolist() == [0, 1, 2] and other.refs == [1, 1, 1] and other.num_free == 0
    again = other.read(new)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors(), blocks.tensors(), strict=True))


def test_add_blocks_reconciles_metadata_and_exact_dtypes() -> None:
    wide = BlockPool(widened(SPEC), BS, per_slab=4)
    wide.allocate(1, like=_x(1, BS))
    wide.write(torch.tensor([0]), wide.encode(_x(1, BS, scale=1e6)))  # needs float32 metadata
    blocks = wide.read(torch.tensor([0]))
    narrow = BlockPool(SPEC, BS, per_slab=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        narrow.add_blocks(blocks)
    assert narrow.spec == widened(SPEC) and any(w.category is MetadataOverflowWarning for w in seen)
    plain = BlockPool(SPEC, BS, per_slab=4)
    plain.allocate(1, like=_x(1, BS))
    fp16_blocks = plain.read(torch.tensor([0]))
    wide.add_blocks(fp16_blocks)  # narrower metadata: widened exactly, the pool keeps float32
    assert wide.spec == widened(SPEC) and wide.read(torch.tensor([1])).scale.dtype == torch.float32
    with pytest.raises(ValueError, match="allowed: this pool's format"):
        wide.add_blocks(BlockPool(QuantSpec(bits=2, axis="channel", group_size=16), BS, 4).encode(_x(1, BS)))
    exact = BlockPool(ExactSpec(torch.float16), BS, per_slab=4)
    exact.add_blocks(ExactTensor(_x(1, BS).view(1, HEADS, BS, DIM)))  # float32 values widen the pool
    assert exact.spec == ExactSpec(torch.float32)


def test_blocks_state_refuses_misshapen_tensors() -> None:
    pool = BlockPool(SPEC, BS, per_slab=4)
    pool.allocate(2, like=_x(1, BS))
    state = StateDict()
    put_blocks(state, pool.read(torch.tensor([0, 1])), SPEC)
    assert set(state.tensors) == {"codes", "scale", "zero"}
    assert take_blocks(state, SPEC, BS, "cpu").codes.shape[0] == 2
    with pytest.raises(
        StateError, match=r"state: scale is \(2, 2, 1, 64\) float16; allowed .*\(2, 2, 2, 64\)"
    ):
        take_blocks(state, QuantSpec(bits=4, axis="channel", group_size=8), BS, "cpu")
    del state.tensors["zero"]
    with pytest.raises(StateError, match="state: zero is absent"):
        take_blocks(state, SPEC, BS, "cpu")


def test_paged_store_state_keeps_shared_rows_shared() -> None:
    store = PagedStore(SPEC, BS, 64)
    store.append(_x(1, 3 * BS))
    store.map_batch(lambda t: t.repeat_interleave(2, dim=0))  # beam search: two rows, same blocks
    assert store.pool.refs == [2, 2, 2]
    state = StateDict()
    store.save_state(state)
    assert state.tensors["blocks.codes"].shape[0] == 3 and state.tensors["table"].tolist() == [[0, 1, 2]] * 2
    loaded = PagedStore(SPEC, BS, 64)
    loaded.load_state(state, "cpu")
    assert loaded.pool.refs == [2, 2, 2] and loaded.pool.num_free == 0
    assert torch.equal(loaded.tables.view(), store.tables.view())
    out_a, out_b = torch.empty(2, HEADS, 3 * BS, DIM), torch.empty(2, HEADS, 3 * BS, DIM)
    assert torch.equal(store.dequantize_into(out_a), loaded.dequantize_into(out_b))
    loaded.clear()
    state.tensors["table"][0, 0] = 7
    with pytest.raises(StateError, match="points outside the 3 saved blocks"):
        loaded.load_state(state, "cpu")
