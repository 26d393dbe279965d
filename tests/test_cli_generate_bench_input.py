"""Issue 12 for `kvsqueeze generate` and `kvsqueeze bench`: every bad value exits with code 2 and a
message naming the option, the value and what is allowed, before the model loads, with no
traceback; flags are obeyed or refused; independent key/value types and eviction ratios
(`commands.kv_args`); help on every option with its default; tables that keep the method column
whole; bench's results go to the file, not to a long line on the terminal. Runs on the tiny random
Llama of conftest.py."""

from __future__ import annotations

import json

import pytest

import kvsqueeze.models
from kvsqueeze.cli import build_parser, main
from kvsqueeze.commands.bench_view import new_table, print_fitted
from kvsqueeze.commands.generate import Decoding
from kvsqueeze.commands.kv_args import KVChoice, parse_spec
from kvsqueeze.config import PRESETS, CacheConfig, LayerOverride, QuantSpec
from kvsqueeze.kernels import cpu

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr with its line breaks joined) of ``kvsqueeze argv``; argparse's own
    refusals (SystemExit) count as their exit code."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (refusals must come first)."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flag was refused")

    monkeypatch.setattr(kvsqueeze.models, "load_model", load_model)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Text files a user may pass by mistake: binary, latin-1, empty, whitespace only, a folder."""
    folder = tmp_path_factory.mktemp("bad-files")
    (folder / "binary.bin").write_bytes(bytes(range(256)))
    (folder / "latin1.txt").write_bytes("café crème brûlée".encode("latin-1"))
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("  \n\t \n")
    (folder / "short.txt").write_text("Only a few words here.")
    (folder / "dir").mkdir()
    return folder


# --------------------------------------------------------------------------- generate: refusals


def generate(model_dir, *flags: str, prompt: str | None = "Name a color.") -> list[str]:
    head = ["generate"] if prompt is None else ["generate", prompt]
    return [*head, "--model", str(model_dir), "--max-new-tokens", "3", *flags]


GENERATE_REFUSALS = [
    # a prompt twice, or none
    (("--prompt-file", "{files}/short.txt"), "--prompt-file: ", "give one of them"),
    # sampling settings without --sample
    (("--temperature", "0.5"), "--temperature: 0.5 is a sampling setting", "add --sample"),
    (("--top-p", "0.5"), "--top-p: 0.5 is a sampling setting", "add --sample"),
    (("--top-k", "5"), "--top-k: 5 is a sampling setting", "add --sample"),
    (("--seed", "3"), "--seed: 3 is a sampling setting", "add --sample"),
    # out of range
    (("--sample", "--top-p", "5"), "--top-p: 5.0 is not allowed", "(0, 1]"),
    (("--sample", "--top-p", "0"), "--top-p: 0.0 is not allowed", "(0, 1]"),
    (("--sample", "--top-p", "nan"), "--top-p: nan is not allowed", "(0, 1]"),
    (("--sample", "--temperature", "0"), "--temperature: 0.0 is not allowed", "> 0"),
    (("--sample", "--temperature", "-1"), "--temperature: -1.0 is not allowed", "> 0"),
    (("--sample", "--temperature", "inf"), "--temperature: inf is not allowed", "finite"),
    (("--sample", "--top-k", "0"), "--top-k: 0 is not allowed", ">= 1"),
    (("--sample", "--seed", "-1"), "--seed: -1 is not allowed", "0 .. 2**64-1"),
    (("--max-new-tokens", "0"), "--max-new-tokens: 0 is not allowed", ">= 1"),
    (("--max-new-tokens", "-5"), "--max-new-tokens: -5 is not allowed", ">= 1"),
    # argparse's own: type and choices
    (("--max-new-tokens", "ten"), "--max-new-tokens", "invalid int value"),
    (("--attn", "fast"), "--attn", "invalid choice"),
    (("--evict-scorer", "random", "--evict", "0.5"), "--evict-scorer", "invalid choice"),
    # the KV flags
    (("--kv", "k9"), "--kv: preset: 'k9' is unknown", "allowed:"),
    (("--kv", "{files}/missing.json"), "--kv: ", "does not exist"),
    (("--kv-keys", "int5"), "--kv-keys: 'int5' has an unknown type", "int4:g32"),
    (("--kv-values", "int4:g0"), "--kv-values: 'int4:g0' has group size 0", "allowed:"),
    (("--kv-values", "int4:fast"), "--kv-values: 'int4:fast' has an unknown or repeated part", "allowed:"),
    (("--kv-values", "exact:g32"), "--kv-values: 'exact:g32' gives a group", "allowed:"),
    (("--kv-keys", "nf8"), "--kv-keys: 'nf8' has an unknown type", "nf4"),
    (("--kv-keys", "int4:g128"), "--kv-keys: 'int4:g128'", "does not divide block_size 64"),
    (("--kv-values", "int4:g48"), "--kv-values: k4v2+values=int4:g48 does not fit the model", "head_dim 64"),
    (("--evict", "0"), "--evict: 0.0 is not allowed", "(0, 1]"),
    (("--evict", "1.5"), "--evict: 1.5 is not allowed", "(0, 1]"),
    (("--evict-scorer", "h2o"), "--evict-scorer: 'h2o' given without --evict", "add --evict"),
    (("--kv", "h2o-50", "--evict", "0.3"), "--evict: --kv h2o-50 already has a token policy", "k4v2"),
    (  # an attention scorer needs the fused path
        ("--kv", "k4v4", "--evict", "0.5", "--evict-scorer", "h2o", "--attn", "reference"),
        "--attn: 'reference' cannot run",
        "fused",
    ),
    (("--model", "./no/such/model"), "'./no/such/model'", "does not exist"),
]


@pytest.mark.parametrize(("flags", "needle", "allowed"), GENERATE_REFUSALS, ids=lambda v: None)
def test_generate_refuses_before_loading(
    flags, needle, allowed, tiny_llama_dir, bad_files, no_model_load, capsys
) -> None:
    flags = [f.format(files=bad_files) for f in flags]
    code, _, err = cli(generate(tiny_llama_dir, *flags), capsys)
    assert code == 2 and needle in err and allowed in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("missing.txt", "does not exist"),
        ("dir", "is a directory; allowed: a UTF-8 text file"),
        ("binary.bin", "is not UTF-8 text"),
        ("latin1.txt", "is not UTF-8 text"),
        ("empty.txt", "holds no text"),
        ("blank.txt", "holds no text"),
    ],
)
def test_generate_refuses_bad_prompt_files(name, needle, tiny_llama_dir, bad_files, no_model_load, capsys):
    argv = generate(tiny_llama_dir, "--prompt-file", str(bad_files / name), prompt=None)
    code, _, err = cli(argv, capsys)
    assert code == 2 and f"--prompt-file: '{bad_files / name}'" in err and needle in err


@pytest.mark.parametrize("prompt", ["", " ", "   \n\t ", None])
def test_generate_refuses_empty_prompts(prompt, tiny_llama_dir, no_model_load, capsys) -> None:
    code, _, err = cli(generate(tiny_llama_dir, prompt=prompt), capsys)
    assert code == 2 and "prompt: " in err
    assert ("missing" if prompt is None else "empty or whitespace only") in err


def test_generate_refuses_a_context_overflow_before_generating(tiny_llama_dir, monkeypatch, capsys) -> None:
    from transformers import LlamaForCausalLM

    def generate_(*args, **kwargs):
        raise AssertionError("generation started before the context was checked")

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate_)
    code, _, err = cli([*generate(tiny_llama_dir), "--max-new-tokens", "4096"], capsys)
    assert code == 2 and "+ --max-new-tokens 4096" in err and "exceed the model's context of 4096" in err
    assert "allowed: --max-new-tokens <=" in err


# --------------------------------------------------------------------------- generate: obeyed


@pytest.mark.parametrize(
    ("flags", "label", "config"),
    [
        (
            ("--kv-keys", "int8", "--kv-values", "int4:g32"),
            "k4v2+keys=int8+values=int4:g32, reference path",
            "keys int8 per-channel g64, values int4 per-token g32",
        ),
        (("--kv", "k4v4", "--kv-values", "exact"), "k4v4+values=exact", "values exact"),
        (("--kv-keys", "fp8"), "k4v2+keys=fp8", "keys fp8_e4m3 per-channel g64"),
        (("--kv-values", "nf4:g64"), "k4v2+values=nf4:g64, reference path", "values nf4 per-token g64"),
        (("--kv", "none", "--kv-keys", "int4"), "none+keys=int4", "keys int4 per-channel g64, values exact"),
        (("--evict", "0.25"), "k4v2+evict=0.25:knorm, reference path", "evict 25% by knorm"),
        (("--kv", "none", "--evict", "0.5"), "none+evict=0.5:knorm", "keys exact, values exact"),
        pytest.param(
            ("--evict", "0.5", "--evict-scorer", "snapkv"),
            "k4v2+evict=0.5:snapkv, fused path",
            "evict 50% by attention",
            marks=needs_kernels,
        ),
        (("--sample", "--top-k", "5", "--seed", "7"), "k4v2, reference path", "top-k 5, seed 7"),
        (("--sample",), "k4v2, reference path", "temperature 0.7, top-p 0.9, top-k off, seed 0"),
        ((), "k4v2, reference path", "greedy decoding"),
    ],
)
def test_generate_obeys_and_reports_what_ran(flags, label, config, tiny_llama_dir, capsys) -> None:
    code, _, err = cli(generate(tiny_llama_dir, *flags), capsys)
    assert code == 0, err
    assert f"KV cache ({label}" in err and config in err
    assert "Warning" not in err and "Traceback" not in err


def test_decoding_passes_every_sampling_setting() -> None:
    """Greedy passes no sampling setting (no warning); sampling passes all, top-k 0 (off) included,
    so that transformers' default top-k 50 is not applied behind the user's back."""
    assert Decoding().generate_kwargs() == {"do_sample": False}
    sampled = Decoding(True, 0.5, 0.8).generate_kwargs()
    assert sampled == {"do_sample": True, "temperature": 0.5, "top_p": 0.8, "top_k": 0}


# ----------------------------------------------------------------------- kv_args: specs, configs


@pytest.mark.parametrize(
    ("text", "role", "like", "expected"),
    [
        ("int4", "key", None, QuantSpec(bits=4, axis="channel", group_size=64)),
        ("int2", "value", None, QuantSpec(bits=2, axis="token", group_size=64)),
        ("INT8:g32", "value", None, QuantSpec(bits=8, axis="token", group_size=32)),
        ("int3:g16:channel", "value", None, QuantSpec(bits=3, axis="channel", group_size=16)),
        ("nf4", "value", None, QuantSpec(bits=4, format="nf", axis="token", group_size=64)),
        ("fp8", "key", None, QuantSpec(bits=8, format="fp8_e4m3", axis="channel", group_size=64)),
        ("fp8_e5m2:g32", "value", None, QuantSpec(bits=8, format="fp8_e5m2", axis="token", group_size=32)),
        # group and axis of the spec replaced
        ("int8", "value", QuantSpec(bits=2, axis="token", group_size=32), QuantSpec(bits=8, group_size=32)),
        ("int2", "key", QuantSpec(bits=4, axis="channel", group_size=128), QuantSpec(2, "channel", 128)),
        ("exact", "key", QuantSpec(bits=4), None),
    ],
)
def test_parse_spec(text, role, like, expected) -> None:
    assert parse_spec(text, "--kv-x", like, role) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "is empty"),
        ("int", "unknown type"),
        ("int16", "unknown type"),
        ("q4_0", "unknown type"),
        ("int4:g", "unknown or repeated part"),
        ("int4:g-1", "unknown or repeated part"),
        ("int4:g32:g64", "unknown or repeated part"),
        ("int4:token:channel", "unknown or repeated part"),
        ("exact:token", "gives a group or axis"),
    ],
)
def test_parse_spec_refuses(text, why) -> None:
    with pytest.raises(ValueError, match=f"--kv-x: .*{why}.*allowed: TYPE") as info:
        parse_spec(text, "--kv-x")
    assert "int4:g32" in str(info.value)  # the message shows the allowed forms


def test_values_fit_the_head_dim_when_replacing_an_exact_tensor(tiny_llama) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**{**tiny_llama.config.to_dict(), "head_dim": 80, "hidden_size": 320})
    kv = KVChoice("none", values="int4").resolve(config)
    assert kv.config.value.group_size == 40  # 64 fitted to head_dim 80 (fit_group_size)


def test_keys_and_values_replace_every_layer_override(tmp_path) -> None:
    base = PRESETS["k4v4"].replace(
        layer_overrides=(LayerOverride(0, None, QuantSpec(bits=2, group_size=32)),)
    )
    path = tmp_path / "calibrated.json"
    path.write_text(json.dumps(base.to_dict()))
    kv = KVChoice(str(path), keys="int8", values="int4").resolve()
    (override,) = kv.config.layer_overrides
    assert override.key == kv.config.key == QuantSpec(bits=8, axis="channel", group_size=64)
    assert override.value == QuantSpec(bits=4, axis="token", group_size=32)  # its own group kept
    assert kv.source == kv.config and kv.label == f"{path}+keys=int8+values=int4"


@pytest.mark.parametrize(
    ("kv", "scorer", "default", "needs_attention"),
    [("none", "knorm", "exact", False), ("k4v4", "h2o", "low", True), ("k2v2", "snapkv", "low", True)],
)
def test_evict_builds_the_policy_of_the_presets(kv, scorer, default, needs_attention) -> None:
    config = KVChoice(kv, evict=0.5, evict_scorer=scorer).resolve().config
    assert config.tokens.evict == 0.5 and config.tokens.default == default
    assert config.needs_attention is needs_attention
    assert config.replace(tokens=None) == PRESETS[kv]  # the rest of the base is kept


@pytest.mark.parametrize("kv", ["best-3bit", "best-2bit"])
def test_attention_scorers_take_every_format(kv: str) -> None:
    """Since the fused kernels read every format (codebooks, outliers, rotations, pre-RoPE keys), an
    attention-scored eviction combines with any base."""
    config = KVChoice(kv, evict=0.3, evict_scorer="h2o").resolve().config
    assert config.needs_attention and config.read_paths == ("fused",)
    values = KVChoice("k4v2", values="nf4", evict=0.5, evict_scorer="snapkv").resolve().config
    assert values.needs_attention and "fused" in values.read_paths


def test_evict_matches_the_named_presets_exactly() -> None:
    from kvsqueeze.config import TOKEN_PRESETS

    for name, scorer in (("knorm-50", "knorm"), ("h2o-50", "h2o"), ("snapkv-50", "snapkv")):
        built = KVChoice("none", evict=0.5, evict_scorer=scorer).resolve().config
        assert built.tokens == TOKEN_PRESETS[name].tokens
    assert KVChoice("k4v4", evict=0.5, evict_scorer="h2o").resolve().config == TOKEN_PRESETS["h2o-50-k4v4"]


def test_an_unmodified_preset_is_passed_by_name_and_best_presets_say_bundled() -> None:
    from transformers import AutoConfig

    from kvsqueeze.models import resolve_model

    smollm = AutoConfig.from_pretrained(resolve_model("smollm2-135m"))
    kv = KVChoice("best-3bit").resolve(smollm)
    assert kv.source == "best-3bit" and kv.label == "best-3bit (bundled calibration for this model)"
    assert kv.config.layer_overrides  # what the cache resolves the name to on this model
    changed = KVChoice("best-3bit", keys="int4").resolve(smollm)
    assert isinstance(changed.source, CacheConfig) and changed.config.layer_overrides
    assert {(o.key.bits, o.key.format.value) for o in changed.config.layer_overrides} == {(4, "int")}


# ------------------------------------------------------------------------------ bench: refusals


def bench(model_dir, *flags: str) -> list[str]:
    return ["bench", "--model", str(model_dir), "--no-progress", *flags]


BENCH_REFUSALS = [
    # speed-only flags with --memory-budget
    (
        ("--memory-budget", "1MiB", "--contexts", "64"),
        "--memory-budget: the capacity report does not use --contexts",
    ),
    (("--memory-budget", "1MiB", "--new-tokens", "4"), "does not use --new-tokens"),
    (("--memory-budget", "1MiB", "--repeats", "2", "--warmup", "0"), "does not use --repeats, --warmup"),
    (("--memory-budget", "1MiB", "--text-file", "{files}/short.txt"), "does not use --text-file"),
    (("--memory-budget", "1MiB", "--plot", "{out}/x.png"), "does not use --plot"),
    # numbers
    (("--memory-budget", "0MiB"), "--memory-budget: '0MiB' must be more than 0 bytes"),
    (("--memory-budget=-1GiB",), "--memory-budget: '-1GiB' is not a size"),
    (("--new-tokens", "1"), "--new-tokens: 1 must be an integer >= 2"),
    (("--repeats", "0"), "--repeats: 0 must be an integer >= 1"),
    (("--warmup", "-1"), "--warmup: -1 must be an integer >= 0"),
    (("--threads", "0"), "--threads: 0 must be an integer >= 1"),
    (("--contexts", "64,0"), "--contexts: '0' is not a positive integer"),
    (("--contexts", "64,64"), "--contexts: 64 given more than once"),
    (("--contexts", "64,5000"), "--contexts: 5000 + --new-tokens 16 - 1 = 5015 tokens exceed"),
    (("--batch-sizes", "1,,2"), "--batch-sizes: '' is not a positive integer"),
    (("--batch-sizes", "2,2"), "--batch-sizes: 2 given more than once"),
    (("--new-tokens", "x"), "argument --new-tokens: invalid int value: 'x'"),
    (("--dtype", "float8"), "argument --dtype: invalid choice: 'float8'"),
    # output paths, before the run
    (("--out", "/proc/nope/bench.json"), "--out: '/proc/nope/bench.json' cannot be written"),
    (("--out", "{out}"), "--out: '{out}' is a directory; allowed: a file path"),
    (
        ("--plot", "/proc/nope/bench.png", "--out", "{out}/b.json"),
        "--plot: '/proc/nope/bench.png' cannot be written",
    ),
    (
        ("--memory-budget", "1MiB", "--out", "/proc/nope/c.json"),
        "--out: '/proc/nope/c.json' cannot be written",
    ),
    # input text
    (("--text-file", "{files}/missing.txt"), "--text-file: '{files}/missing.txt' does not exist"),
    (("--text-file", "{files}/binary.bin"), "is not UTF-8 text"),
    (("--text-file", "{files}/dir"), "is a directory"),
    (("--text-file", "{files}/blank.txt"), "holds no text"),
    (
        ("--text-file", "{files}/short.txt", "--contexts", "64"),
        "tokens, fewer than the context 64 of --contexts",
    ),
    # methods and the KV flags
    (("--methods", "exact,bogus"), "--methods: method: 'bogus' is unknown"),
    (("--kv", "k4v4"), "--kv: 'k4v4' alone adds no method"),
    (("--evict-scorer", "h2o"), "--evict-scorer: 'h2o' given without --evict"),
    (("--kv-keys", "int9"), "--kv-keys: 'int9' has an unknown type"),
    (("--evict", "2"), "--evict: 2.0 is not allowed"),
    (("--kv", "k4v4", "--kv-values", "int4:g48"), "--kv-values: k4v4+values=int4:g48 does not fit the model"),
]


@pytest.mark.parametrize(("flags", "needle"), BENCH_REFUSALS, ids=lambda v: None)
def test_bench_refuses_before_loading(
    flags, needle, tiny_llama_dir, bad_files, tmp_path, no_model_load, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out, results/bench.json, is probed there
    fill = {"files": bad_files, "out": tmp_path}
    code, out, err = cli(bench(tiny_llama_dir, *[f.format(**fill) for f in flags]), capsys)
    assert code == 2 and needle.format(**fill) in err, err
    assert "Traceback" not in err and out == ""
    assert not list(tmp_path.rglob("*.json"))  # nothing measured, nothing saved


# ------------------------------------------------------------------------------- bench: output


def test_bench_saves_json_and_prints_a_table_and_one_short_line(tiny_llama_dir, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    flags = ["--methods", "exact,k4v4", "--kv-values", "int4:g32", "--contexts", "64", "--batch-sizes", "1"]
    flags += ["--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    code, stdout, err = cli(bench(tiny_llama_dir, *flags), capsys)
    assert code == 0, err
    assert f"saved to {out}" in err and (tmp_path / "bench.png").is_file()
    *table, last = stdout.strip().splitlines()
    assert "k4v2+values=int4:g32" in "\n".join(table)
    line = json.loads(last)
    assert "rows" not in line and line["saved"] == str(out) and len(last) < 2000
    assert (
        line["config"]["methods"] == ["exact", "k4v4", "k4v2+values=int4:g32"]
        and "git" in line["environment"]
    )
    data = json.loads(out.read_text())
    assert len(data["results"]["rows"]) == 3
    ran = CacheConfig.from_dict(data["results"]["method_configs"]["k4v2+values=int4:g32"])
    assert ran == KVChoice("k4v2", values="int4:g32").resolve().config


def test_bench_capacity_with_a_custom_method(tiny_llama_dir, tmp_path, capsys) -> None:
    out = tmp_path / "capacity.json"
    flags = ["--memory-budget", "1MiB", "--methods", "exact", "--kv-keys", "int2:g32", "--kv", "k2v2"]
    code, stdout, err = cli(bench(tiny_llama_dir, *flags, "--batch-sizes", "1", "--out", str(out)), capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["results"]["rows"]
    custom = next(r for r in rows if r["method"] == "k2v2+keys=int2:g32")
    assert custom["predicted_bytes"] == custom["allocated_bytes"] <= 2**20
    assert "rows" not in json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ help and tables


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_every_option_has_help_with_its_default(command) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings or action.dest}: no help"
        if action.option_strings:
            assert "default" in action.help, f"{command} {action.option_strings}: default not shown"
    text = sub.format_help()
    if command == "generate":
        assert "(default: k4v2)" in " ".join(text.split())


@pytest.mark.parametrize("width", [80, 100])
def test_tables_fit_the_terminal_and_keep_the_method_whole(width, capsys) -> None:
    names = ["exact", "k2v2-keep10-krange", "k4v2+keys=int8:g32+values=nf4:g64+evict=0.5:snapkv"]
    columns = ["method", "batch", "context", "TTFT\ns", "TPOT\nms", "spread", "decode\ntok/s", "KV\nMiB"]
    table = new_table("speed", columns)
    for name in names:
        table.add_row(name, "16", "131072", "12.23", "145.6", "3%", "21.9", "1212.5")
    print_fitted(table, width)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= width
    first_words = "".join(line.split()[0] for line in lines if line.strip())  # folded names rejoin
    assert all(name in first_words for name in names)
    assert "…" not in "".join(lines)  # nothing cut
