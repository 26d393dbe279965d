"""`kvsqueeze eval quality|retrieval` end to end on a tiny random Llama saved with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main
from kvsqueeze.eval.methods import baseline_available, resolve_method
from kvsqueeze.eval.perplexity import StreamSpec
from kvsqueeze.eval.quality import QualityRow
from kvsqueeze.eval.retrieval import RetrievalSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WINDOW = ["--window", "256", "--windows", "2", "--prefill", "32", "--chunk", "32"]


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    paragraph = (
        " = Valkyria Chronicles = \n The game began development in 2010 , carrying over a large portion of the "
        "work done on the previous title . While it retained the standard features of the series , it also "
        "underwent multiple adjustments , such as making the game more forgiving for series newcomers . \n"
    )
    path.write_text(paragraph * 40)
    return path


def _quality(model_dir: Path, text: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "quality",
        "--model",
        str(model_dir),
        "--text-file",
        str(text),
        "--out",
        str(tmp_path / "quality.json"),
        "--plot",
        str(tmp_path / "quality.png"),
        *extra,
    ]


def test_eval_quality_smoke(tiny_model_dir, text_file, tmp_path, capsys) -> None:
    baselines = [name for name in ("quanto-int4", "hqq-int4") if baseline_available(name)[0]]
    methods = ",".join(["exact", "k2v2", *baselines])
    argv = _quality(tiny_model_dir, text_file, tmp_path, "--methods", methods, *WINDOW, "--windows", "1")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "eval quality" in captured.out and "streaming check" in captured.err

    payload = json.loads((tmp_path / "quality.json").read_text())
    assert set(payload) == {"config", "environment", "results"}
    config = payload["config"]
    assert StreamSpec(**config["stream"]) == StreamSpec(256, 1, 32, 32, False)
    assert [m["name"] for m in config["methods"]] == methods.split(",")
    for record in config["methods"]:  # what ran: on head_dim 64 the presets' own configs
        method = resolve_method(record["name"])
        expected = None if method.config.get("cache") else method.config
        assert record["config"] == expected and record["cache"] in (
            "DynamicCache",
            "QuantizedCache",
            "SqueezedCache",
        )
    assert config["text"] == str(text_file) and config["text_num_tokens"] >= 256
    assert {"torch", "transformers", "git"} <= set(payload["environment"])

    rows = [QualityRow(**row) for row in payload["results"]]
    assert [r.method for r in rows] == methods.split(",")
    exact, *lossy = rows
    assert exact.num_scored == 255 and exact.delta_ppl_pct == 0.0
    assert exact.streaming_rel_diff == pytest.approx(0.0, abs=1e-4)  # streaming the exact cache is lossless
    assert exact.ppl == pytest.approx(exact.full_sequence_ppl, rel=1e-4)
    for row in lossy:
        assert row.num_scored == exact.num_scored and row.kld_mean is not None and row.kld_mean >= 0
        assert row.kld_p99 >= row.kld_mean and 0.0 <= row.top1_agreement <= 1.0
        assert row.delta_ppl_pct == pytest.approx(100 * (row.ppl / exact.ppl - 1))
    k2v2 = next(r for r in rows if r.method == "k2v2")
    assert k2v2.kld_mean > 0 and k2v2.bits_per_element == 3.0
    assert (tmp_path / "quality.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_quality_second_half(tiny_model_dir, text_file, tmp_path) -> None:
    argv = _quality(tiny_model_dir, text_file, tmp_path, "--methods", "exact", "--second-half", *WINDOW)
    assert main(argv) == 0
    payload = json.loads((tmp_path / "quality.json").read_text())
    (row,) = payload["results"]
    assert payload["config"]["stream"]["score_second_half"] is True
    assert row["num_scored"] == 2 * 128
    assert row["ppl"] == pytest.approx(row["full_sequence_ppl"], rel=1e-4)  # two windows, second halves


def _retrieval(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "retrieval",
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "retrieval.json"),
        "--plot",
        str(tmp_path / "retrieval.png"),
        *extra,
    ]


def test_eval_retrieval_smoke(tiny_model_dir, tmp_path, capsys) -> None:
    argv = _retrieval(
        tiny_model_dir,
        tmp_path,
        *("--methods", "exact,k4v4", "--lengths", "256,384", "--depths", "0.25,0.75"),
        *("--seeds", "2", "--new-tokens", "4", "--chunk", "128"),
    )
    assert main(argv) == 0
    assert "eval retrieval (passkey)" in capsys.readouterr().out
    payload = json.loads((tmp_path / "retrieval.json").read_text())
    saved = payload["config"]["retrieval"]
    spec = RetrievalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    assert spec == RetrievalSpec("passkey", (256, 384), (0.25, 0.75), 2, 4, 128)
    rows = payload["results"]
    assert [(r["method"], r["length"], r["depth"]) for r in rows] == [
        (m, n, d) for m in ("exact", "k4v4") for n in (256, 384) for d in (0.25, 0.75)
    ]
    for row in rows:
        assert row["num_trials"] == 2 and 0.0 <= row["accuracy"] <= 1.0
        assert {"seed", "key", "answer", "correct", "key_position"} == set(row["trials"][0])
    assert (tmp_path / "retrieval.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_needle_and_missing_matplotlib(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        "kvsqueeze.eval.plots.plots_available", lambda: (False, "plot: skipped, matplotlib is not installed")
    )
    argv = _retrieval(
        tiny_model_dir,
        tmp_path,
        *("--task", "needle", "--text-file", str(text_file), "--methods", "exact"),
        *("--lengths", "256", "--depths", "0.5", "--seeds", "1", "--new-tokens", "2"),
    )
    assert main(argv) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    payload = json.loads((tmp_path / "retrieval.json").read_text())
    assert payload["config"]["text"] == str(text_file) and len(payload["results"]) == 1
    assert not (tmp_path / "retrieval.png").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quality", "--methods", "exact,bogus"], "--methods: method: 'bogus' is unknown"),
        (["retrieval", "--methods", "exact,k4v4,k4v4"], "['k4v4'] appear more than once"),
        (["quality", "--window", "4096"], "--windows: 2 x --window 4096 needs 8192 tokens"),
        (["quality", "--window", "5000", "--windows", "1"], "--window: 5000 is not allowed"),
        (["quality", "--prefill", "0"], "--prefill: 0 is not allowed"),
        (["quality", "--text-file", "/no/such/file.txt"], "--text-file: '/no/such/file.txt' does not exist"),
        (["retrieval", "--depths", "0.5,1.5"], "--depths: depth=1.5 is not allowed"),
        (["retrieval", "--lengths", "256,2k"], "--lengths: '256,2k' is not allowed"),
        (["retrieval", "--lengths", "30"], "--lengths: length=30 is not allowed"),
        (["retrieval", "--lengths", "5000"], "--lengths: [5000] is not allowed"),
        (["retrieval", "--seeds", "0"], "--seeds: num_seeds=0"),
        (["retrieval", "--task", "needle", "--text-file", "/no/such.txt"], "--text-file: '/no/such.txt'"),
    ],
)
def test_bad_input_exits_2_naming_the_field(
    tiny_model_dir, text_file, tmp_path, argv, needle, capsys
) -> None:
    command, *rest = argv
    if command == "quality":
        full = _quality(tiny_model_dir, text_file, tmp_path, *WINDOW, *rest)
    else:
        full = _retrieval(tiny_model_dir, tmp_path, "--seeds", "1", *rest)
    assert main(full) == 2
    assert needle in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / f"{command}.json").exists()
