"""CLI honesty (issue 11, item 10): an explicit read-path flag (``generate --attn``, a method's
``@fused``) is obeyed or refused with exit code 2 before the model loads, and ``generate`` says
which path really ran. Runs on the tiny random Llama of conftest.py."""

from __future__ import annotations

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
    ],
)
def test_generate_refuses_an_attn_the_preset_cannot_take(
    kv, attn, allowed, why, tiny_llama_dir, no_model_load, capsys
) -> None:
    assert main(generate(tiny_llama_dir, kv, "--attn", attn)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--attn: '{attn}' cannot run --kv {kv}" in err
    assert why in err and f"allowed for it: {allowed}" in err


def test_every_config_may_take_either_path() -> None:
    """Issue 16: the fused kernels read every format and transform (codebooks, outliers, rotations,
    pre-RoPE keys), so only attention-scored token policies constrain the read path."""
    for config in (preset("k4v4").replace(rotate_values=True), preset("best-2bit"), preset("best-3bit")):
        assert config.read_paths == ("reference", "fused")
    assert preset("h2o-50").read_paths == ("fused",)


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
        pytest.param("best-3bit", ("--attn", "fused"), "fused", marks=needs_kernels),
        pytest.param("h2o-50", (), "fused", marks=needs_kernels),
        pytest.param("h2o-50", ("--attn", "fused"), "fused", marks=needs_kernels),
        ("knorm-50", ("--attn", "reference"), "reference"),
    ],
)
def test_generate_reports_the_path_that_ran(kv, flags, ran, tiny_llama_dir, capsys) -> None:
    assert main(generate(tiny_llama_dir, kv, *flags)) == 0
    assert f"KV cache ({kv}, {ran} path)" in capsys.readouterr().err


# ---------------------------------------------------------------------- eval / bench: @fused


def test_fused_methods_of_best_presets_resolve() -> None:
    for name in ("best-2bit@fused", "best-3bit@fused", "best-4bit@fused", "k4v4@fused"):
        assert resolve_method(name).config["attn_implementation"] == "kvsqueeze"
    with pytest.raises(ValueError, match="@fused applies to kvsqueeze presets"):
        resolve_method("exact@fused")
