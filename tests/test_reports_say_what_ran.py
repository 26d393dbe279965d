"""Every result file of `eval` and `demo` says what ran: the config the cache held (bundled
calibration, head_dim-fitted groups), its sizes as `kvsqueeze presets` shows them, and how many
tokens were quantized; a config reloaded from a result file re-runs to the same numbers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvsqueeze.calibration.bundled import HERE as BUNDLED
from kvsqueeze.cli import main
from kvsqueeze.config import PRESETS, CacheConfig, preset
from kvsqueeze.eval.methods import resolve_method
from kvsqueeze.eval.perplexity import StreamSpec, streamed_perplexity
from kvsqueeze.eval.quantized_reads import first_quantizing_length
from kvsqueeze.eval.report import config_sizes, record_config
from kvsqueeze.eval.retrieval import RetrievalSpec, evaluate_retrieval
from kvsqueeze.eval.text import tokenize_text
from kvsqueeze.integrations import SqueezedCache
from kvsqueeze.models import resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOW = ["--window", "256", "--windows", "1", "--prefill", "32", "--chunk", "32"]


@pytest.fixture(scope="module")
def head48_dir(tmp_path_factory) -> Path:
    """A tiny Llama with head_dim 48: presets' per-token groups of 64 and 32 are fitted to 48 and 24."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=48,
        max_position_embeddings=4096,
    )
    folder = tmp_path_factory.mktemp("head48")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def head48(head48_dir):
    return LlamaForCausalLM.from_pretrained(head48_dir).eval(), AutoTokenizer.from_pretrained(head48_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" = Robert Boulter = \n Robert Boulter is an English film and television actor . \n" * 60)
    return path


@pytest.fixture(scope="module")
def smollm_config():
    """The embedded model's config alone (no weights): the bundled calibrations fit it."""
    return AutoConfig.from_pretrained(resolve_model("smollm2-135m"))


class ConfigOnly:
    """A stand-in model for `Method.record` given a cache: only ``config`` is read."""

    def __init__(self, config) -> None:
        self.config = config


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_best_3bit_on_the_embedded_model_records_the_bundled_calibration(smollm_config) -> None:
    bundled = CacheConfig.load(BUNDLED / "smollm2-135m-best-3bit.json")
    cache = SqueezedCache("best-3bit", smollm_config)
    record = resolve_method("best-3bit").record(ConfigOnly(smollm_config), cache)
    assert record_config(record) == bundled == cache.cache_config != preset("best-3bit")
    assert record["bits_per_element"] == pytest.approx(3.50)  # not the generic preset's 3.54
    assert record["bytes_per_token"] == pytest.approx(5040)  # not 5,090
    assert (record["name"], record["cache"], record["read_path"]) == (
        "best-3bit",
        "SqueezedCache",
        "reference",
    )


def test_eval_sizes_are_the_sizes_presets_shows(smollm_config, capsys) -> None:
    assert main(["presets", "--json"]) == 0
    shown = {row["preset"]: row for row in json.loads(capsys.readouterr().out)["presets"]}
    model = ConfigOnly(smollm_config)
    for name in PRESETS:
        record = resolve_method(name).record(model, SqueezedCache(name, smollm_config))
        assert record_config(record) == CacheConfig.from_dict(shown[name]["config"]), name
        for size in ("bits_per_element", "bytes_per_token", "fraction_of_fp16"):
            assert record[size] == shown[name][size], (name, size)


def test_quality_file_reloads_into_the_config_that_ran_and_reruns_to_the_same_numbers(
    head48_dir, head48, text_file, tmp_path
) -> None:
    out = tmp_path / "quality.json"
    argv = ["eval", "quality", "--model", str(head48_dir), "--text-file", str(text_file), *WINDOW]
    argv += ["--methods", "exact,k4v2,k2v2@fused", "--out", str(out), "--plot", str(tmp_path / "q.png")]
    assert main(argv) == 0
    payload = _json(out)
    model, tokenizer = head48
    methods = {m["name"]: m for m in payload["config"]["methods"]}
    rows = {r["method"]: r for r in payload["results"]}
    assert methods["exact"]["cache"] == "DynamicCache" and methods["exact"]["config"] is None

    k4v2 = SqueezedCache.from_model(model, "k4v2").cache_config
    assert k4v2.value.group_size == 24 != preset("k4v2").value.group_size  # fitted to head_dim 48
    assert record_config(methods["k4v2"]) == k4v2 == CacheConfig.from_dict(rows["k4v2"]["config"])
    assert methods["k2v2@fused"]["read_path"] == rows["k2v2@fused"]["read_path"] == "fused"
    # the last forward reads what 7 chunks of 32 tokens left: blocks of 64 (k4v2) or 32 (k2v2) quantized
    for name, quantized in (("k4v2", 128), ("k2v2@fused", 96)):
        assert (
            rows[name]["bits_per_element"]
            == config_sizes(record_config(methods[name]), model.config)["bits_per_element"]
        )
        assert rows[name]["quantized_tokens"] == quantized and rows[name]["exact_tokens"] == 256 - quantized

    spec = StreamSpec(**payload["config"]["stream"])
    ids = tokenize_text(tokenizer, Path(payload["config"]["text"]).read_text())
    saved = rows["k4v2"]
    config = CacheConfig.from_dict(saved["config"])
    rerun = streamed_perplexity(
        model,
        ids,
        lambda m: SqueezedCache.from_model(m, config, fused=saved["read_path"] == "fused"),
        spec,
        reference=resolve_method("exact").make_cache,
        progress=False,
    )
    assert rerun.ppl == pytest.approx(saved["ppl"], rel=1e-9)
    assert rerun.kld_mean == pytest.approx(saved["kld_mean"], rel=1e-6, abs=1e-12)
    assert rerun.top1_agreement == saved["top1_agreement"]


def test_retrieval_file_reloads_and_reruns(head48_dir, head48, tmp_path) -> None:
    out = tmp_path / "retrieval.json"
    argv = ["eval", "retrieval", "--model", str(head48_dir), "--methods", "exact,k4v4", "--lengths", "256"]
    argv += ["--depths", "0.5", "--seeds", "1", "--new-tokens", "3", "--chunk", "64"]
    assert main([*argv, "--out", str(out), "--plot", str(tmp_path / "r.png")]) == 0
    payload = _json(out)
    model, tokenizer = head48
    record = next(m for m in payload["config"]["methods"] if m["name"] == "k4v4")
    assert record_config(record) == SqueezedCache.from_model(model, "k4v4").cache_config
    row = next(r for r in payload["results"] if r["method"] == "k4v4")
    assert row["quantized_tokens"] == 192 and row["warning"] is None  # 256 - 4 sinks - 60 in the window

    config_file = tmp_path / "k4v4-reloaded.json"
    config_file.write_text(json.dumps(record["config"]))
    saved = payload["config"]["retrieval"]
    spec = RetrievalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    (again,) = evaluate_retrieval(model, tokenizer, [resolve_method(str(config_file))], spec, progress=False)
    assert [t["answer"] for t in again["trials"]] == [t["answer"] for t in row["trials"]]


def test_demo_file_reloads_and_reruns(head48_dir, head48, tmp_path) -> None:
    from kvsqueeze.eval.demo import rows_to_dicts, run_demo

    out = tmp_path / "demo.json"
    argv = [
        "demo",
        "--model",
        str(head48_dir),
        "--presets",
        "k4v4,k2v2",
        "--new-tokens",
        "3",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    payload = _json(out)
    model, tokenizer = head48
    assert set(payload) == {"config", "environment", "results"}
    for record, row in zip(payload["config"]["methods"], payload["results"], strict=True):
        name = record["name"].removesuffix("@fused").removesuffix("@reference")  # the demo reads fused
        assert record_config(record) == SqueezedCache.from_model(model, name).cache_config
        assert (
            row["config"] == record["config"] and row["packed_bytes_per_token"] == record["bytes_per_token"]
        )
        fed = [payload["config"]["prompt_tokens"], 1, 1]  # the prompt, then 2 of the 3 new tokens
        assert (
            row["quantized_tokens"] == resolve_method("k4v4").quantized_tokens(record_config(record), fed) > 0
        )
        config_file = tmp_path / f"{record['name']}-reloaded.json"
        config_file.write_text(json.dumps(record["config"]))
        context = payload["config"]["context"]  # the prompt length the command ran
        rerun = run_demo(model, tokenizer, [str(config_file)], 3, context_tokens=context, progress=False)
        (again,) = rows_to_dicts(rerun)
        for field in (
            "agreement",
            "first_divergence",
            "packed_bytes_per_token",
            "quantized_tokens",
            "config",
        ):
            assert again[field] == row[field], field


def test_a_window_inside_the_residual_window_warns_that_nothing_was_quantized(
    tiny_llama_dir, text_file, tmp_path, capsys
) -> None:
    out = tmp_path / "quality.json"
    argv = ["eval", "quality", "--model", str(tiny_llama_dir), "--text-file", str(text_file)]
    argv += ["--methods", "exact,k2v2,none", "--window", "128", "--windows", "1", "--prefill", "64"]
    assert main([*argv, "--out", str(out), "--plot", str(tmp_path / "q.png")]) == 0
    captured = capsys.readouterr()
    rows = {r["method"]: r for r in _json(out)["results"]}
    k2v2 = rows["k2v2"]
    assert k2v2["quantized_tokens"] == 0 and k2v2["exact_tokens"] == 128
    # what the warning is about: the scores are the exact cache's (up to the float16 exact parts)
    assert abs(k2v2["kld_mean"]) < 1e-6
    assert "no forward read a quantized token" in k2v2["warning"] and "133 tokens" in k2v2["warning"]
    assert rows["none"]["quantized_tokens"] is None and rows["none"]["warning"] is None  # exact by design
    assert rows["exact"]["quantized_tokens"] is None and rows["exact"]["warning"] is None
    assert "k2v2 (!)" in captured.out and "0/128" in captured.out
    assert "warning: k2v2: no forward read a quantized token" in " ".join(captured.err.split())


@pytest.mark.parametrize("name", ["k4v4", "k2v2", "int8", "k4v2-window0"])
@pytest.mark.parametrize("chunks", [[32] * 9, [200, 1, 1, 1, 7, 64], [3, 130, 64]])
def test_quantized_token_count_is_what_the_cache_holds(tiny_llama, name, chunks) -> None:
    if name == "k4v2-window0":
        config = preset("k4v2").replace(residual_window=0)
        method = resolve_method("k4v2")
    else:
        config, method = name, resolve_method(name)
    cache = SqueezedCache.from_model(tiny_llama, config)
    ids = torch.randint(0, 1000, (1, sum(chunks)))
    start = 0
    with torch.inference_mode():
        for size in chunks:
            tiny_llama(input_ids=ids[:, start : start + size], cache=cache, use_cache=True)
            start += size
    held = cache.layers[0].store.packed_k.num_tokens  # what one more forward would read quantized
    assert method.quantized_tokens(cache.cache_config, [*chunks, 1]) == held
    first = first_quantizing_length(cache.cache_config)
    assert method.quantized_tokens(cache.cache_config, [first - 1, 1]) == 0
    assert method.quantized_tokens(cache.cache_config, [first, 1]) > 0
    assert method.quantized_tokens(cache.cache_config, [first + 500]) == 0  # one forward reads all exact


def test_quantized_token_count_of_the_transformers_baseline(tiny_llama) -> None:
    from kvsqueeze.eval.methods import baseline_available

    if not baseline_available("quanto-int4")[0]:
        pytest.skip("optimum-quanto is not installed")
    method = resolve_method("quanto-int4")
    chunks = [40, 64, 64, 1, 1, 100, 5]
    cache = method.make_cache(tiny_llama)
    ids = torch.randint(0, 1000, (1, sum(chunks)))
    start = 0
    with torch.inference_mode():
        for size in chunks:
            tiny_llama(input_ids=ids[:, start : start + size], cache=cache, use_cache=True)
            start += size
    layer = cache.layers[0]
    residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
    assert method.quantized_tokens(None, [*chunks, 1]) == sum(chunks) - residual


def test_tables_keep_method_names_whole_on_a_narrow_terminal(
    tiny_llama_dir, text_file, tmp_path, monkeypatch
) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(
        "kvsqueeze.commands.common.out",
        Console(file=buffer, width=80, force_terminal=True, color_system=None),
    )
    long_name = tmp_path / "a-rather-long-config-name.json"
    long_name.write_text(json.dumps(preset("k2v2").to_dict()))
    argv = ["eval", "quality", "--model", str(tiny_llama_dir), "--text-file", str(text_file)]
    argv += ["--methods", f"exact,{long_name}", "--window", "128", "--windows", "1", "--prefill", "64"]
    assert main([*argv, "--out", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")]) == 0
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "a-rather-long-config-name (!)" in text  # one line, not wrapped or cut
    assert "0/128" in text and "± " in text  # numbers are not folded either (the columns go to 2 tables)


def test_results_that_cannot_be_written_are_kept(tmp_path) -> None:
    from kvsqueeze.eval.report import save_results

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be written") as refused:
        save_results(blocker / "quality.json", {"command": "eval quality"}, [{"method": "k4v4"}])
    kept = Path(str(refused.value).rsplit("saved to ", 1)[1])
    assert _json(kept)["results"] == [{"method": "k4v4"}]
    kept.unlink()
