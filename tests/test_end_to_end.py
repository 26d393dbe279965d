"""End to end on the embedded SmolLM2-135M model (converted once, cached) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.cli import main
from kvsqueeze.config import PRESETS
from kvsqueeze.eval.text import default_text_file, load_text

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def _passage_prompt(tokenizer, offset: int) -> dict:
    text = load_text(default_text_file())[offset : offset + 2500]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text + "\n\nSummarize the text above in two sentences."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )


@pytest.mark.skipif(default_text_file() is None, reason="needs ../shared/data/wikitext-2-raw-test.txt")
@pytest.mark.parametrize("offset", [0, 20000])
def test_int8_same_32_greedy_tokens_as_exact(smollm, offset):
    model, tokenizer = smollm
    inputs = _passage_prompt(tokenizer, offset)
    assert inputs["input_ids"].shape[1] > 500  # long enough that most of the prompt is packed

    def generate(kv):
        cache = SqueezedCache.from_model(model, kv)
        with torch.inference_mode():
            out = model.generate(**inputs, cache=cache, max_new_tokens=32, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :], cache

    exact, _ = generate("none")
    int8, cache = generate("int8")
    assert cache.memory_report().parts["packed_keys"] > 0
    assert torch.equal(exact, int8)


def test_cli_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fp16_bytes_per_token"] == 23_040
    by_name = {r["preset"]: r for r in data["presets"]}
    assert by_name["k4v4"]["bits_per_element"] == pytest.approx(4.5)
    assert by_name["k2v2"]["bytes_per_token"] == pytest.approx(23_040 * 3 / 16)


def test_cli_generate_streams_and_reports_bytes(capsys):
    assert main(["generate", "What is the capital of France?", "--kv", "k4v4", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "KV cache (k4v4, reference path)" in captured.err


def test_cli_demo_small(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--presets", "int8,k2v2", "--new-tokens", "6", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["preset"] for r in rows] == ["int8", "k2v2"]
    assert all(0.0 <= r["agreement"] <= 1.0 and r["first_divergence"] <= 6 for r in rows)
    assert rows[1]["compression_vs_fp16"] > rows[0]["compression_vs_fp16"] > 1.0
    for r in rows:  # the long-context limit beats the short run, which also holds the exact window
        assert r["packed_compression_vs_fp16"] == pytest.approx(23_040 / r["packed_bytes_per_token"])
        assert r["packed_compression_vs_fp16"] > r["compression_vs_fp16"]
    assert rows[1]["packed_compression_vs_fp16"] == pytest.approx(23_040 / 4_320)  # k2v2: 2 b + scales


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "hi", "--kv", "k9"], "preset: 'k9' is unknown"),
        (["demo", "--presets", "int8,bogus"], "--presets: method: 'bogus' is unknown"),
        (["generate", "hi", "--max-new-tokens", "9000"], "exceed the model's context of 8192"),
        (["generate", "--prompt-file", "/no/such/file.txt"], "--prompt-file"),
        (["presets", "--model", "./no/such/model"], "does not exist"),
        (
            ["calibrate", "--preset", "k2v2-keep10", "--target-bits", "3"],
            "--target-bits: 'k2v2-keep10' has a token policy",
        ),
        (
            ["calibrate", "--preset", "k2v2-keep10", "--bits", "2,4"],
            "--bits: 'k2v2-keep10' has a token policy",
        ),
    ],
)
def test_cli_bad_input_names_the_field(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in " ".join(capsys.readouterr().err.split())


def test_cli_generate_takes_a_config_json(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(PRESETS["k4v4"].replace(residual_window=64).to_dict()))
    assert (
        main(["generate", "What is the capital of France?", "--kv", str(path), "--max-new-tokens", "4"]) == 0
    )
    assert "mine.json" in capsys.readouterr().err  # the report names the config it used


def test_cli_demo_sizes_best_presets_as_their_bundled_calibration(tmp_path):
    from transformers import AutoConfig

    from kvsqueeze.calibration.bundled import bundled_config
    from kvsqueeze.models import resolve_model

    out = tmp_path / "demo.json"
    assert main(["demo", "--presets", "best-2bit", "--new-tokens", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    bundled = bundled_config("best-2bit", AutoConfig.from_pretrained(resolve_model("smollm2-135m")))
    assert bundled is not None and bundled.layer_overrides
    assert row["packed_bytes_per_token"] == pytest.approx(bundled.bytes_per_token(30, 3, 64, 4))
    assert row["packed_bytes_per_token"] != pytest.approx(PRESETS["best-2bit"].bytes_per_token(30, 3, 64, 4))
