"""Attention options under ``attn_implementation="kvsqueeze"``: honoured or refused, never dropped.

1. Synthetic tensors: the native kernel (and the Triton path's torch merge) with attention-sink
   logits against float64 attention with a sink column; the dense reference with every option.
2. The attention function on one fused layer (``PackedKV`` keys) and on plain tensors: sinks on the
   fused path, position bias, soft-capping, dropout and sparse indices on the reference path.
3. Tiny random-weight models built from configs, prefill then decode: one per model family of each
   option (``s_aux``: GPT-OSS, GraniteSWA; ``softcap``: Gemma 2, VaultGemma; per-row ``sinks`` with a
   position bias: Inkling 2; sparse ``indices``: DeepSeek-V3.2). With the ``none`` preset the logits
   match the model's eager attention on a `DynamicCache`; with quantized presets, the eager attention
   on the same quantized cache's reference path; ``output_attentions`` returns the eager weights.
4. Refused and malformed options raise ValueError naming the option.

Tolerances: logits relative to max |logit| 1e-4 as in tests/test_fused.py (measured here <= 9.3e-7
with ``none``, <= 1.5e-5 with quantized caches, where rounding may flip one code of a later layer);
kernel vs float64 2e-5 of max |value| (float32 query). Each model test also checks that dropping its
option would move the logits by more than 10x the tolerance (measured 5e-3 to 0.1), so a silent
drop cannot pass.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteSWAConfig,
    GraniteSWAForCausalLM,
    VaultGemmaConfig,
    VaultGemmaForCausalLM,
)

import kvsqueeze.integrations.attention as seam
from kvsqueeze.attention import dense
from kvsqueeze.attention.parts import Segment
from kvsqueeze.config import PRESETS, QuantSpec
from kvsqueeze.integrations import SqueezedCache
from kvsqueeze.integrations.attention import kvsqueeze_attention, use_fused_attention
from kvsqueeze.kernels import cpu, triton_attention
from kvsqueeze.quant import PackedTensor
from kvsqueeze.quant.exact import ExactTensor

LOGIT_TOL = 1e-4
KERNEL_TOL = 2e-5
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")
pytestmark = pytest.mark.usefixtures("one_thread", "float_key_dot")


# ------------------------------------------------------------------------ 1. synthetic tensors

SPECS = {
    "int4-channel": QuantSpec(bits=4, axis="channel", group_size=16),
    "int4-token": QuantSpec(bits=4, axis="token", group_size=16),
    "int8-channel-sym": QuantSpec(bits=8, axis="channel", group_size=16, symmetric=True),
    "int3-token": QuantSpec(bits=3, axis="token", group_size=64),
    "fp8-e4m3-channel": QuantSpec(bits=8, format="fp8_e4m3", axis="channel", group_size=16),
}
PAIRS = [("int4-channel", "int4-token"), ("int8-channel-sym", "int3-token"), (None, None)]


def segments(key: str | None, value: str | None, pages: list[int], heads: int, batch: int, seed: int = 0):
    """[exact (3) | packed pages | exact (5)] segments and their dequantized keys and values."""
    gen = torch.Generator().manual_seed(seed)
    segs, ks, vs = [], [], []
    for num, kspec, vspec in [(3, None, None), *((n, key, value) for n in pages), (5, None, None)]:
        parts = []
        for spec, out in ((kspec, ks), (vspec, vs)):
            x = torch.randn(batch, heads, num, 64, generator=gen) * 2
            part = ExactTensor(x) if spec is None else PackedTensor.from_float(x, SPECS[spec])
            out.append(part.dequantize(dtype=torch.float32))
            parts.append(part)
        segs.append(Segment(parts[0], parts[1], num))
    return segs, torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def sink_attention(q, k, v, mask, scaling, sinks):
    """float64 attention with one extra zero-value logit per row, as GPT-OSS's eager function:
    q (B, Hq, Lq, D), k/v (B, Hkv, T, D), sinks (B, Hq, Lq) or None -> (B, Lq, Hq, D)."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(g, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().unsqueeze(-1)], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., : k.shape[2]]
    return (probs @ v).transpose(1, 2)


def chunk_mask(lq: int, t: int) -> torch.Tensor:
    """Bool (1, 1, lq, t): the last ``lq`` tokens are a causal chunk after the history."""
    return (torch.arange(t)[None, :] <= torch.arange(lq)[:, None] + t - lq)[None, None]


def sink_rows(kind: str, b: int, hq: int, lq: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return {
        "per-head": lambda: (torch.randn(hq, generator=gen) * 3).view(1, hq, 1).expand(b, hq, lq),
        "per-row": lambda: torch.randn(b, hq, lq, generator=gen) * 3,
        "dominant": lambda: torch.full((b, hq, lq), 60.0),  # output ~0, no overflow
        "none": lambda: torch.full((b, hq, lq), -math.inf),  # no sink at all
    }[kind]()


def max_err(got: torch.Tensor, want: torch.Tensor, values: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / values.abs().max()).item()


@needs_kernels
@pytest.mark.parametrize("sinks", ["per-head", "per-row", "dominant", "none"])
@pytest.mark.parametrize(("key", "value"), PAIRS, ids=[f"{k}/{v}" for k, v in PAIRS])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("q_len", [1, 5])
def test_kernel_sinks_match_float64(sinks, key, value, heads, q_len) -> None:
    hq, hkv = heads
    segs, k, v = segments(key, value, [32, 16], hkv, batch=2)
    q = torch.randn(2, hq, q_len, 64, generator=torch.Generator().manual_seed(1))
    s = sink_rows(sinks, 2, hq, q_len)
    got = cpu.fused_attention(q, segs, None, 0.125, True, s)
    want = sink_attention(q, k, v, chunk_mask(q_len, k.shape[2]), 0.125, s)
    assert got.shape == want.shape and max_err(got, want, v) < KERNEL_TOL
    if sinks == "none":
        assert torch.equal(got, cpu.fused_attention(q, segs, None, 0.125, True))


@needs_kernels
def test_kernel_sinks_with_token_splits_masks_and_empty_rows() -> None:
    """1000+ tokens at batch 1 split the tokens over work items (the sink joins after the LSE merge);
    a padded row and a row that sees nothing (its output is 0, not the sink's share)."""
    segs, k, v = segments("int4-channel", "int4-token", [1008, 16], 2, batch=2)
    t = k.shape[2]
    mask = chunk_mask(3, t).expand(2, 1, 3, t).clone()
    mask[0, :, :, :20] = False
    mask[1, :, 1] = False
    q = torch.randn(2, 4, 3, 64)
    s = sink_rows("per-row", 2, 4, 3)
    got = cpu.fused_attention(q, segs, mask, 0.125, True, s)
    assert max_err(got, sink_attention(q, k, v, mask, 0.125, s), v) < KERNEL_TOL
    assert got[1, 1].abs().max() == 0


def test_triton_path_merges_sinks() -> None:
    """The CUDA backend's torch parts and log-sum-exp merge (exact and FP8 pages run without triton)."""
    segs, k, v = segments("fp8-e4m3-channel", None, [32], 2, batch=2)
    q, s = torch.randn(2, 4, 3, 64), sink_rows("per-row", 2, 4, 3)
    got = triton_attention.fused_attention(q, segs, None, 0.125, True, s)
    assert max_err(got, sink_attention(q, k, v, chunk_mask(3, k.shape[2]), 0.125, s), v) < KERNEL_TOL


def test_kernel_refuses_malformed_sinks() -> None:
    if not cpu.available():
        pytest.skip("native CPU kernels could not be built")
    segs, _, _ = segments(None, None, [], 2, batch=1)
    with pytest.raises(ValueError, match="sinks"):
        cpu.fused_attention(torch.randn(1, 4, 1, 64), segs, None, 0.125, True, torch.zeros(4))


def eager_reference(q, k, v, mask, scaling, sinks=None, softcap=None, position_bias=None):
    """float64, in the order of transformers' eager functions -> (output (B, Lq, Hq, D), weights)."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(g, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias.double()
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().unsqueeze(-1)], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., : k.shape[2]]
    return (probs @ v).transpose(1, 2), probs


@pytest.mark.parametrize("budget", [dense.SCORE_BUDGET, 1], ids=["one-chunk", "row-chunks"])
def test_dense_reference_every_option(monkeypatch, budget) -> None:
    monkeypatch.setattr(dense, "SCORE_BUDGET", budget)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(2, 4, 6, 64, generator=gen),
        torch.randn(2, 2, 9, 64, generator=gen),
        torch.randn(2, 2, 9, 64, generator=gen),
    )
    mask = chunk_mask(6, 9).expand(2, 1, 6, 9).clone()
    mask[0, :, :, :2] = False
    bias, sinks = torch.randn(1, 4, 6, 9, generator=gen), sink_rows("per-row", 2, 4, 6)
    got, weights = dense.dense_attention(
        q, k, v, mask, 0.3, True, sinks=sinks, softcap=2.0, position_bias=bias, need_weights=True
    )
    want, want_weights = eager_reference(q, k, v, mask, 0.3, sinks, 2.0, bias)
    assert max_err(got, want, v) < KERNEL_TOL and max_err(weights, want_weights, want_weights) < KERNEL_TOL
    assert dense.dense_attention(q, k, v, mask, 0.3, True)[1] is None  # weights only when asked


# ------------------------------------------------------- 2. the attention function, one layer


class Module(torch.nn.Module):
    """The attributes transformers' attention functions read from the attention module."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def fused_layer(history: int = 300, new: int = 1, preset: str = "int8"):
    """PackedKV keys and values of one fused layer after a prefill of ``history`` tokens."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256
    )
    layer = SqueezedCache(PRESETS[preset], config, fused=True).layers[0]
    gen = torch.Generator().manual_seed(history)
    layer.update(torch.randn(1, 2, history, 64, generator=gen), torch.randn(1, 2, history, 64, generator=gen))
    return layer.update(torch.randn(1, 2, new, 64, generator=gen), torch.randn(1, 2, new, 64, generator=gen))


def spy_kernel(monkeypatch) -> list:
    """Record the sinks argument of every fused-kernel call of the kvsqueeze attention."""
    calls, real = [], seam.fused_attention
    monkeypatch.setattr(seam, "fused_attention", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


@needs_kernels
@pytest.mark.parametrize("new", [1, 4])
def test_fused_path_honours_s_aux(monkeypatch, new) -> None:
    key, value = fused_layer(new=new)
    q, s_aux = torch.randn(1, 4, new, 64), torch.randn(4) * 3
    mask = None if new == 1 else chunk_mask(new, key.shape[2])
    calls = spy_kernel(monkeypatch)
    got, _ = kvsqueeze_attention(Module(2), q, key, value, mask, scaling=0.125, s_aux=s_aux)
    assert len(calls) == 1 and calls[0] is not None  # the kernel read the packed pages, with the sinks
    k, v = key.dense(), value.dense()
    sinks = s_aux.view(1, 4, 1).expand(1, 4, new)
    assert max_err(got, sink_attention(q, k, v, chunk_mask(new, k.shape[2]), 0.125, sinks), v) < KERNEL_TOL


_gen = torch.Generator().manual_seed(11)
OPTION_CASES = {
    "softcap": {"softcap": 1.5},
    "position_bias": {"position_bias": torch.randn(1, 4, 1, 301, generator=_gen)},
    "sinks+position_bias": {
        "sinks": torch.randn(1, 4, 1, 1, generator=_gen) * 3,
        "position_bias": torch.randn(1, 4, 1, 301, generator=_gen),
    },
    "s_aux+softcap": {"s_aux": torch.randn(4, generator=_gen) * 3, "softcap": 1.5},
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_reference_path_honours_options(case) -> None:
    """Options the kernel does not implement: the reference path on the dequantized keys and values."""
    key, value = fused_layer()
    q, options = torch.randn(1, 4, 1, 64) * 8, OPTION_CASES[case]
    got, _ = kvsqueeze_attention(Module(2), q, key, value, None, scaling=0.125, **options)
    sinks = options.get("sinks")
    sinks = sinks[..., 0] if sinks is not None else options.get("s_aux")
    sinks = None if sinks is None else sinks.reshape(-1, 4, 1).expand(1, 4, 1)
    k, v = key.dense(), value.dense()
    want, _ = eager_reference(
        q, k, v, None, 0.125, sinks, options.get("softcap"), options.get("position_bias")
    )
    plain, _ = eager_reference(q, k, v, None, 0.125)
    assert max_err(got, want, v) < KERNEL_TOL and max_err(plain, want, v) > 100 * KERNEL_TOL


@pytest.mark.parametrize("options", [{}, {"s_aux": torch.zeros(4)}], ids=["sdpa", "dense"])
def test_dropout_is_applied(options) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    kept, _ = kvsqueeze_attention(Module(2), q, k, v, None, **options)
    dropped, _ = kvsqueeze_attention(Module(2), q, k, v, None, dropout=0.5, **options)
    assert not torch.allclose(kept, dropped)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_sparse_indices_fold_into_the_mask(mask_kind) -> None:
    """``indices`` (batch, q_len, top_k): only the selected keys stay visible, as DSA models do."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(2, 4, 3, 64, generator=gen),
        torch.randn(2, 2, 9, 64, generator=gen),
        torch.randn(2, 2, 9, 64, generator=gen),
    )
    picks = [
        torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(8, generator=gen)[:3]])
        for _ in range(6)
    ]
    indices = torch.stack(picks).view(2, 3, 4).int()  # key 0 always: no row sees nothing
    causal = torch.ones(3, 9, dtype=torch.bool).tril()[None, None]  # SDPA's is_causal without a mask
    mask = {"bool": causal.expand(2, 1, 3, 9), "none": None}.get(mask_kind)
    if mask_kind == "float":
        mask = torch.zeros(2, 1, 3, 9).masked_fill(~causal, torch.finfo(torch.float32).min)
    got, _ = kvsqueeze_attention(Module(2), q, k, v, mask, indices=indices)
    keep = torch.zeros(2, 3, 9, dtype=torch.bool).scatter(-1, indices.long(), True).unsqueeze(1) & causal
    want, _ = eager_reference(q, k, v, keep, 64**-0.5)
    assert max_err(got, want, v) < KERNEL_TOL


REFUSED = {name: torch.tensor([0, 3]) for name in seam.REFUSED} | {"kernel_options": {"BLOCK_M": 16}}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_options_name_themselves(name) -> None:
    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match=f"^{name}: "):
        kvsqueeze_attention(Module(2), q, k, v, None, **{name: REFUSED[name]})
    kvsqueeze_attention(Module(2), q, k, v, None, **{name: None})  # None means "not used"


MALFORMED = {
    "s_aux": {"s_aux": torch.zeros(3)},
    "sinks": {"sinks": torch.zeros(1, 4, 2, 1)},
    "softcap": {"softcap": -1.0},
    "dropout": {"dropout": 1.0},
    "indices": {"indices": torch.zeros(1, 4, dtype=torch.long)},
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_options_name_themselves(name) -> None:
    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match=f"^{name}: "):
        kvsqueeze_attention(Module(2), q, k, v, None, **MALFORMED[name])


# ------------------------------------------------------------------------ 3. tiny models

COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)  # fmt: skip
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _no_sinks(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.sinks.data.fill_(-math.inf)


def _no_softcap(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None


# name: (model class, config, function that switches the option off)
MODELS = {
    "gpt_oss-s_aux": (GptOssForCausalLM, lambda: GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                              sliding_window=16, rope_parameters=ROPE), _no_sinks),
    "granite_swa-s_aux": (GraniteSWAForCausalLM, lambda: GraniteSWAConfig(**{**COMMON, "hidden_size": 256},
                                                                          sliding_window=16), _no_sinks),
    "gemma2-softcap": (Gemma2ForCausalLM, lambda: Gemma2Config(**COMMON, sliding_window=16, attn_logit_softcapping=0.5,
                                                               query_pre_attn_scalar=64), _no_softcap),
    "vaultgemma-softcap": (VaultGemmaForCausalLM, lambda: VaultGemmaConfig(**COMMON, sliding_window=16,
                                                                           attn_logit_softcapping=0.5,
                                                                           query_pre_attn_scalar=64), _no_softcap),
}  # fmt: skip
CHUNKS = [40, 1, 1, 3, 1, 1]  # prefill (past the sliding window), decode, a chunk, decode
LONG_CHUNKS = [150, 1, 1, 3, 1, 1]  # with a 64-token window, pages hold quantized history


@functools.cache
def tiny_model(name: str):
    """(eager model, the same weights under "kvsqueeze"), with sharp attention and large sinks."""
    cls, config, _ = MODELS[name]
    torch.manual_seed(0)
    model = cls(config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)  # random init attends almost uniformly
            sinks = getattr(layer.self_attn, "sinks", None)
            if sinks is not None:
                sinks.normal_(0.0, 2.0)
    model.set_attn_implementation("eager")
    fused = copy.deepcopy(model)
    use_fused_attention(fused)
    return model, fused


def tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n))


@torch.inference_mode()
def run(model, cache, ids, chunks, **kwargs):
    out, pos = [], 0
    for n in chunks:
        out.append(model(ids[:, pos : pos + n], cache=cache, use_cache=True, **kwargs).logits)
        pos += n
    return torch.cat(out, dim=1)


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@needs_kernels
@pytest.mark.parametrize("name", MODELS)
def test_none_preset_matches_eager_dynamic_cache(monkeypatch, name) -> None:
    eager, fused = tiny_model(name)
    ids = tokens(sum(CHUNKS))
    want = run(eager, DynamicCache(config=eager.config), ids, CHUNKS)
    calls = spy_kernel(monkeypatch)
    cache = SqueezedCache.from_model(fused, "none")
    assert cache.fused
    got = run(fused, cache, ids, CHUNKS)
    assert rel_diff(got, want) < LOGIT_TOL
    if "s_aux" in name:  # decode of the full-attention layer: the kernel, with the sinks
        assert calls and all(s is not None for s in calls)
    else:  # soft-capping: the reference path
        assert not calls
    dropped = copy.deepcopy(eager)
    MODELS[name][2](dropped)
    assert rel_diff(run(dropped, DynamicCache(config=eager.config), ids, CHUNKS), want) > 10 * LOGIT_TOL


@needs_kernels
@pytest.mark.parametrize("preset", ["int8", "k4v2"])
@pytest.mark.parametrize("name", MODELS)
def test_quantized_fused_matches_eager_reference_path(name, preset) -> None:
    eager, fused = tiny_model(name)
    config = dataclasses.replace(PRESETS[preset], residual_window=64, page_tokens=128)
    ids = tokens(sum(LONG_CHUNKS))
    want = run(eager, SqueezedCache.from_model(eager, config, fused=False), ids, LONG_CHUNKS)
    assert not torch.equal(
        want, run(eager, DynamicCache(config=eager.config), ids, LONG_CHUNKS)
    )  # packed pages
    cache = SqueezedCache.from_model(fused, config)
    assert cache.fused
    got = run(fused, cache, ids, LONG_CHUNKS)
    assert rel_diff(got, want) < LOGIT_TOL


@needs_kernels
@pytest.mark.parametrize("name", ["gpt_oss-s_aux", "gemma2-softcap"])
def test_output_attentions_returns_eager_weights(name) -> None:
    eager, fused = tiny_model(name)
    config = dataclasses.replace(PRESETS["int8"], residual_window=64, page_tokens=128)
    ids = tokens(151)
    caches = SqueezedCache.from_model(eager, config, fused=False), SqueezedCache.from_model(fused, config)
    for model, cache in zip((eager, fused), caches, strict=True):
        run(model, cache, ids, [150])
    with torch.inference_mode():
        want = eager(ids[:, 150:], cache=caches[0], output_attentions=True).attentions
        got = fused(ids[:, 150:], cache=caches[1], output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and (g - w).abs().max() < KERNEL_TOL


@pytest.mark.parametrize("option", ["sinks+position_bias", "indices"])
def test_other_families_match_eager(option) -> None:
    """Inkling 2 (per-row sinks and a relative position bias) and DeepSeek-V3.2 (sparse indices),
    on a DynamicCache: SqueezedCache does not take their layer types or head layouts."""
    torch.manual_seed(0)
    if option == "indices":
        from transformers.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM

        config = DeepseekV32Config(**{**COMMON, "head_dim": 16, "num_key_value_heads": 4, "intermediate_size": 128},
                                   moe_intermediate_size=32, n_shared_experts=1,
                                   n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
                                   kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32,
                                   qk_nope_head_dim=32, index_topk=8, index_head_dim=32, index_n_heads=2,
                                   first_k_dense_replace=1, rope_parameters=ROPE)  # fmt: skip
        model = DeepseekV32ForCausalLM(config).eval()
    else:
        from transformers.models.inkling2 import Inkling2ForCausalLM, Inkling2TextConfig

        config = Inkling2TextConfig(vocab_size=256, unpadded_vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, eos_token_id=None,
                                    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=64,
                                    sliding_window_size=16, rel_extent=32, moe_intermediate_size=32,
                                    n_routed_experts=4, num_experts_per_tok=2, n_layers_per_attn_res_block=1,
                                    layer_types=["hybrid_sliding", "hybrid"])  # fmt: skip
        model = Inkling2ForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    ids = tokens(sum(CHUNKS))
    want = run(model, DynamicCache(config=config), ids, CHUNKS)
    use_fused_attention(model)
    assert rel_diff(run(model, DynamicCache(config=config), ids, CHUNKS), want) < LOGIT_TOL
