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
    from .errors import StreamsynthError, one_line

    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"streamsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    except (StreamsynthError, OSError, ValueError, RuntimeError) as err:
        # Input errors and faults (a damaged file, a full disk) carry messages written for the user; a traceback
        # would bury them.
        if args.verbose:
            raise
        print(f"streamsynth {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, and the way to the traceback
        if args.verbose:
            raise
        print(f"streamsynth {args.command}: error: unexpected {type(err).__name__}: {one_line(err)} (run "
              f"`streamsynth -v {args.command} ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
