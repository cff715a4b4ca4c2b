"""The `streamsynth` command. Each command lives in its own module and registers itself in `COMMANDS`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module path → the function that adds its sub-command(s) to the parser. Commands import their heavy
# dependencies only when they run.
COMMANDS = [
    "streamsynth.captions.commands",
    "streamsynth.profile",
    "streamsynth.stream.bench",
    "streamsynth.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsynth", description="Caption-in-Prompt synthetic training data for image classifiers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        # Input errors carry messages written for the user; a traceback would bury them.
        if args.verbose:
            raise
        print(f"streamsynth {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
