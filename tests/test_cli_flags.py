"""CLI honesty (issue 11, item 10): an explicit read-path flag (``generate --attn``, a method's
``@fused``) is obeyed or refused with exit code 2 before the model loads, and ``generate`` says
which path really ran. Runs on the tiny random Llama of conftest.py."""

from __future__ import annotations

import json

import pytest

import kvsqueeze.models
from kvsqueeze.cli import main
from kvsqueeze.config import preset
from kvsqueeze.eval.methods import resolve_method
from kvsqueeze.kernels import cpu

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")


def generate(model_dir, kv: str, *flags: str) -> list[str]:
    return [
        "generate",
        "Name a color.",
        "--model",
        str(model_dir),
        "--kv",
        kv,
        "--max-new-tokens",
        "3",
        *flags,
    ]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (refusals must come first)."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flag was refused")

    monkeypatch.setattr(kvsqueeze.models, "load_model", load_model)


# ------------------------------------------------------------------------- generate --attn: refused


@pytest.mark.parametrize(
    ("kv", "attn", "allowed", "why"),
    [
        ("h2o-50", "reference", "['fused']", "scores tokens by attention"),
        ("snapkv-50", "reference", "['fused']", "scores tokens by attention"),
        ("k2v2-keep10", "reference", "['fused']", "scores tokens by attention"),
        ("best-3bit", "fused", "['reference']", "fused kernels cannot read"),
        ("best-2bit", "fused", "['reference']", "fused kernels cannot read"),
        ("best-4bit", "fused", "['reference']", "pre-RoPE keys"),
    ],
)
def test_generate_refuses_an_attn_the_preset_cannot_take(
    kv, attn, allowed, why, tiny_llama_dir, no_model_load, capsys
) -> None:
    assert main(generate(tiny_llama_dir, kv, "--attn", attn)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--attn: '{attn}' cannot run --kv {kv}" in err
    assert why in err and f"allowed for it: {allowed}" in err


def test_generate_refuses_fused_for_a_config_file_the_kernels_cannot_read(
    tiny_llama_dir, tmp_path, no_model_load, capsys
) -> None:
    path = tmp_path / "rotated.json"
    path.write_text(json.dumps(preset("k4v4").replace(rotate_values=True).to_dict()))
    assert main(generate(tiny_llama_dir, str(path), "--attn", "fused")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--attn: 'fused' cannot run" in err and "rotations" in err and "['reference']" in err


def test_generate_refuses_fused_without_native_kernels(
    tiny_llama_dir, no_model_load, monkeypatch, capsys
) -> None:
    import kvsqueeze.attention.fused

    monkeypatch.setattr(kvsqueeze.attention.fused, "fused_backend", lambda device: None)
    assert main(generate(tiny_llama_dir, "k4v4", "--attn", "fused")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--attn: 'fused' needs the native CPU kernels" in err and "allowed: reference" in err
    assert main(generate(tiny_llama_dir, "h2o-50")) == 2  # its default path is fused: no path runs here
    assert "allowed: none for --kv h2o-50" in " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------- generate --attn: obeyed and reported


@pytest.mark.parametrize(
    ("kv", "flags", "ran"),
    [
        ("k4v4", (), "reference"),
        ("k4v4", ("--attn", "reference"), "reference"),
        pytest.param("k4v4", ("--attn", "fused"), "fused", marks=needs_kernels),
        ("best-3bit", (), "reference"),
        ("best-3bit", ("--attn", "reference"), "reference"),
        pytest.param("h2o-50", (), "fused", marks=needs_kernels),
        pytest.param("h2o-50", ("--attn", "fused"), "fused", marks=needs_kernels),
        ("knorm-50", ("--attn", "reference"), "reference"),
    ],
)
def test_generate_reports_the_path_that_ran(kv, flags, ran, tiny_llama_dir, capsys) -> None:
    assert main(generate(tiny_llama_dir, kv, *flags)) == 0
    assert f"KV cache ({kv}, {ran} path)" in capsys.readouterr().err


# ---------------------------------------------------------------------- eval / bench: @fused


def test_fused_method_of_a_config_the_kernels_cannot_read_is_refused() -> None:
    refused = (
        r"method: 'fused' cannot run 'best-3bit@fused' \(the reference path: 'best-3bit'\).*\['reference'\]"
    )
    with pytest.raises(ValueError, match=refused):
        resolve_method("best-3bit@fused")
    assert resolve_method("k4v4@fused").config["attn_implementation"] == "kvsqueeze"


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "quality", "--methods", "exact,best-2bit@fused"],
        ["eval", "retrieval", "--methods", "exact,best-3bit@fused"],
        ["bench", "--methods", "exact,best-4bit@fused"],
    ],
    ids=["quality", "retrieval", "bench"],
)
def test_eval_and_bench_refuse_fused_methods_before_loading(
    argv, tiny_llama_dir, no_model_load, capsys
) -> None:
    assert main([*argv, "--model", str(tiny_llama_dir)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'fused' cannot run" in err and "@fused" in err and "['reference']" in err
