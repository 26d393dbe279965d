"""Subcommands of `kvsqueeze`: one module each, with `add_parser(subparsers)` and `run(args)`."""
