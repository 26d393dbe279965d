"""Preset names fit the model's head_dim (issue 11, item 9): every catalogue preset runs on tiny
random Llamas of head_dim 64, 80, 96, 112, 128 and 256, `kvsqueeze presets --model` shows the
group sizes really used, and explicit configs are never changed silently."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze import SqueezedCache
from kvsqueeze.cli import main
from kvsqueeze.config import (
    PRESETS,
    TOKEN_PRESETS,
    CacheConfig,
    QuantSpec,
    fit_group_size,
    preset,
    resolve_config,
)
from kvsqueeze.integrations.attention import use_fused_attention
from kvsqueeze.kernels import cpu
from kvsqueeze.quant.spec import Axis

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_DIMS = (64, 80, 96, 112, 128, 256)
NAMES = [*PRESETS, *TOKEN_PRESETS]
PROMPT_TOKENS = 300  # > sinks + window + one block of 128: every quantizing preset packs history


def tiny_config(head_dim: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=2 * head_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=1024,
    )


@pytest.fixture(scope="module", params=HEAD_DIMS, ids=lambda d: f"head_dim{d}")
def tiny_model(request) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(request.param)).eval()


def token_groups(config: CacheConfig) -> dict[str, int]:
    return {name: spec.group_size for name, spec in config.named_specs() if spec.axis is Axis.TOKEN}


# ------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("head_dim", "groups"),
    [(64, (32, 64, 64)), (80, (20, 40, 80)), (96, (32, 48, 96)), (112, (28, 56, 112)), (128, (32, 64, 128)),
     (256, (32, 64, 128))],
)  # fmt: skip
def test_fit_group_size_is_the_largest_divisor_not_above_nominal(head_dim: int, groups: tuple) -> None:
    assert tuple(fit_group_size(g, head_dim) for g in (32, 64, 128)) == groups


@pytest.mark.parametrize("name", NAMES)
def test_presets_keep_their_groups_where_they_divide(name: str) -> None:
    for head_dim in (64, 128, 256):
        assert resolve_config(name, head_dim=head_dim) is preset(name)


def test_fitting_changes_only_per_token_groups() -> None:
    fitted = resolve_config("best-2bit", head_dim=96)
    nominal = preset("best-2bit")
    assert fitted.value.group_size == 48 and fitted.key == nominal.key  # per-channel key groups: tokens
    assert fitted.replace(value=nominal.value) == nominal
    assert fitted.value.bits_per_element == pytest.approx(2 + 16 / 48)  # symmetric: scale only
    policy = replace(TOKEN_PRESETS["h2o-50-k4v4"].tokens, high_value=QuantSpec(bits=8, group_size=64))
    mixed = TOKEN_PRESETS["h2o-50-k4v4"].replace(tokens=policy).for_head_dim(80)
    assert mixed.tokens.high_value.group_size == 40 and mixed.value.group_size == 40


@pytest.mark.parametrize("explicit", ["config", "dict"])
def test_explicit_configs_are_not_changed(explicit: str, tiny_model) -> None:
    head_dim = tiny_model.config.head_dim
    config = preset("k4v4")
    given = config if explicit == "config" else config.to_dict()
    assert resolve_config(given, head_dim=head_dim) == config
    if head_dim % 64:
        with pytest.raises(ValueError, match=rf"value\.group_size: 64 does not divide head_dim {head_dim}"):
            SqueezedCache.from_model(tiny_model, given)
    else:
        assert SqueezedCache.from_model(tiny_model, given).cache_config == config


@pytest.mark.parametrize("head_dim", [0, -96, 96.0, True])
def test_resolve_config_rejects_bad_head_dim(head_dim: object) -> None:
    with pytest.raises(ValueError, match="head_dim: .* must be a positive integer"):
        resolve_config("k4v4", head_dim=head_dim)


# ------------------------------------------------------------------------- every preset runs


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_runs_on_every_head_dim(name: str, tiny_model) -> None:
    head_dim = tiny_model.config.head_dim
    if preset(name).needs_attention:
        if not cpu.available():
            pytest.skip("native CPU kernels could not be built")
        use_fused_attention(tiny_model)
    else:
        tiny_model.set_attn_implementation("sdpa")
    cache = SqueezedCache.from_model(tiny_model, name)
    nominal = token_groups(preset(name))
    used = token_groups(cache.cache_config)
    assert used == {field: fit_group_size(g, head_dim) for field, g in nominal.items()}
    assert all(head_dim % g == 0 for g in used.values())
    ids = torch.randint(0, 128, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tiny_model(ids, cache=cache)
        logits = tiny_model(ids[:, -1:], cache=cache).logits
    assert torch.isfinite(logits).all()
    assert cache.get_seq_length() <= PROMPT_TOKENS + 1
    if name in PRESETS and name != "none":  # the fitted groups really packed history
        assert cache.memory_report().parts["packed_keys"] > 0


# ---------------------------------------------------------------------------- presets --model


@pytest.mark.parametrize("head_dim", [80, 96, 112])
def test_cli_presets_shows_the_groups_used(head_dim: int, tmp_path, capsys) -> None:
    tiny_config(head_dim).save_pretrained(tmp_path)
    assert main(["presets", "--model", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["head_dim"] == head_dim
    rows = {r["preset"]: r for r in [*data["presets"], *data["token_presets"]]}
    assert set(rows) == set(NAMES) and all(r["usable"] for r in rows.values())
    g64 = fit_group_size(64, head_dim)
    k4v4 = rows["k4v4"]
    assert k4v4["config"]["value"]["group_size"] == g64 and k4v4["values"] == f"int4 tok g{g64}"
    assert k4v4["head_dim_fit"] == [f"value.group_size 64 -> {g64}"]
    assert k4v4["bits_per_element"] == pytest.approx((4.5 + 4 + 32 / g64) / 2)
    assert k4v4["bytes_per_token"] == pytest.approx(2 * head_dim * (4.5 + 4 + 32 / g64) / 8)
    assert rows["h2o-50-k4v4"]["config"]["value"]["group_size"] == g64
    assert main(["presets", "--model", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert f"head_dim {head_dim}" in table and f"int4 tok g{g64}" in table and "int4 tok g64" not in table
