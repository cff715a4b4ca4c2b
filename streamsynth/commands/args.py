"""The command line's shared pieces: the parser class and its help formatter, comma-separated lists, `--version`,
`--device` and the evaluation folders. Used by `streamsynth` and every sub-command, by train.py and by the
`python -m streamsynth.*` tools, so that a flag is spelled, typed and documented one way everywhere (docs/cli.md,
"Command-line vocabulary"; tests/test_cli_vocabulary.py walks every parser).

A bottom-layer module: it imports nothing of streamsynth, and nothing heavy (torch only inside `resolve_device`).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

DEVICE_HELP = "a torch device: cpu, cuda, cuda:N (default: cuda if available, else cpu)"

# Evaluation folders, by their suite names (those streamsynth.classifier.evaluate.SUITES and SUBSET_SUITES use): the options of
# `streamsynth evaluate` and of train.py.
EVAL_SUITES = {
    "imagenet-val": "ImageNet val: an ImageFolder, one folder per WordNet id",
    "imagenet-v2": "ImageNet-V2: an ImageFolder, folders 0..999 or WordNet ids",
    "imagenet-sketch": "ImageNet-Sketch: an ImageFolder, one folder per WordNet id",
    "imagenet-r": "ImageNet-R: an ImageFolder, scored on its 200 classes",
    "imagenet-a": "ImageNet-A: an ImageFolder, scored on its 200 classes",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions written with line breaks (train.py's examples) are kept as written, one-paragraph ones are
    wrapped; every option's help ends with its default, unless the default is None or False or the help already
    says it (the word "default")."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with `HelpFormatter` and without abbreviations (a retired `--model` must be an error, not
    a prefix of `--model-dir`); sub-command parsers made from it (`add_subparsers`) are of this class too."""

    def __init__(self, *args, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, allow_abbrev=allow_abbrev, **kwargs)


def version() -> str:
    """The installed package's version; from a checkout that is not installed, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("streamsynth")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"streamsynth {version()}",
                        help="print streamsynth's version and exit")


def comma_list(item: Callable[[str], object] = str, choices: Iterable | None = None) -> Callable[[str], list]:
    """An argparse `type` for a comma-separated list, the one way lists are given on this command line:
    `--batch-size 8,16`. Each item is converted by `item` and checked against `choices`; empty items are errors."""
    allowed = list(choices) if choices is not None else None

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list without empty items")
        values = []
        for part in parts:
            try:
                value = item(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not a valid {getattr(item, '__name__', 'value')}")
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(
                    f"{part!r} is not one of {', '.join(map(str, allowed))}")
            values.append(value)
        return values

    parse.__name__ = "comma-separated list"  # what argparse names in its "invalid ... value" message
    return parse


def list_metavar(name: str, choices: Iterable | None = None) -> str:
    """The metavar of a comma-list option: NAME[,NAME...] or {a,b}[,...]."""
    if choices is not None:
        return "{" + ",".join(map(str, choices)) + "}[,...]"
    return f"{name}[,{name}...]"


def add_device(parser, what: str = "") -> None:
    """`--device`, checked for its form when parsed (`device_name`): None in the namespace means cuda if available,
    else cpu (`resolve_device`)."""
    parser.add_argument("--device", type=device_name, help=f"{what}: {DEVICE_HELP}" if what else DEVICE_HELP)


def resolve_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_eval_suites(parser) -> None:
    """--imagenet-val, --imagenet-v2, --imagenet-sketch, --imagenet-r, --imagenet-a: real ImageFolders to score."""
    for suite, text in EVAL_SUITES.items():
        parser.add_argument(f"--{suite}", metavar="DIR", help=text)


def eval_suites(args: argparse.Namespace) -> dict[str, str]:
    """Suite name → folder, for the evaluation folders given."""
    folders = {suite: getattr(args, suite.replace("-", "_")) for suite in EVAL_SUITES}
    return {suite: folder for suite, folder in folders.items() if folder}


# Value checks for `type=`: a bad value is argparse's one-line usage error (exit 2) when the command is parsed,
# never a traceback after work started.

def _number(kind: Callable[[str], float], what: str, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside {what}")
        return value

    parse.__name__ = what  # what argparse names in its "invalid ... value" message
    return parse


positive_int = _number(int, "an integer of at least 1", low=1)
nonnegative_int = _number(int, "an integer of at least 0", low=0)
finite_float = _number(float, "a finite number")
nonnegative_float = _number(float, "a finite number of at least 0", low=0.0)
positive_float = _number(float, "a finite number above 0", low=0.0, low_open=True)
fraction = _number(float, "a number from 0 to 1", low=0.0, high=1.0)
# Seeds feed torch.manual_seed, numpy and streamsynth's own 63-bit seed derivation: keep them where all agree.
SEED_LIMIT = 2**63 - 1
seed = _number(int, f"a seed from 0 to {SEED_LIMIT}", low=0, high=SEED_LIMIT)


def device_name(text: str) -> str:
    """A torch device name (cpu, cuda, cuda:N, mps, ...), checked for its form here and for its presence when the
    command resolves it."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    return text


device_name.__name__ = "device"
