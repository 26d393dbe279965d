"""The `kvsqueeze` command: a thin view over the library; each subcommand lives in `commands/`.

kvsqueeze generate "Why is the sky blue?" --kv k4v2
kvsqueeze presets --json
kvsqueeze demo
kvsqueeze calibrate --model smollm2-135m --text-file wiki.txt --preset best-2bit
kvsqueeze inspect --model smollm2-135m
kvsqueeze serve --kv k4v4 --kv-budget 256MiB --port 8000

Exit codes: 0 done, 2 a refused input (argparse errors and ValueError, whose message names the
flag), 1 a run that could not finish (`commands.common.RunFailed`, or memory running out: its message
says what to change) or an unexpected error (one line; ``KVSQUEEZE_DEBUG=1`` shows the traceback),
130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Iterator

from rich.markup import escape

from .commands import bench, calibrate, demo, generate, presets, serve
from .commands import eval as eval_command
from .commands import inspect as inspect_command
from .commands.common import RunFailed, console
from .commands.resources import is_out_of_memory

SUBCOMMANDS = (generate, presets, demo, bench, eval_command, calibrate, inspect_command, serve)
DEBUG_SWITCH = "KVSQUEEZE_DEBUG"


class HelpFormatter(argparse.HelpFormatter):
    """Help that ends every option with its default, e.g. ``(default: k4v2)``, unless the default
    is empty, a flag's off state, or already described in the help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if not _shows_default(action) or "default" in help_text.lower():
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):  # undocumented yet: still show the default
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    return (
        action.nargs != 0  # flags (store_true/false, count) have nothing to show
        and action.default not in (None, "", argparse.SUPPRESS)
        and action.help != argparse.SUPPRESS
        and (bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
    )


def package_version() -> str:
    """The installed distribution's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvsqueeze")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command parser below ``parser``, e.g. ``("eval quality", <parser>)``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield name, child
                for sub_name, grandchild in subparsers(child):
                    yield f"{name} {sub_name}", grandchild


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsqueeze",
        description="Quantized KV caches for transformers models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"kvsqueeze {package_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    for _, child in subparsers(parser):
        child.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except SystemExit as done:  # argparse: 2 on a refused input, 0 after --help / --version
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return 2
    except RunFailed as err:  # a checked run that could not finish, for a reason the message gives
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `kvsqueeze presets | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        if os.environ.get(DEBUG_SWITCH, "").strip() not in ("", "0"):
            raise
        if is_out_of_memory(err):  # not a bug to report: the run was too large for this machine
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            console.print(
                f"[red]error:[/red] memory ran out ({escape(first)}); allowed: a smaller run (fewer or shorter "
                "inputs, a smaller batch, fewer new tokens) or a machine with more memory",
                soft_wrap=True,
            )
            return 1
        first = str(err).strip().splitlines()[0] if str(err).strip() else "(no message)"
        console.print(
            f"[red]error:[/red] unexpected {type(err).__name__}: {escape(first)}\n"
            f"Rerun with {DEBUG_SWITCH}=1 for the traceback, and please report it.",
            soft_wrap=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
