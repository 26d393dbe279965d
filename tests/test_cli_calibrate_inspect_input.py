"""`kvsqueeze calibrate` and `kvsqueeze inspect` refuse every bad value early and clearly (issue 12).

Every bad value of every option exits with code 2 and a one-line message naming the option, with no
traceback, before the model's weights load (`load_model` is patched to fail the test); the
calibration file carries the model fingerprint and its ``config`` reloads into exactly the config the
calibration selected.
"""

from __future__ import annotations

import io
import json
import math
import random
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from kvsqueeze.calibration.allocation import with_bits
from kvsqueeze.calibration.checks import model_fingerprint, reachable_bits
from kvsqueeze.calibration.inspection import (
    check_inspection,
    inspect_model,
    min_prefill_tokens,
    quantized_presets,
)
from kvsqueeze.calibration.run import calibrate
from kvsqueeze.cli import build_parser, main, subparsers
from kvsqueeze.config import CacheConfig, LayerOverride, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLED = Path(__file__).resolve().parents[1] / "src/kvsqueeze/calibration/bundled"
WORDS = (
    "the game began development in 2010 carrying over a large portion of work done on its predecessor "
    "while it retained the standard features of the series it also underwent multiple adjustments"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Text files (about 6,000 / 300 / 10 tokens) and bad inputs of every kind."""
    folder = tmp_path_factory.mktemp("inputs")
    rng, words = random.Random(0), WORDS.split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + " .\n" for _ in range(400)]
    paths = {
        "long": "".join(lines),
        "short": "".join(lines[:20]),
        "tiny": "The game began development in 2010 .",
        "empty": "  \n",
        "not_json": "{calibration: yes",
        "json_list": "[1, 2]",
        "no_keys": json.dumps({"config": {}}),
    }
    out = {}
    for name, text in paths.items():
        out[name] = folder / f"{name}.txt"
        out[name].write_text(text)
    out["binary"] = folder / "binary.txt"
    out["binary"].write_bytes(b"\x00\xff\xfe caf\xe9")
    out["folder"] = folder
    out["no_config"] = folder / "no-config-model"
    out["no_config"].mkdir()
    out["overrides"] = folder / "overrides.json"
    base = resolve_config("k4v4")
    out["overrides"].write_text(
        json.dumps(base.replace(layer_overrides=(LayerOverride(0, base.key, base.value),)).to_dict())
    )
    return out


@pytest.fixture
def no_weights(monkeypatch):
    """Fail if a command loads the model's weights: every refusal must come before."""

    def refuse(*args, **kwargs):
        raise RuntimeError("the model was loaded before the input was refused")

    monkeypatch.setattr("kvsqueeze.models.load_model", refuse)


def _reuse_file(folder: Path, model_config, tokens: list[int], preset: str = "best-3bit") -> Path:
    """A bit-allocation calibration file of the tiny model (made up, but shaped as calibrate writes it)."""
    sens = {str(layer): {"2": 0.3, "3": 0.1, "4": 0.01} for layer in (0, 1)}
    data = {
        "model": model_fingerprint(model_config),
        "config": resolve_config(preset, head_dim=64).to_dict(),
        "calibration": {"tokens": tokens, "bits_menu": [2, 3, 4], "sensitivity_protocol": "made up",
                        "sensitivity": {"key": sens, "value": sens}},
    }  # fmt: skip
    path = folder / f"reuse-{tokens[0]}-{preset}.json"
    path.write_text(json.dumps(data))
    return path


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, " ".join(err.split())  # rich wraps at 80 columns


# (option, its bad value(s) as extra argv, text expected in the message); {long} etc. are `files`
CALIBRATE_BAD = [
    ("--tokens", ["--tokens", "0"], "--tokens: 0; allowed: a positive integer"),
    ("--tokens", ["--tokens", "-5"], "--tokens: -5; allowed: a positive integer"),
    ("--tokens", ["--tokens", "x"], "--tokens: invalid int value: 'x'"),
    ("--tokens", ["--tokens", "99999"], "--tokens: 99999 exceeds the"),
    ("--tokens", ["--tokens", "5000"], "--tokens: 5000 tokens exceed the model's context of 4096"),
    ("--prefill", ["--prefill", "0"], "--prefill: 0; allowed: a positive integer"),
    ("--prefill", ["--prefill", "-128"], "--prefill: -128; allowed: a positive integer"),
    ("--prefill", ["--prefill", "100"], "--prefill: 100 is not a multiple of the preset's block_size 128"),
    ("--prefill", ["--prefill", "2048"], "--prefill: 2048 with --score 64 and the preset's 4 sink tokens"),
    ("--prefill", ["--reuse", "{reuse}", "--prefill", "128"], "--prefill: 128 is not used with --reuse"),
    ("--score", ["--score", "0"], "--score: 0; allowed: a positive integer"),
    ("--score", ["--score", "-3"], "--score: -3; allowed: a positive integer"),
    ("--score", ["--score", "5000"], "--score 5000"),
    ("--target-bits", ["--target-bits", "1.0"], "--target-bits: 1.0 is outside"),
    ("--target-bits", ["--target-bits", "20"], "--target-bits: 20.0 is outside"),
    ("--target-bits", ["--target-bits", "nan"], "--target-bits: nan is outside"),
    ("--target-bits", ["--target-bits", "inf"], "--target-bits: inf is outside"),
    ("--target-bits", ["--bits", "2"], "--target-bits: not given, so the preset's 3.535"),
    (
        "--bits",
        ["--bits", "2,x"],
        "--bits: 'x' is not an integer; allowed: comma-separated bits from {2,3,4,8}",
    ),
    ("--bits", ["--bits", "5"], "--bits: 5 is not a supported width; allowed: comma-separated bits from"),
    ("--bits", ["--bits", ""], "--bits: '' is not an integer"),
    ("--bits", ["--bits", "2,,4"], "--bits: '' is not an integer"),
    (
        "--preset",
        ["--preset", "bogus"],
        "--preset: 'bogus' is unknown; allowed: a config .json file or one of",
    ),
    ("--preset", ["--preset", "/no/such/config.json"], "--preset: '/no/such/config.json' is not a usable"),
    ("--preset", ["--preset", "none"], "--preset: 'none' has no key and value specs"),
    (
        "--preset",
        ["--preset", "{overrides}"],
        "has no key and value specs to calibrate, or per-layer overrides",
    ),
    ("--bits", ["--preset", "k2v2-keep10", "--bits", "2,4"], "--bits: 'k2v2-keep10' has a token policy"),
    (
        "--target-bits",
        ["--preset", "k2v2-keep10", "--target-bits", "3"],
        "--target-bits: 'k2v2-keep10' has a token",
    ),
    (
        "--reuse",
        ["--preset", "k2v2-keep10", "--reuse", "{reuse}"],
        "--reuse: 'k2v2-keep10' has a token policy",
    ),
    (
        "--reuse",
        ["--reuse", "/no/such/calibration.json"],
        "--reuse: '/no/such/calibration.json' does not exist",
    ),
    ("--reuse", ["--reuse", "{not_json}"], "is not JSON"),
    ("--reuse", ["--reuse", "{json_list}"], "has no 'calibration' object"),
    ("--reuse", ["--reuse", "{no_keys}"], "has no 'calibration' object"),
    ("--reuse", ["--reuse", "{empty}"], "holds no text"),
    ("--reuse", ["--reuse", f"{BUNDLED}/smollm2-135m-best-3bit.json"], "was made for the model"),
    ("--reuse", ["--reuse", f"{BUNDLED}/smollm2-135m-k2v2-keep10.json"], "is a token-policy calibration"),
    ("--reuse", ["--reuse", "{reuse}"], "--reuse: was calibrated on token ids [0, 100)"),
    ("--reuse", ["--reuse", "{reuse}", "--bits", "2,8"], "--reuse: holds no sensitivities for widths [8]"),
    ("--reuse", ["--reuse", "{reuse_2bit}"], "--reuse: was calibrated with other formats than this preset"),
    (
        "--out",
        ["--out", "/proc/nope/calibration.json"],
        "--out: '/proc/nope/calibration.json' cannot be written",
    ),
    ("--out", ["--out", "{folder}"], "is a directory; allowed: a file path"),
    ("--text-file", ["--text-file", "/no/such/text.txt"], "--text-file: '/no/such/text.txt' does not exist"),
    ("--text-file", ["--text-file", "{binary}"], "is not UTF-8 text"),
    ("--text-file", ["--text-file", "{empty}"], "holds no text"),
    ("--text-file", ["--text-file", "{folder}"], "is a directory"),
    ("--text-file", ["--text-file", "{short}"], "--tokens: 1024 exceeds the"),
    ("--model", ["--model", "./no/such/model"], "--model: path './no/such/model' does not exist"),
    ("--model", ["--model", "{no_config}"], "has no config.json"),
    ("--model", ["--model", "{binary}"], "is a file"),
]

INSPECT_BAD = [
    ("--tokens", ["--tokens", "0"], "--tokens: 0; allowed: a positive integer"),
    ("--tokens", ["--tokens", "-512"], "--tokens: -512; allowed: a positive integer"),
    ("--tokens", ["--tokens", "200"], "--tokens: 200 tokens leave 72 to prefill"),
    ("--tokens", ["--tokens", "5000"], "--tokens: 5000 exceeds the model's context of 4096"),
    ("--tokens", ["--tokens", "x"], "--tokens: invalid int value: 'x'"),
    ("--tokens", ["--text-file", "{short}"], "--tokens: 512 exceeds the"),
    ("--decode-tokens", ["--decode-tokens", "0"], "--decode-tokens: 0; allowed: a positive integer"),
    ("--decode-tokens", ["--decode-tokens", "-4"], "--decode-tokens: -4; allowed: a positive integer"),
    ("--decode-tokens", ["--decode-tokens", "600"], "before the 600 checked ones (--decode-tokens)"),
    ("--max-bits", ["--max-bits", "0"], "--max-bits: 0.0; allowed: a positive number"),
    ("--max-bits", ["--max-bits", "-1"], "--max-bits: -1.0; allowed: a positive number"),
    ("--max-bits", ["--max-bits", "nan"], "--max-bits: nan; allowed"),
    ("--max-bits", ["--max-bits", "inf"], "--max-bits: inf; allowed"),
    ("--max-bits", ["--max-bits", "1.5"], "--max-bits: 1.5 leaves no preset to recommend"),
    ("--text-file", ["--text-file", "{tiny}"], "holds 11 tokens; inspect needs at least 261"),
    ("--text-file", ["--text-file", "/no/such/text.txt"], "--text-file: '/no/such/text.txt' does not exist"),
    ("--text-file", ["--text-file", "{binary}"], "is not UTF-8 text"),
    ("--model", ["--model", "./no/such/model"], "--model: path './no/such/model' does not exist"),
    ("--model", ["--model", "{no_config}"], "has no config.json"),
]


def _argv(command: str, extra: list[str], files: dict, tiny_llama_dir: Path, tiny_llama) -> list[str]:
    folder = files["folder"]
    names = {k: str(v) for k, v in files.items()}
    names["reuse"] = str(_reuse_file(folder, tiny_llama.config, [0, 100]))
    names["reuse_2bit"] = str(_reuse_file(folder, tiny_llama.config, [0, 100], "best-2bit"))
    extra = [a.format(**names) for a in extra]
    defaults = ["--model", str(tiny_llama_dir), "--text-file", names["long"]]
    if command == "calibrate":
        defaults += ["--out", str(folder / "out.json")]
    for i in range(0, len(defaults), 2):  # the case's own value of an option wins
        if defaults[i] not in extra:
            extra += defaults[i : i + 2]
    return [command, *extra]


@pytest.mark.parametrize(
    ("option", "extra", "needle"), CALIBRATE_BAD, ids=[f"{o} {' '.join(e)}" for o, e, _ in CALIBRATE_BAD]
)
def test_calibrate_refuses_each_bad_value_before_loading_the_model(
    option, extra, needle, files, tiny_llama_dir, tiny_llama, no_weights, capsys
) -> None:  # fmt: skip
    code, err = _run(_argv("calibrate", extra, files, tiny_llama_dir, tiny_llama), capsys)
    assert code == 2, err
    assert option in err and needle in err
    assert "Traceback" not in err and "was loaded" not in err


@pytest.mark.parametrize(
    ("option", "extra", "needle"), INSPECT_BAD, ids=[f"{o} {' '.join(e)}" for o, e, _ in INSPECT_BAD]
)
def test_inspect_refuses_each_bad_value_before_loading_the_model(
    option, extra, needle, files, tiny_llama_dir, tiny_llama, no_weights, capsys
) -> None:  # fmt: skip
    code, err = _run(_argv("inspect", extra, files, tiny_llama_dir, tiny_llama), capsys)
    assert code == 2, err
    assert option in err and needle in err
    assert "Traceback" not in err and "was loaded" not in err


def test_every_option_of_each_command_is_refused_by_a_case() -> None:
    for command, cases in (("calibrate", CALIBRATE_BAD), ("inspect", INSPECT_BAD)):
        parser = dict(subparsers(build_parser()))[command]
        options = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.nargs != 0}
        assert options - {"--help"} == {option for option, _, _ in cases}


def test_target_bits_range_is_what_the_widths_reach(
    files, tiny_llama_dir, tiny_llama, no_weights, capsys
) -> None:
    base = resolve_config("best-3bit", head_dim=64)
    lo, hi = reachable_bits(base, (2, 3, 4))
    assert (with_bits(base.key, 2).bits_per_element + with_bits(base.value, 2).bits_per_element) / 2 == lo
    _, err = _run(_argv("calibrate", ["--target-bits", "20"], files, tiny_llama_dir, tiny_llama), capsys)
    assert f"allowed: {math.ceil(lo * 1e4) / 1e4:g} to {math.floor(hi * 1e4) / 1e4:g} bits/element" in err
    assert 2 < lo < 2.6 and 4 < hi < 4.6


def test_help_describes_every_option_with_its_default() -> None:
    for command in ("calibrate", "inspect"):
        parser = dict(subparsers(build_parser()))[command]
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, action.option_strings
                assert "default" in parser.formatter_class(command)._get_help_string(action), (
                    action.option_strings
                )


def test_calibration_file_reloads_into_the_config_it_selected(
    files, tiny_llama_dir, tmp_path, capsys
) -> None:
    out, again = tmp_path / "cal.json", tmp_path / "again.json"
    argv = ["calibrate", "--model", str(tiny_llama_dir), "--text-file", str(files["long"]), "--tokens", "400",
            "--prefill", "128", "--score", "16", "--target-bits", "3.2", "--out", str(out)]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert "key layer 0: 2b" in capsys.readouterr().err  # the sensitivities were measured
    assert not [w for w in caught if "kvsqueeze" in w.filename], [str(w.message) for w in caught]
    data = json.loads(out.read_text())
    assert data["model"] == {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
    }
    cal = data["calibration"]
    base = resolve_config("best-3bit", head_dim=64)
    codebooks = cal["codebooks"]

    def spec(kind: str, layer: int):
        bits = cal["allocation"][f"{kind}.{layer}"]
        book = codebooks[kind].get(str(layer), {}).get(str(bits))
        return with_bits(
            base.key if kind == "key" else base.value, bits, None if book is None else tuple(book)
        )

    selected = base.replace(
        layer_overrides=tuple(LayerOverride(i, spec("key", i), spec("value", i)) for i in (0, 1))
    )
    selected = selected.replace(model_fingerprint=data["model"])  # the model it was calibrated for
    assert CacheConfig.load(out) == CacheConfig.from_dict(data["config"]) == selected
    assert selected.bits_per_element(num_layers=2) == pytest.approx(cal["bits_per_element"])
    assert cal["bits_per_element"] <= 3.2

    # --reuse redoes only the allocation, on the same slice, and keeps the measured protocol
    argv = ["calibrate", "--model", str(tiny_llama_dir), "--text-file", str(files["long"]), "--tokens", "400",
            "--reuse", str(out), "--target-bits", "4.2", "--out", str(again)]  # fmt: skip
    assert main(argv) == 0
    redo = json.loads(again.read_text())["calibration"]
    assert (
        redo["sensitivity"] == cal["sensitivity"]
        and redo["sensitivity_protocol"] == cal["sensitivity_protocol"]
    )
    assert cal["bits_per_element"] < redo["bits_per_element"] <= 4.2
    assert redo["sensitivity_from"] == str(out)
    assert "key layer 0" not in capsys.readouterr().err  # and not measured again


def test_token_policy_calibration_reloads_into_the_config_it_selected(
    files, tiny_llama_dir, tmp_path
) -> None:
    out = tmp_path / "keep.json"
    argv = ["calibrate", "--model", str(tiny_llama_dir), "--text-file", str(files["long"]), "--preset", "k2v2-keep10",
            "--tokens", "300", "--prefill", "128", "--score", "16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    fractions = tuple((int(layer), f) for layer, f in data["calibration"]["layer_keep_exact"].items())
    base = resolve_config("k2v2-keep10", head_dim=64)
    selected = base.replace(
        tokens=replace(base.tokens, layer_keep_exact=fractions), model_fingerprint=data["model"]
    )
    assert CacheConfig.load(out) == CacheConfig.from_dict(data["config"]) == selected
    assert data["model"]["num_hidden_layers"] == 2


def test_library_calibrate_refuses_bad_arguments_before_any_forward(tiny_llama) -> None:
    import torch

    ids = torch.arange(1, 700)
    base = resolve_config("best-3bit", head_dim=64)
    bad = [
        (dict(num_tokens=0), "num_tokens: 0"),
        (dict(prefill_tokens=100), "prefill_tokens: 100 is not a multiple"),
        (dict(score_tokens=0), "score_tokens: 0"),
        (dict(num_tokens=300), "prefill_tokens: 256 with score_tokens 64"),
        (dict(target_bits=9.0), "target_bits: 9.0 is outside"),
        (dict(bits_menu=(2, 5)), "bits_menu: 5 is not a supported width"),
        (dict(num_tokens=1000), "num_tokens: 1000 exceeds the text's 699 tokens"),
        (dict(reuse={"sensitivity": {}}), "reuse: its calibration has a bad or missing entry"),
    ]
    for kwargs, needle in bad:
        args = dict(target_bits=3.0, num_tokens=512, log=lambda m: None) | kwargs
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
            calibrate(tiny_llama, ids, base, **args)


def test_library_inspect_refuses_bad_arguments(tiny_llama) -> None:
    import torch

    configs = quantized_presets(tiny_llama.config)
    least = min_prefill_tokens(configs)
    assert (
        least
        == max(c.sink_tokens + max(c.residual_window + 1, c.block_size) for c in configs.values())
        == 133
    )
    check_inspection(tiny_llama.config, least + 128, 4.6, 128)  # the smallest accepted
    for args, needle in (
        ((torch.arange(1, 11), None, 4), "token_ids: 10 tokens leave 6 to prefill"),
        ((torch.arange(1, 400), None, 0), "decode_tokens: 0"),
        ((torch.arange(1, 400), float("nan"), 8), "max_bits: nan leaves no preset"),
        ((torch.arange(1, 400)[None], None, 8), "token_ids: allowed: a tensor of shape"),
    ):
        with pytest.raises(ValueError, match=needle):
            inspect_model(tiny_llama, *args)


def test_inspect_tables_never_cut_the_preset_column(monkeypatch, files, tiny_llama_dir) -> None:
    import kvsqueeze.calibration.inspection as inspection
    import kvsqueeze.commands.inspect as command

    names = list(quantized_presets(_config(tiny_llama_dir)))
    row = {"bits_per_element": 2.79, "kl": 1e-3, "top1": 0.99, "risk": 0.1, "predicted_risk": 0.1,
           "overflow_layers": [0, 1, 2, 3, 4, 5, 6, 7], "safe": True, "problems": []}  # fmt: skip
    layer = {"key_absmax": 9.5, "key_channel_ratio": 3.1, "key_outlier_channels": [(0, i) for i in range(9)],
             "value_absmax": 1.2}  # fmt: skip
    report = {"layers": {"0": layer}, "presets": dict.fromkeys(names, row), "decode_tokens": 128,
              "unsafe_threshold": 0.5, "max_bits": 4.6, "recommended": names[0]}  # fmt: skip
    monkeypatch.setattr(inspection, "inspect_model", lambda *a, **k: report)
    monkeypatch.setattr("kvsqueeze.models.load_model", lambda *a, **k: (None, None))
    printed = io.StringIO()
    monkeypatch.setattr(command, "print_table", Console(file=printed, width=70).print)
    argv = ["inspect", "--model", str(tiny_llama_dir), "--text-file", str(files["long"])]
    assert main(argv) == 0
    lines = printed.getvalue().splitlines()
    assert all(len(line) <= 70 for line in lines)
    for name in names:
        assert any(line.startswith(f"│ {name} ") for line in lines), name


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)
