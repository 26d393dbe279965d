"""The fused read path (``attn_implementation="kvsqueeze"``) against the reference path.

1. Kernels on synthetic segments: the native CPU attention against float64 attention on the
   dequantized keys and values, for every storage format the kernel reads; the native page
   dequantization against ``PackedTensor.dequantize`` (bit for bit).
2. Tiny random-weight Llama models (MHA / GQA / MQA, head_dim 64): logits of the same model run
   with the fused cache and ``kvsqueeze`` attention vs the reference cache and ``sdpa``, for every
   preset, chunked prefill, decode, left-padded batches and small-page boundary configs.
3. Registration, the fallbacks (no kernel, other attention implementations reading the packed
   views) and, on the embedded SmolLM2 model, identical int8 greedy generations.

The native kernels are built once per machine on first use (about a minute); later runs load them.

Tolerances (relative to max |logit| or max |output|) come from measurements: fused vs reference
logits measured <= 5.0e-6 over the preset x layout matrix and <= 1.14e-5 at the small-page
boundaries (the paths differ by float rounding: fma, summation order, a vectorized exp; a rounding
difference may also flip one code of a later layer's quantization), so 1e-4; kernel vs float64
attention measured <= 1.2e-6 (float32 query), 3.2e-4 (float16) and 2.6e-3 (bfloat16, output
rounded to bfloat16), so 2e-5 / 5e-3 / 2e-2. These use the float32 key dot product (fixture
``float_key_dot``); the int8 one is tested in tests/test_fused_formats.py.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze.attention.packed_view import PackedKV
from kvsqueeze.attention.parts import Segment
from kvsqueeze.config import PRESETS, CacheConfig, QuantSpec
from kvsqueeze.integrations import SqueezedCache, register
from kvsqueeze.kernels import build, cpu
from kvsqueeze.kernels.dequantize import dequantize_into
from kvsqueeze.quant import PackedTensor
from kvsqueeze.quant.exact import ExactTensor

LOGIT_TOL = 1e-4
KERNEL_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # num_key_value_heads for 4 query heads
CHUNKS = [100] + [1, 7] * 12 + [1] * 8  # chunked prefill then decode: 204 tokens
PAD = 0

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")


pytestmark = pytest.mark.usefixtures("one_thread", "float_key_dot")


# ------------------------------------------------------------------------ 1. kernels, synthetic

SPECS = {
    "int4-channel": QuantSpec(bits=4, axis="channel", group_size=16),
    "int4-token": QuantSpec(bits=4, axis="token", group_size=16),
    "int2-token-g32": QuantSpec(bits=2, axis="token", group_size=32),
    "int8-channel-sym": QuantSpec(bits=8, axis="channel", group_size=16, symmetric=True),
    "int3-token": QuantSpec(bits=3, axis="token", group_size=64),
    "int2-channel-bf16-scales": QuantSpec(bits=2, axis="channel", group_size=16, scale_dtype="bfloat16"),
    "fp8-e4m3-channel": QuantSpec(bits=8, format="fp8_e4m3", axis="channel", group_size=16),
    "fp8-e5m2-token": QuantSpec(bits=8, format="fp8_e5m2", axis="token", group_size=64),
}
# (key spec, value spec): the KIVI fast path and every other combination the generic reader takes.
PAIRS = [
    ("int4-channel", "int4-token"),
    ("int8-channel-sym", "int2-token-g32"),
    ("int2-channel-bf16-scales", "int4-token"),
    ("int4-token", "int3-token"),
    ("fp8-e4m3-channel", "fp8-e5m2-token"),
    ("int4-channel", None),
    (None, "int4-channel"),
]


def make_segments(key: str | None, value: str | None, pages: list[int], tail: int, heads: int, batch: int):
    """Segments [exact sinks (3) | packed pages | exact tail] and their dense keys and values."""
    gen = torch.Generator().manual_seed(len(pages) + tail)
    segs, ks, vs = [], [], []

    def add(num: int, kspec: QuantSpec | None, vspec: QuantSpec | None) -> None:
        parts = []
        for spec, dense in ((kspec, ks), (vspec, vs)):
            x = torch.randn(batch, heads, num, 64, generator=gen) * 2
            part = ExactTensor(x) if spec is None else PackedTensor.from_float(x, spec)
            dense.append(part.dequantize(dtype=torch.float32))
            parts.append(part)
        segs.append(Segment(parts[0], parts[1], num))

    add(3, None, None)
    for num in pages:
        add(num, key and SPECS[key], value and SPECS[value])
    add(tail, None, None)
    return segs, torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def dense_attention(q, k, v, mask, scaling, causal):
    """float64 attention; q (B, Hq, Lq, D), k/v (B, Hkv, T, D) -> (B, Lq, Hq, D)."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(g, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scaling
    lq, t = q.shape[2], k.shape[2]
    if mask is None and causal:
        mask = torch.arange(t)[None, :] <= torch.arange(lq)[:, None] + t - lq
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        )
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0, as the kernel
    return (probs @ v).transpose(1, 2)


def check_kernel(segs, k, v, q, mask=None, causal=True, scaling=0.125):
    got = cpu.fused_attention(q, segs, mask, scaling, causal)
    want = dense_attention(q, k, v, mask, scaling, causal)
    assert got.shape == want.shape and got.dtype == q.dtype
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < KERNEL_TOL[q.dtype], err


@needs_kernels
@pytest.mark.parametrize(("key", "value"), PAIRS, ids=[f"{k}/{v}" for k, v in PAIRS])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_kernel_formats_and_head_layouts(key, value, heads) -> None:
    hq, hkv = heads
    segs, k, v = make_segments(key, value, [64, 32], 5, hkv, batch=2)
    check_kernel(segs, k, v, torch.randn(2, hq, 1, 64))


@needs_kernels
@pytest.mark.parametrize("pages", [[16], [16, 32], [48], [1008, 16]], ids=lambda p: "+".join(map(str, p)))
def test_kernel_page_lengths_and_token_splits(pages) -> None:
    """One to several pages; 1000+ tokens at batch 1 split the tokens over work items (LSE merge)."""
    segs, k, v = make_segments("int4-channel", "int4-token", pages, 1, 2, batch=1)
    check_kernel(segs, k, v, torch.randn(1, 4, 1, 64))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_query_dtypes_and_chunked_causal(dtype) -> None:
    segs, k, v = make_segments("int8-channel-sym", "int4-token", [32], 9, 2, batch=2)
    check_kernel(segs, k, v, torch.randn(2, 4, 9, 64).to(dtype))  # the last 9 tokens are the chunk


@needs_kernels
def test_kernel_masks_bool_float_per_head_and_fully_masked_rows() -> None:
    segs, k, v = make_segments("int4-channel", "int2-token-g32", [32, 32], 6, 2, batch=2)
    t = k.shape[2]
    mask = torch.ones(2, 1, 3, t, dtype=torch.bool)
    mask[0, :, :, :20] = False  # left padding of row 0 (sinks and part of a page)
    mask[1, :, 1] = False  # a query that sees nothing gives 0
    q = torch.randn(2, 4, 3, 64)
    check_kernel(segs, k, v, q, mask=mask)
    check_kernel(segs, k, v, q, mask=mask.expand(2, 4, 3, t))  # one mask per query head
    additive = torch.zeros(2, 1, 3, t).masked_fill(~mask, torch.finfo(torch.float32).min)
    additive[:, :, :, -1] += 0.5
    got = cpu.fused_attention(q, segs, additive, 0.125, True)
    bias = additive.clone()
    bias[1, :, 1] = 0.0  # eager-style float masks attend uniformly when everything is masked
    bias[1, :, 1, -1] = 0.5
    want = dense_attention(q, k, v, bias, 0.125, False)
    assert torch.allclose(got[:, [0, 2]].double(), want[:, [0, 2]], atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("name", [n for n in PRESETS if PRESETS[n].key is not None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_dequantize_is_bit_exact(name, dtype) -> None:
    for spec in (PRESETS[name].key, PRESETS[name].value, SPECS["int3-token"], SPECS["int8-channel-sym"]):
        page = PackedTensor.from_float(torch.randn(2, 3, 128, 64) * 3, spec)
        want = page.dequantize(dtype=dtype)
        buf = torch.full((2, 3, 200, 64), float("nan"), dtype=dtype)
        got = dequantize_into(page, buf[:, :, 40:168])
        assert got.data_ptr() == buf[:, :, 40:168].data_ptr() and torch.equal(got, want), spec
        assert buf[:, :, :40].isnan().all() and buf[:, :, 168:].isnan().all()


# ------------------------------------------------------------------------ 2. tiny Llama models


@functools.cache
def tiny_models(kv_heads: int) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(sdpa model, the same weights with attn_implementation="kvsqueeze")."""
    register()
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    fused = copy.deepcopy(model)
    fused.set_attn_implementation("kvsqueeze")
    return model, fused


def ids(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def run_chunks(model, config, tokens, chunks, mask=None, fused=None):
    """Logits of every position, fed in chunks; ``mask`` (batch, tokens) for left padding."""
    cache = SqueezedCache.from_model(model, config, fused=fused)
    wanted = model.config._attn_implementation == "kvsqueeze" if fused is None else fused
    assert cache.fused == (wanted and cache.cache_config.kernel_readable)  # else the reference path
    out, pos = [], 0
    for n in chunks:
        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = mask[:, : pos + n]
            kwargs["position_ids"] = (mask[:, : pos + n].cumsum(-1) - 1).clamp_min(0)[:, pos:]
        out.append(model(tokens[:, pos : pos + n], cache=cache, use_cache=True, **kwargs).logits)
        pos += n
    return torch.cat(out, dim=1)


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_fused_matches_reference_chunked_prefill_and_decode(preset, layout) -> None:
    ref_model, fused_model = tiny_models(LAYOUTS[layout])
    tokens = ids(1, sum(CHUNKS))
    want = run_chunks(ref_model, preset, tokens, CHUNKS)
    got = run_chunks(fused_model, preset, tokens, CHUNKS)
    assert rel_diff(got, want) < LOGIT_TOL


# Small blocks and pages: 2 sinks, window 16, blocks of 16, pages of 32 tokens.
SMALL_PAGES = CacheConfig(
    key=QuantSpec(bits=4, axis="channel", group_size=16),
    value=QuantSpec(bits=4, axis="token", group_size=32),
    sink_tokens=2,
    residual_window=16,
    block_size=16,
    page_tokens=32,
)
# Prefill lengths around each boundary of SMALL_PAGES (1 token, sinks only, window full, one
# token short of a block, exactly a block, one token over, a full page, a page and a token),
# each followed by 40 decode steps that cross further block and page boundaries.
BOUNDARY_PREFILLS = [1, 2, 18, 18 + 15, 18 + 16, 18 + 17, 18 + 32, 18 + 33]


@needs_kernels
@pytest.mark.parametrize("prefill", BOUNDARY_PREFILLS)
def test_fused_matches_reference_at_block_and_page_boundaries(prefill) -> None:
    ref_model, fused_model = tiny_models(2)
    chunks = [prefill] + [1] * 40
    tokens = ids(1, sum(chunks), seed=prefill)
    assert (
        rel_diff(
            run_chunks(fused_model, SMALL_PAGES, tokens, chunks),
            run_chunks(ref_model, SMALL_PAGES, tokens, chunks),
        )
        < LOGIT_TOL
    )


@needs_kernels
@pytest.mark.parametrize("preset", ["int8", "k4v2", SMALL_PAGES])
def test_fused_matches_reference_left_padded_batch(preset) -> None:
    ref_model, fused_model = tiny_models(2)
    lengths = [150, 97, 40]
    tokens, mask = ids(3, 150 + 30), torch.ones(3, 180, dtype=torch.long)
    for row, n in enumerate(lengths):  # left padding
        tokens[row, : 150 - n] = PAD
        mask[row, : 150 - n] = 0
    chunks = [150] + [3, 1] * 7 + [2]
    got = run_chunks(fused_model, preset, tokens, chunks, mask)
    want = run_chunks(ref_model, preset, tokens, chunks, mask)
    real = mask.bool()
    assert rel_diff(got[real], want[real]) < LOGIT_TOL


# ------------------------------------------------------------------ 3. seams and fallbacks


def test_import_registers_nothing() -> None:
    code = (
        "import kvsqueeze, kvsqueeze.integrations\n"
        "from transformers import AttentionInterface\n"
        "assert 'kvsqueeze' not in AttentionInterface()\n"
        "kvsqueeze.register(); kvsqueeze.register()\n"
        "assert 'kvsqueeze' in AttentionInterface()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_views_dequantize_for_other_attention(attn) -> None:
    """A fused cache under another attention implementation: the views dequantize themselves."""
    ref_model, _ = tiny_models(2)
    model = copy.deepcopy(ref_model)
    model.set_attn_implementation(attn)
    chunks = [100, 1, 7, 1]
    tokens = ids(1, sum(chunks))
    want = run_chunks(model, "k4v4", tokens, chunks, fused=False)
    got = run_chunks(model, "k4v4", tokens, chunks, fused=True)
    assert torch.equal(got, want)


def test_packed_view_is_light_until_touched() -> None:
    cache = SqueezedCache(PRESETS["int8"], tiny_models(2)[0].config, fused=True)
    layer = cache.layers[0]
    k, v = layer.update(torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
    k, v = layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert isinstance(k, PackedKV) and k.shape == (1, 2, 301, 64) and cache.workspace.nbytes == 0
    assert "PackedKV(keys" in repr(k)
    assert torch.equal((k * 1)[:, :, -1:], k.parts.new.key.values)  # any op dequantizes
    assert len(k.parts._dense) == 1  # into a buffer the parts hold while the attention reads them


def test_fallback_without_kernels_warns_once_and_matches(monkeypatch) -> None:
    ref_model, fused_model = tiny_models(2)
    chunks = [100, 1, 7]
    tokens = ids(1, sum(chunks))
    want = run_chunks(ref_model, "k4v4", tokens, chunks)

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    build.cpu_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert not cpu.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            assert not cpu.available()
            got = run_chunks(fused_model, "k4v4", tokens, chunks)
    finally:
        build.cpu_extension.cache_clear()
    assert torch.equal(got, want)  # the reference path, exactly


def test_native_switch_off(monkeypatch) -> None:
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    build.cpu_extension.cache_clear()
    try:
        assert not cpu.available()
        with pytest.raises(ValueError, match="not available"):
            cpu.fused_attention(torch.randn(1, 1, 1, 64), [], None, 1.0, True)
    finally:
        build.cpu_extension.cache_clear()


TRITON_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_fused import make_segments, dense_attention
from kvsqueeze.kernels.triton_attention import fused_attention
for key, value, lq in (("int4-channel", "int4-token", 1), ("int8-channel-sym", "int2-token-g32", 3)):
    segs, k, v = make_segments(key, value, [32], 5, 2, batch=2)
    q = torch.randn(2, 4, lq, 64)
    got, want = fused_attention(q, segs, None, 0.125, True), dense_attention(q, k, v, None, 0.125, True)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-5
"""


def test_triton_kernel_under_the_interpreter() -> None:
    """The Triton kernel on CPU through TRITON_INTERPRET=1 (skipped when triton is not installed)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = TRITON_CHECK.format(tests=str(Path(__file__).parent))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@needs_kernels
def test_fused_method_switches_the_model_and_plain_methods_stay_reference() -> None:
    from kvsqueeze.eval.methods import resolve_method

    model = copy.deepcopy(tiny_models(2)[0])
    chunks = [100, 1, 7]
    tokens = ids(1, sum(chunks))
    want = run_chunks(model, "k4v4", tokens, chunks)
    assert resolve_method("k4v4@fused").make_cache(model).fused
    assert model.config._attn_implementation == "kvsqueeze"
    assert not resolve_method("k4v4").make_cache(model).fused
    assert rel_diff(run_chunks(model, "k4v4", tokens, chunks), want) < LOGIT_TOL
    with pytest.raises(ValueError, match="@fused applies to kvsqueeze presets"):
        resolve_method("exact@fused")


# ------------------------------------------------------------------------- 4. embedded model


@pytest.mark.model
@needs_kernels
def test_cli_generate_fused_path(capsys) -> None:
    from kvsqueeze.cli import main

    assert (
        main(["generate", "Name a color.", "--kv", "int8", "--attn", "fused", "--max-new-tokens", "6"]) == 0
    )
    assert "KV cache (int8, fused path)" in capsys.readouterr().err


@pytest.mark.model
@needs_kernels
def test_embedded_model_int8_greedy_identical() -> None:
    from kvsqueeze import load_model
    from kvsqueeze.eval.text import default_text_file, load_text

    if default_text_file() is None:
        pytest.skip("needs ../shared/data/wikitext-2-raw-test.txt")
    model, tokenizer = load_model(attn_implementation="kvsqueeze")
    text = load_text(default_text_file())[:2600]
    inputs = tokenizer(text, return_tensors="pt")
    assert 550 <= inputs["input_ids"].shape[1] <= 700

    def generate(fused: bool) -> torch.Tensor:
        cache = SqueezedCache.from_model(model, "int8", fused=fused)
        with torch.inference_mode():
            out = model.generate(**inputs, cache=cache, max_new_tokens=32, do_sample=False)
        assert cache.memory_report().parts["packed_keys"] > 0
        return out[0, inputs["input_ids"].shape[1] :]

    fused, reference = generate(True), generate(False)
    assert len(fused) == 32 and torch.equal(fused, reference)
