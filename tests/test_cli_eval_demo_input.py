"""`kvsqueeze eval quality`, `eval retrieval` and `demo` with a bad value of each of their options:
exit code 2, a message naming the option, no traceback, before the model's weights load and
before any result file is written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kvsqueeze.cli import build_parser, main
from kvsqueeze.config import preset

QUALITY_OPTIONS = {"--model", "--methods", "--text-file", "--hub-wikitext", "--window", "--windows"}
QUALITY_OPTIONS |= {"--prefill", "--chunk", "--second-half", "--out", "--plot"}
RETRIEVAL_OPTIONS = {"--model", "--methods", "--task", "--lengths", "--depths", "--seeds", "--new-tokens"}
RETRIEVAL_OPTIONS |= {"--chunk", "--text-file", "--hub-wikitext", "--out", "--plot"}
DEMO_OPTIONS = {"--model", "--presets", "--new-tokens", "--json", "--context", "--path", "--reference-tokens"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs good and bad: a text, a latin-1 text, an empty one, a folder, a config the tiny
    model (head_dim 64) cannot take, a model folder without config.json."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "text.txt").write_text(" = Valkyria Chronicles = \n The game began development in 2010 . \n" * 80)
    (root / "short.txt").write_text("Too short for a 256-token window.\n")
    (root / "latin1.txt").write_bytes("Café crème, déjà vu.\n".encode("latin-1"))
    (root / "empty.txt").write_text("  \n\t\n")
    (root / "folder").mkdir()
    (root / "no-config-model").mkdir()
    k4v4 = preset("k4v4").to_dict()
    (root / "g40.json").write_text(json.dumps({**k4v4, "value": {**k4v4["value"], "group_size": 40}}))
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a model's weights are loaded: every refusal must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the bad input was refused")

    monkeypatch.setattr("kvsqueeze.models.load_model", refuse)


def _fill(argv: list[str], files: dict[str, Path], tmp: Path) -> list[str]:
    """``argv`` with ``<name>`` replaced by the path of input ``name``, ``<tmp>`` by the test's folder
    and ``<proc>`` by a path that cannot be written."""
    named = {f"<{name}>": str(path) for name, path in files.items()}
    named |= {"<tmp>": str(tmp), "<proc>": "/proc/nope/out.json"}
    filled = []
    for arg in argv:
        for key, value in named.items():
            arg = arg.replace(key, value)
        filled.append(arg)
    return filled


QUALITY_CASES = [
    ("--model", ["--model", "/no/such/model"]),
    ("--model", ["--model", "<no-config-model>"]),
    ("--model", ["--model", "<text.txt>"]),
    ("--methods", ["--methods", "exact,bogus"]),
    ("--methods", ["--methods", "exact,k4v4,k4v4"]),
    ("--methods", ["--methods", ","]),
    ("--methods", ["--methods", "exact,<g40.json>"]),
    ("--methods", ["--methods", "exact@fused"]),
    ("--text-file", ["--text-file", "/no/such/file.txt"]),
    ("--text-file", ["--text-file", "<folder>"]),
    ("--text-file", ["--text-file", "<latin1.txt>"]),
    ("--text-file", ["--text-file", "<empty.txt>"]),
    ("--hub-wikitext", ["--hub-wikitext=yes"]),
    ("--hub-wikitext", ["--hub-wikitext", "--text-file", "<text.txt>"]),
    ("--window", ["--window", "0"]),
    ("--window", ["--window", "-5"]),
    ("--window", ["--window", "1"]),
    ("--window", ["--window", "abc"]),
    ("--window", ["--window", "5000"]),
    ("--windows", ["--windows", "0"]),
    ("--windows", ["--windows", "2.5"]),
    ("--windows", ["--text-file", "<short.txt>"]),
    ("--prefill", ["--prefill", "0"]),
    ("--prefill", ["--prefill", "300"]),
    ("--chunk", ["--chunk", "0"]),
    ("--chunk", ["--chunk", "-1"]),
    ("--second-half", ["--second-half=1"]),
    ("--out", ["--out", "<proc>"]),
    ("--out", ["--out", "<folder>"]),
    ("--plot", ["--plot", "/proc/nope/q.png"]),
    ("--plot", ["--plot", "<tmp>/q.txt"]),
    ("--plot", ["--out", "<tmp>/same.png", "--plot", "<tmp>/same.png"]),
]

RETRIEVAL_CASES = [
    ("--model", ["--model", "/no/such/model"]),
    ("--model", ["--model", "<no-config-model>"]),
    ("--methods", ["--methods", "exact,bogus"]),
    ("--methods", ["--methods", "exact,k4v4,k4v4"]),
    ("--methods", ["--methods", "exact,<g40.json>"]),
    ("--methods", ["--methods", "quanto-int3"]),
    ("--task", ["--task", "haystack"]),
    ("--lengths", ["--lengths", "256,2k"]),
    ("--lengths", ["--lengths", "0"]),
    ("--lengths", ["--lengths", "30"]),
    ("--lengths", ["--lengths", "5000"]),
    ("--lengths", ["--lengths", "256,256"]),
    ("--lengths", ["--lengths", ","]),
    ("--depths", ["--depths", "0.5,1.5"]),
    ("--depths", ["--depths", "-0.1"]),
    ("--depths", ["--depths", "half"]),
    ("--depths", ["--depths", "0.5,0.5"]),
    ("--seeds", ["--seeds", "0"]),
    ("--seeds", ["--seeds", "x"]),
    ("--new-tokens", ["--new-tokens", "0"]),
    ("--new-tokens", ["--new-tokens", "4000"]),
    ("--chunk", ["--chunk", "0"]),
    ("--text-file", ["--text-file", "<text.txt>"]),  # the passkey task reads no text
    ("--text-file", ["--task", "needle", "--text-file", "/no/such.txt"]),
    ("--text-file", ["--task", "needle", "--text-file", "<latin1.txt>"]),
    ("--text-file", ["--task", "needle", "--text-file", "<short.txt>"]),
    ("--hub-wikitext", ["--hub-wikitext"]),  # the passkey task reads no text
    ("--hub-wikitext", ["--task", "needle", "--hub-wikitext=1"]),
    ("--out", ["--out", "<proc>"]),
    ("--plot", ["--plot", "<tmp>/r.gif"]),
    ("--plot", ["--plot", "/proc/nope/r.png"]),
]

DEMO_CASES = [
    ("--model", ["--model", "/no/such/model"]),
    ("--model", ["--model", "<no-config-model>"]),
    ("--presets", ["--presets", "k4v4,bogus"]),
    ("--presets", ["--presets", "exact"]),
    ("--presets", ["--presets", "quanto-int4"]),
    ("--presets", ["--presets", "k4v4,k4v4"]),
    ("--presets", ["--presets", ","]),
    ("--presets", ["--presets", "<g40.json>"]),
    ("--new-tokens", ["--new-tokens", "0"]),
    ("--new-tokens", ["--new-tokens", "-3"]),
    ("--new-tokens", ["--new-tokens", "100000"]),
    ("--new-tokens", ["--new-tokens", "many"]),
    ("--context", ["--context", "0"]),
    ("--context", ["--context", "100000"]),
    ("--context", ["--context", "long"]),
    ("--path", ["--path", "fast"]),
    ("--reference-tokens", ["--reference-tokens", "-1"]),
    ("--reference-tokens", ["--reference-tokens", "some"]),
    ("--json", ["--json", "<proc>"]),
    ("--json", ["--json", "<folder>"]),
]


def _refused(argv: list[str], option: str, tmp_path: Path, capsys) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert option in err, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert not any(p.suffix in (".json", ".png") for p in tmp_path.iterdir() if p.is_file())


@pytest.mark.parametrize(
    ("option", "bad"), QUALITY_CASES, ids=lambda v: v if isinstance(v, str) else " ".join(v)
)
def test_eval_quality_refuses(option, bad, files, tiny_llama_dir, tmp_path, no_weights, capsys) -> None:
    argv = ["eval", "quality", "--model", str(tiny_llama_dir), "--text-file", str(files["text.txt"])]
    argv += ["--window", "256", "--windows", "1", "--prefill", "32", "--chunk", "32"]
    argv += ["--out", str(tmp_path / "quality.json"), "--plot", str(tmp_path / "quality.png")]
    if "--hub-wikitext" in option or bad[:1] == ["--hub-wikitext"]:
        argv.remove("--text-file")
        argv.remove(str(files["text.txt"]))
    _refused([*argv, *_fill(bad, files, tmp_path)], option, tmp_path, capsys)


@pytest.mark.parametrize(
    ("option", "bad"), RETRIEVAL_CASES, ids=lambda v: v if isinstance(v, str) else " ".join(v)
)
def test_eval_retrieval_refuses(option, bad, files, tiny_llama_dir, tmp_path, no_weights, capsys) -> None:
    argv = ["eval", "retrieval", "--model", str(tiny_llama_dir), "--lengths", "256", "--depths", "0.5"]
    argv += ["--seeds", "1", "--new-tokens", "2", "--chunk", "128"]
    argv += ["--out", str(tmp_path / "retrieval.json"), "--plot", str(tmp_path / "retrieval.png")]
    _refused([*argv, *_fill(bad, files, tmp_path)], option, tmp_path, capsys)


@pytest.mark.parametrize(
    ("option", "bad"), DEMO_CASES, ids=lambda v: v if isinstance(v, str) else " ".join(v)
)
def test_demo_refuses(option, bad, files, tiny_llama_dir, tmp_path, no_weights, capsys) -> None:
    argv = ["demo", "--model", str(tiny_llama_dir), "--presets", "k4v4", "--new-tokens", "2"]
    _refused([*argv, *_fill(bad, files, tmp_path)], option, tmp_path, capsys)


@pytest.mark.parametrize(
    ("command", "cases", "options"),
    [
        (["eval", "quality"], QUALITY_CASES, QUALITY_OPTIONS),
        (["eval", "retrieval"], RETRIEVAL_CASES, RETRIEVAL_OPTIONS),
        (["demo"], DEMO_CASES, DEMO_OPTIONS),
    ],
)
def test_every_option_has_help_a_shown_default_and_a_bad_value_case(command, cases, options) -> None:
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in actions} == options
    assert {option for option, _ in cases} == options  # at least one bad value of each option
    text = " ".join(parser.format_help().split())
    for action in actions:
        assert action.help, action.option_strings
        if action.default not in (None, False):
            assert f"(default: {action.default})" in text, action.option_strings
