"""The `streamsynth` command. Each command lives in its own module and registers itself in `COMMANDS`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .commands.args import ArgumentParser, add_version

# module path → the function that adds its sub-command(s) to the parser. Commands import their heavy
# dependencies only when they run.
COMMANDS = [
    "streamsynth.commands.captions",
    "streamsynth.benchmarks.caption_bench",
    "streamsynth.benchmarks.profile",
    "streamsynth.benchmarks.loader_bench",
    "streamsynth.commands.evaluation",
    "streamsynth.commands.generate",
    "streamsynth.commands.preview",
    "streamsynth.commands.digits_generator",
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="streamsynth", description="Caption-in-Prompt synthetic training data for image classifiers. The flags "
        "of every command and of train.py: docs/cli.md."
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an error")
    add_version(parser)
    # Sub-command parsers are made of the same class: the same help formatter (defaults shown) everywhere.
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    # The training loop has its own parser (streamsynth/train.py, also run as `python train.py`): its flags pass
    # through untouched, and `streamsynth train --help` is train.py's help.
    train = subparsers.add_parser("train", add_help=False, help="train a classifier on the stream (python train.py; "
                                  "`streamsynth train --help` lists its flags)")
    train.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    for module in COMMANDS:
        importlib.import_module(module).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":
        from .train import cli as train

        train([*(["--verbose"] if args.verbose else []), *unknown, *args.train_args], prog="streamsynth train")
        return 0
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "config", None):  # the file's values become the command's defaults, then flags win over them
        from .commands.options import config_values

        args.parser.set_defaults(**config_values(args.parser, args.config))
        args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to start the same command as several ranks
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .errors import StreamsynthError, one_line
    from .ranks import RankError, rank_label

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
        # Under torchrun every rank prints its own errors: say which rank (a RankError names the rank at fault).
        where = f"{rank_label()}: " if rank_label() and not isinstance(err, RankError) else ""
        print(f"streamsynth {args.command}: error: {where}{one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, and the way to the traceback
        if args.verbose:
            raise
        print(f"streamsynth {args.command}: error: {rank_label() + ': ' if rank_label() else ''}unexpected "
              f"{type(err).__name__}: {one_line(err)} (run "
              f"`streamsynth -v {args.command} ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
