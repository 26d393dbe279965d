"""`kvsqueeze bench`: speed grid smoke run, capacity (predicted == allocated), sizes, bad input.

A tiny random Llama (2 layers, 2 KV heads, head_dim 64, 4096 positions) with the embedded model's
real tokenizer, so that prompts are real text tokens; everything runs in seconds.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from kvsqueeze.cli import main
from kvsqueeze.config import PRESETS, CacheConfig
from kvsqueeze.eval.capacity import (
    KVShape,
    capacity_row,
    exact_bytes,
    largest_fitting,
    parse_size,
    squeezed_bytes,
)
from kvsqueeze.eval.memory import cache_nbytes
from kvsqueeze.eval.methods import baseline_available, resolve_method
from kvsqueeze.eval.speed import BenchConfig

METRICS = ("ttft_s", "tpot_s", "decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_growth_bytes")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tiny_llama):
    return tiny_llama_dir, tiny_llama.config


@pytest.mark.model
def test_speed_grid_smoke(tiny, tmp_path, capsys):
    folder, config = tiny
    methods = ["exact", "k4v4", "k2v2"] + (["quanto-int4"] if baseline_available("quanto-int4")[0] else [])
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--model", str(folder), "--methods", ",".join(methods), "--contexts", "64,512"]
    argv += ["--batch-sizes", "1,2", "--new-tokens", "2", "--repeats", "3", "--warmup", "1"]
    assert main([*argv, "--out", str(out), "--plot", str(png), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    saved = {k: v for k, v in data["config"].items() if k != "mode"}
    assert json.loads(json.dumps(BenchConfig(**saved).to_dict())) == saved
    assert saved["methods"] == methods and saved["contexts"] == [64, 512]
    assert {"cpu", "torch", "transformers", "git"} <= set(data["environment"])
    rows = data["results"]["rows"]
    assert data["results"]["complete"] is True and data["results"]["skipped_methods"] == []
    assert len(rows) == len(methods) * 2 * 2
    for row in rows:
        for name in METRICS:
            assert len(row[name + "_runs"]) == 3
            assert row[name] == statistics.median(row[name + "_runs"])
        assert row["kv_bytes"] > 0 and row["kv_tokens"] == row["context"] + 2 - 1
    shape = KVShape.from_config(config)
    for row in rows:  # the formula holds for caches filled by the model too (4 bytes: float32)
        if row["method"] == "exact":
            assert row["kv_bytes"] == exact_bytes(shape, row["kv_tokens"], row["batch_size"], 4)
        elif row["method"] in PRESETS:
            expected = squeezed_bytes(PRESETS[row["method"]], shape, row["kv_tokens"], row["batch_size"], 4)
            assert row["kv_bytes"] == expected
    for batch in (1, 2):
        kv = {r["method"]: r["kv_bytes"] for r in rows if r["context"] == 512 and r["batch_size"] == batch}
        assert kv["k2v2"] < kv["exact"] and kv["k4v4"] < kv["exact"]  # (k4v4's window is half k2v2's)
        if "quanto-int4" in kv:
            assert 0 < kv["quanto-int4"] < kv["exact"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # short: the rows are in the file
    assert last["config"]["contexts"] == [64, 512] and last["saved"] == str(out) and "rows" not in last


def _custom_config(tmp_path) -> str:
    """Sinks but no residual window: the case where the fill's chunking could matter."""
    k2v2 = PRESETS["k2v2"]
    config = CacheConfig(
        k2v2.key, k2v2.value, sink_tokens=4, residual_window=0, block_size=32, page_tokens=256
    )
    path = tmp_path / "sinks_only.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


@pytest.mark.parametrize("name", ["exact", *PRESETS, "custom"])
@pytest.mark.parametrize(("batch", "budget_text"), [(1, "768KiB"), (3, "2MiB")])
def test_capacity_predicted_equals_allocated(tiny, tmp_path, name, batch, budget_text):
    _, config = tiny
    method = resolve_method(_custom_config(tmp_path) if name == "custom" else name)
    budget = parse_size(budget_text)
    row = capacity_row(method, config, budget, batch, torch.float32, chunk_tokens=96)  # several chunks
    assert row["predicted_bytes"] == row["allocated_bytes"] <= budget
    assert not row["capped"] and row["max_context"] < 4096
    assert row["next_allocated_bytes"] > budget and row["next_predicted_bytes"] > budget
    if method.config.get("residual_window", 1) > 0:  # else the appended token's window buffer stays held
        assert row["next_predicted_bytes"] == row["next_allocated_bytes"]


def test_capacity_capped_by_max_position_embeddings(tiny):
    _, config = tiny
    row = capacity_row(resolve_method("k2v2"), config, parse_size("64MiB"), 1, torch.float32)
    assert row["capped"] and row["max_context"] == 4096 == row["max_position_embeddings"]
    assert row["predicted_bytes"] == row["allocated_bytes"] <= parse_size("64MiB")
    assert row["next_allocated_bytes"] is None


def test_capacity_skips_methods_without_a_size_formula(tiny):
    pytest.importorskip("optimum.quanto")
    row = capacity_row(resolve_method("quanto-int4"), tiny[1], parse_size("1MiB"), 1, torch.float32)
    assert "no size formula" in row["skipped"]


def test_tensor_walk_counts_dynamic_cache(tiny):
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny[1])
    k = torch.randn(2, 2, 10, 64)
    for layer in range(2):
        cache.update(k, k, layer)
    assert cache_nbytes(cache) == (2 * 2 * 2 * 2 * 10 * 64 * 4, "tensor walk")


def test_largest_fitting():
    assert largest_fitting(lambda n: 10 * n, 95, 100) == 9
    assert largest_fitting(lambda n: 10 * n, 95, 5) == 5
    assert largest_fitting(lambda n: 10 * n, 95, None) == 9
    assert largest_fitting(lambda n: 100 * (n > 0), 50, 10) == 0


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4 kib", 4096), ("100", 100)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2XB", "GiB", "-1GiB", "0MiB", "", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="--memory-budget.*(GiB|more than 0)"):
        parse_size(text)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--methods", "exact,bogus"], "--methods: method: 'bogus' is unknown"),
        (["--memory-budget", "2 parsecs"], "--memory-budget: '2 parsecs' is not a size"),
        (["--contexts", "512,5000"], "--contexts: 5000 + --new-tokens 16 - 1 = 5015 tokens exceed"),
        (["--contexts", "512,abc"], "--contexts: 'abc' is not a positive integer"),
        (["--batch-sizes", "0"], "--batch-sizes: '0' is not a positive integer"),
        (["--new-tokens", "1"], "--new-tokens: 1 must be an integer >= 2"),
        (["--methods", "k4v4,k4v4"], "--methods: ['k4v4'] given more than once"),
        (["--threads", "0"], "--threads: 0 must be an integer >= 1"),
        (["--memory-budget", "1GiB", "--threads", "0"], "--threads: 0 must be an integer >= 1"),
    ],
)
def test_bad_input_exits_2_naming_the_field(tiny, capsys, extra, needle):
    assert main(["bench", "--model", str(tiny[0]), "--no-progress", *extra]) == 2
    assert needle in " ".join(capsys.readouterr().err.split())
