"""The risk check (`calibration.risk`) against the short measured check (`calibration.inspection`).

Tiny random models (2 layers, head_dim 64, 384 random tokens: 256 prefilled, 128 decoded): a Qwen2
with a large ``k_proj`` bias (std 60, issue 11), a Qwen2 whose key channel 5 sits at -70000 (beyond
float16), and benign ones (Qwen2 without bias, Llama). For each, `inspect_model` measures every
preset's decode KL against the exact cache; the risk predicted from the weights (what
`SqueezedCache.from_model` warns about) and the one on the captured keys/values must rank presets as
the KL does, the warnings must be exactly the measured verdict's unsafe presets, and the
recommendation the measured best within its budget.
"""

from __future__ import annotations

import functools
import itertools
import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvsqueeze.calibration.inspection import inspect_model, recommend
from kvsqueeze.calibration.risk import UNSAFE, ChannelProfile, LayerProfile, assess
from kvsqueeze.cli import main
from kvsqueeze.config import PRESETS, CacheConfig, QuantSpec
from kvsqueeze.integrations import SqueezedCache
from kvsqueeze.quant.overflow import MetadataOverflowWarning

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {  # name: (family, k_proj bias std, bias of key channel 5)
    "qwen2-bias60": ("qwen2", 60.0, None),
    "qwen2-fp16-overflow": ("qwen2", 0.0, -70000.0),
    "qwen2-no-bias": ("qwen2", 0.0, None),
    "llama": ("llama", 0.0, None),
}
QUANTIZED = [name for name, cfg in PRESETS.items() if not cfg.is_exact]
SEPARATED = 2.0  # KL ratio from which two presets count as clearly ordered
BUDGETS = (2.8, 3.6, 4.6, 8.5, None)


@functools.cache
def tiny(name: str) -> torch.nn.Module:
    family, bias_std, channel_bias = MODELS[name]
    shape = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = (
        Qwen2ForCausalLM(Qwen2Config(**shape))
        if family == "qwen2"
        else LlamaForCausalLM(LlamaConfig(**shape))
    )
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias
            if bias is not None:
                bias.copy_(torch.randn(bias.shape) * bias_std)
                if channel_bias is not None:
                    bias[5] = channel_bias
    return model.eval()


@functools.cache
def report(name: str) -> dict:
    ids = torch.randint(0, 256, (384,), generator=torch.Generator().manual_seed(1))
    return inspect_model(tiny(name), ids)


def warned(name: str, preset: str) -> tuple[bool, bool, list[str]]:
    """(predicted UNSAFE warning, overflow warning, problems) of ``from_model``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = SqueezedCache.from_model(tiny(name), preset)
    unsafe = any("predicted UNSAFE" in str(w.message) for w in caught)
    overflow = any(issubclass(w.category, MetadataOverflowWarning) for w in caught)
    return unsafe, overflow, cache.warn_if_unsafe(tiny(name)) if unsafe or overflow else []


def ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().double()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("source", ["predicted_risk", "risk"])
def test_risk_ranks_presets_as_the_measured_decode_kl(name: str, source: str) -> None:
    rows = report(name)["presets"]
    assert set(rows) == set(QUANTIZED)
    for a, b in itertools.combinations(rows, 2):
        if rows[b]["kl"] > SEPARATED * rows[a]["kl"]:
            assert rows[b][source] > rows[a][source], (a, b, rows[a], rows[b])
        if rows[a]["kl"] > SEPARATED * rows[b]["kl"]:
            assert rows[a][source] > rows[b][source], (a, b, rows[a], rows[b])
    kl, risk = ranks([r["kl"] for r in rows.values()]), ranks([r[source] for r in rows.values()])
    spearman = torch.corrcoef(torch.stack([kl, risk]))[0, 1].item()
    assert spearman > 0.8


def test_issue_11_k_proj_bias_best_2bit_is_not_called_safer_than_k4v4() -> None:
    rows = report("qwen2-bias60")["presets"]
    # what the issue measured (2.5x then; 1.98x since k4v4's window is 64 tokens, issue 13)
    assert rows["best-2bit"]["kl"] > 1.5 * rows["k4v4"]["kl"]
    assert rows["best-2bit"]["predicted_risk"] > rows["k4v4"]["predicted_risk"]
    assert rows["best-2bit"]["risk"] > rows["k4v4"]["risk"]
    assert not warned("qwen2-bias60", "k4v4")[0]  # so k4v4 is no longer the one preset warned about
    assert recommend(rows, 4.6) == min(
        (n for n, r in rows.items() if r["bits_per_element"] <= 4.6), key=lambda n: rows[n]["kl"]
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_from_model_warns_exactly_for_the_presets_measured_unsafe(name: str) -> None:
    rows = report(name)["presets"]
    unsafe = {n for n in QUANTIZED if warned(name, n)[0]}
    assert unsafe == {n for n, r in rows.items() if not r["safe"]}
    assert unsafe == {n for n, r in rows.items() if r["predicted_unsafe"]}
    # the verdict is monotone in the measurement: nothing measures worse than an unsafe preset yet passes
    best_unsafe = min((rows[n]["kl"] for n in unsafe), default=float("inf"))
    assert all(r["kl"] < best_unsafe for n, r in rows.items() if n not in unsafe)
    expected = {
        "qwen2-bias60": {"k2v2"},  # post-RoPE 2-bit keys: the bias chord fills the groups
        "qwen2-fp16-overflow": {"int8", "fp8", "k4v4", "k4v2", "k2v2"},  # every post-RoPE key format
        "qwen2-no-bias": set(),
        "llama": set(),
    }
    assert unsafe == expected[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_recommendation_is_the_measured_best_safe_preset_within_the_budget(name: str) -> None:
    rows = report(name)["presets"]
    for budget in BUDGETS:
        pick = recommend(rows, budget)
        allowed = [
            n for n, r in rows.items() if r["safe"] and (budget is None or r["bits_per_element"] <= budget)
        ]
        if not allowed:
            assert pick is None
            continue
        assert pick in allowed
        assert all(rows[pick]["kl"] <= rows[n]["kl"] for n in allowed)  # never worse than a safe one


def test_fp16_overflow_is_named_by_the_risk_check() -> None:
    for preset in QUANTIZED:
        unsafe, overflow, problems = warned("qwen2-fp16-overflow", preset)
        fp16_metadata = PRESETS[preset].key.scale_dtype == "float16" and not PRESETS[preset].key.is_fp8
        assert overflow == fp16_metadata, preset  # FP8 scales (amax / 448) still fit float16
        if fp16_metadata:
            assert any("layer 0 keys: fp16 scale/zero-point overflow" in p for p in problems)
    rows = report("qwen2-fp16-overflow")["presets"]
    assert rows["best-4bit"]["overflow_layers"] == [0, 1] and rows["fp8"]["overflow_layers"] == []
    assert not warned("qwen2-bias60", "k4v4")[1]


def test_constant_offsets_cost_nothing_pre_rope_and_per_token_keys_fail_on_them() -> None:
    std, flat = torch.ones(2, 64), torch.zeros(2, 64)
    offset = flat.clone()
    offset[:, 3] = 200.0
    layer = LayerProfile(ChannelProfile(std, offset), ChannelProfile(std, flat))
    per_token = CacheConfig(key=QuantSpec(bits=4, axis="token"), value=QuantSpec(bits=4))
    assert assess({0: layer.sample()}, per_token, None).error >= UNSAFE
    assert assess({0: layer.sample()}, PRESETS["k4v4"], None).error < 0.3 * UNSAFE
    same = LayerProfile(ChannelProfile(std, flat), ChannelProfile(std, flat))
    assert assess({0: same.sample()}, PRESETS["k4v4"], None).error == pytest.approx(
        assess({0: layer.sample()}, PRESETS["k4v4"], None).error, rel=0.05
    )


def test_inspect_cli_reports_measured_kl_and_the_recommendation(tiny_llama_dir, tmp_path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(
        " = Valkyria Chronicles = \n The game began development in 2010 , carrying over work . \n" * 40
    )
    argv = ["inspect", "--model", str(tiny_llama_dir), "--text-file", str(text), "--tokens", "320", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got["presets"]) == set(QUANTIZED) and got["decode_tokens"] == 128 and got["max_bits"] == 4.6
    kls = [r["kl"] for r in got["presets"].values()]
    assert kls == sorted(kls) and got["recommended"] == recommend(got["presets"], 4.6)
