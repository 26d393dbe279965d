"""CLI habits users expect (issue 12, item 5): ``--version``, defaults and help text on every option
of every subcommand, exit codes (2 refused input, 1 unexpected error with one line and a hint,
130 Ctrl-C), ``presets --model`` checked before any work, and no warning noise at startup."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version

import pytest

import kvsqueeze.commands.presets
from kvsqueeze.cli import DEBUG_SWITCH, HelpFormatter, build_parser, main, subparsers
from kvsqueeze.models import DEFAULT_MODEL

COMMANDS = dict(subparsers(build_parser()))
# the commands a user runs (a parent of further subcommands, e.g. `eval`, has no options of its own)
LEAVES = [name for name in COMMANDS if not any(other.startswith(f"{name} ") for other in COMMANDS)]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option and positional of ``parser`` but -h/--help and the subcommand choice."""
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kvsqueeze {version('kvsqueeze')}"


def test_every_command_is_known() -> None:
    assert {
        "generate",
        "presets",
        "demo",
        "bench",
        "eval quality",
        "eval retrieval",
        "calibrate",
        "inspect",
    } <= set(LEAVES)


@pytest.mark.parametrize("command", LEAVES)
def test_help_shows_the_defaults(command, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default value
    parser = COMMANDS[command]
    assert parser.formatter_class is HelpFormatter
    text = " ".join(parser.format_help().split())
    for action in options(parser):
        shown = action.nargs != 0 and action.default not in (None, "", argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in (action.help or "").lower():
            assert f"default: {action.default}" in text, (command, action.option_strings)


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("generate", "(default: k4v2)"),
        ("presets", f"(default: {DEFAULT_MODEL})"),
        ("eval quality", "(default: 2048)"),
        ("calibrate", "(default: 1024)"),
    ],
)
def test_help_examples(command, shown, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    assert shown in " ".join(COMMANDS[command].format_help().split())


def test_every_option_has_help_text() -> None:
    """Every option of every subcommand, including ones added later; the message lists the options
    lacking a help text."""
    missing = [
        f"{command} {(action.option_strings or [action.dest])[-1]}"
        for command in LEAVES
        for action in options(COMMANDS[command])
        if not (action.help or "").strip()
    ]
    assert not missing, f"options without help text: {missing}"


# ------------------------------------------------------------------------------------ exit codes


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["presets", "--jsn"],
        ["presets", "--model"],
        ["eval"],
        ["generate", "--max-new-tokens", "x"],
    ],
)
def test_argparse_errors_exit_2(argv, capsys) -> None:
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["presets", "--help"], ["eval", "quality", "--help"]])
def test_help_exits_0(argv, capsys) -> None:
    assert main(argv) == 0
    assert "usage: kvsqueeze" in capsys.readouterr().out


def raising(error: BaseException):
    def run(args):
        raise error

    return run


def test_an_unexpected_error_is_one_line_and_a_hint(monkeypatch, capsys) -> None:
    monkeypatch.delenv(DEBUG_SWITCH, raising=False)
    monkeypatch.setattr(kvsqueeze.commands.presets, "run", raising(RuntimeError("boom\nsecond line")))
    assert main(["presets"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "second line" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "unexpected RuntimeError" in lines[0] and "boom" in lines[0]
    assert f"{DEBUG_SWITCH}=1" in lines[1]


def test_debug_switch_shows_the_traceback(monkeypatch) -> None:
    monkeypatch.setenv(DEBUG_SWITCH, "1")
    monkeypatch.setattr(kvsqueeze.commands.presets, "run", raising(KeyError("boom")))
    with pytest.raises(KeyError, match="boom"):
        main(["presets"])


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys) -> None:
    monkeypatch.setattr(kvsqueeze.commands.presets, "run", raising(KeyboardInterrupt()))
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == ""


def test_value_errors_exit_2(monkeypatch, capsys) -> None:
    monkeypatch.setattr(kvsqueeze.commands.presets, "run", raising(ValueError("--flag: 'x' [not] allowed")))
    assert main(["presets"]) == 2
    assert "--flag: 'x' [not] allowed" in " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------------------- presets --model


@pytest.fixture
def bad_models(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (--model value, words the message holds besides the flag)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "no-type").mkdir()
    (tmp_path / "no-type" / "config.json").write_text("{}")
    return {
        "empty": ("", ""),
        "blank": ("  ", ""),
        "folder without config": (str(tmp_path / "empty"), "has no config.json"),
        "a text file": (str(tmp_path / "file.txt"), "file.txt"),
        "missing path": (str(tmp_path / "missing"), "does not exist"),
        "malformed config.json": (str(tmp_path / "broken"), "could not be read"),
        "config without model_type": (str(tmp_path / "no-type"), "could not be read"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "blank",
        "folder without config",
        "a text file",
        "missing path",
        "malformed config.json",
        "config without model_type",
    ],
)
def test_presets_refuses_a_bad_model(case, bad_models, capsys) -> None:
    value, words = bad_models[case]
    assert main(["presets", "--model", value]) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert err.startswith("error: --model:") and words in err and "Traceback" not in err
    assert captured.out == ""


def test_presets_refuses_an_unreachable_hub_id(monkeypatch, capsys) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", offline)
    assert main(["presets", "--model", "org/not-a-model"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--model: 'org/not-a-model' could not be read" in err and "couldn't connect" in err


# ------------------------------------------------------------------------ no warnings at startup

RECORD = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    from kvsqueeze.cli import main
    code = main(sys.argv[1:])
hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
report = {
    "code": code,
    "ours": [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in seen
             if "/kvsqueeze/" in w.filename.replace("\\\\", "/") or str(w.message).startswith("kvsqueeze")],
    "shown": [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in seen
              if not issubclass(w.category, hidden)],
}
print("REPORT " + json.dumps(report))
"""


@pytest.mark.parametrize("argv", [["--help"], ["presets"]])
def test_no_warnings_at_startup(argv) -> None:
    """Every warning recorded in a fresh process (imports included): none raised from kvsqueeze's
    code (any category), none a user would see (the categories shown by default), and stderr free
    of warning or logging noise."""
    done = subprocess.run([sys.executable, "-c", RECORD, *argv], capture_output=True, text=True, timeout=300)
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["code"] == 0, done.stderr
    assert report["ours"] == [] and report["shown"] == []
    assert "warn" not in done.stderr.lower(), done.stderr
    if argv == ["--help"]:
        assert done.stderr == ""


def test_presets_json_prints_only_json() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::UserWarning",
            "-W",
            "error::FutureWarning",
            "-m",
            "kvsqueeze.cli",
            "presets",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["presets"] and done.stderr == ""


def test_output_path_check_creates_nothing_and_names_a_file_parent(tmp_path) -> None:
    from kvsqueeze.commands.common import check_output_path

    (tmp_path / "empty.json").write_text("")
    with pytest.raises(
        ValueError, match=r"--out: .* cannot be written: .*empty.json' is a file, not a directory"
    ):
        check_output_path("--out", tmp_path / "empty.json" / "x.json")
    assert (
        check_output_path("--out", tmp_path / "nd1" / "sub" / "q.json") == tmp_path / "nd1" / "sub" / "q.json"
    )
    assert not (tmp_path / "nd1").exists()  # the writer makes the folders, the check does not
