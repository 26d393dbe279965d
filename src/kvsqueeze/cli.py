"""The `kvsqueeze` command: a thin view over the library; each subcommand lives in `commands/`.

kvsqueeze generate "Why is the sky blue?" --kv k4v2
kvsqueeze presets --json
kvsqueeze demo
kvsqueeze calibrate --model smollm2-135m --text-file wiki.txt --preset best-2bit
kvsqueeze inspect --model smollm2-135m
"""

from __future__ import annotations

import argparse
import sys

from .commands import bench, calibrate, demo, generate, presets
from .commands import eval as eval_command
from .commands import inspect as inspect_command
from .commands.common import console

SUBCOMMANDS = (generate, presets, demo, bench, eval_command, calibrate, inspect_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsqueeze", description="Quantized KV caches for transformers models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
