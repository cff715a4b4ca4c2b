"""One command-line vocabulary: every parser (train.py, `streamsynth` and each sub-command, the `python -m
streamsynth.*` tools) is walked, and each flag must have its one row in the "Command-line vocabulary" table of docs/cli.md,
listing that command; no retired spelling; every option documented; every default shown by `--help`."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamsynth.commands import args as cliargs
from streamsynth.commands.options import EMBEDDED, RUN_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]

# Spellings retired by the one vocabulary (issue 16), and their names now.
RETIRED = {
    "--arch": "--model (the classifier), --sd-arch (profile), --captioner-arch (caption-bench), --cuda-arch",
    "--guidance": "--guidance-scale", "--batch": "--batch-size", "--size": "--image-size",
    "--num-workers": "--workers", "--val-dir": "--imagenet-val", "--v2-dir": "--imagenet-v2",
    "--sketch-dir": "--imagenet-sketch", "--r-dir": "--imagenet-r", "--a-dir": "--imagenet-a",
    "--json": "--out (a folder)", "--static-kv-cache": "--kv-cache static",
}
# Flags whose meaning is taken: they may exist only where they mean it.
OWNED = {
    "--steps": ({"train.py"}, "optimizer steps; denoising steps are --num-inference-steps"),
    "--model": ({"train.py"}, "the classifier; Stable Diffusion is --sd-model, the captioner --captioner"),
    "--prompt": ({"train.py", "preview", "generate", "loader-bench"},
                 "the synthesis prompt strategy; BLIP-2's prefix is --caption-prefix"),
}


def _load_train():
    from streamsynth import train

    return train


def _walk(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _walk(child, f"{name} {sub}".removeprefix("streamsynth "))


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Command name (as the README's table names it) → its parser."""
    from streamsynth.benchmarks import benchtools, kernel_bench, kernel_compile_check
    from streamsynth.cli import build_parser

    return {**dict(_walk(build_parser(), "streamsynth")), "train.py": _load_train().build_parser(),
            "kernel_bench": kernel_bench.build_parser(), "kernel_compile_check": kernel_compile_check.build_parser(),
            "benchtools": benchtools.build_parser()}


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's own actions: options and positionals, without -h and the sub-command choice."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def readme_table(text: str | None = None) -> list[tuple[tuple[str, ...], str, set[str]]]:
    """(flags, meaning, commands) of each row of the vocabulary table in docs/cli.md."""
    text = text if text is not None else (ROOT / "docs" / "cli.md").read_text()
    section = text.split("## Command-line vocabulary", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 3 or cells[0] in ("flag", "---"):
            continue
        rows.append((tuple(re.findall(r"`(-[^`]+)`", cells[0])), cells[1], set(re.findall(r"`([^`]+)`", cells[2]))))
    return rows


@pytest.fixture(scope="module")
def parsers():
    return all_parsers()


def vocabulary_problems(parsers: dict[str, argparse.ArgumentParser], rows) -> list[str]:
    """Flags without their one row, rows naming a command without the flag, retired or misplaced spellings."""
    problems = []
    by_flag: dict[str, list[int]] = {}
    for i, (flags, _, _) in enumerate(rows):
        for flag in flags:
            by_flag.setdefault(flag, []).append(i)
    problems += [f"{flag} has {len(found)} rows in the vocabulary table" for flag, found in by_flag.items() if len(found) > 1]
    having: dict[int, set[str]] = {}
    for command, parser in parsers.items():
        for action in options(parser):
            for flag in action.option_strings:
                if flag in RETIRED:
                    problems.append(f"{command}: {flag} is retired: use {RETIRED[flag]}")
                if flag in OWNED and command not in OWNED[flag][0]:
                    problems.append(f"{command}: {flag} means {OWNED[flag][1]}")
            if not action.option_strings:
                continue
            found = {i for flag in action.option_strings for i in by_flag.get(flag, [])}
            if not found:
                problems.append(f"{command}: {'/'.join(action.option_strings)} is not in the vocabulary table")
                continue
            for i in found:
                having.setdefault(i, set()).add(command)
                if set(rows[i][0]) != set(action.option_strings):
                    problems.append(f"{command}: {action.option_strings} but the table row says {rows[i][0]}")
                if command not in rows[i][2]:
                    problems.append(f"{command}: {rows[i][0][-1]} is in the vocabulary table without {command}")
    for i, (flags, _, commands) in enumerate(rows):
        if commands != having.get(i, set()):
            problems.append(f"table row {flags}: lists {sorted(commands)}, the parsers have it in "
                            f"{sorted(having.get(i, set()))}")
    return problems


def test_every_flag_has_one_row_in_the_readme_and_no_retired_spelling(parsers):
    assert {"train.py", "caption", "caption-bench", "captions import", "captions stats", "evaluate", "audit-privacy",
            "preview", "profile", "loader-bench", "streamsynth"} <= set(parsers)
    problems = vocabulary_problems(parsers, readme_table())
    assert problems == [], "\n".join(problems)


def test_the_check_finds_a_flag_that_means_two_things(parsers):
    """The same walk, on a parser given an old spelling and a flag the table lacks, and on a stale row."""
    rows = readme_table()
    broken = dict(parsers)
    bad = argparse.ArgumentParser(prog="x")
    bad.add_argument("--guidance", help="classifier-free guidance")
    bad.add_argument("--steps", help="denoising steps")
    bad.add_argument("--sd-model", help="the generator")
    broken["preview-old"] = bad
    problems = "\n".join(vocabulary_problems(broken, rows))
    assert "preview-old: --guidance is retired" in problems
    assert "preview-old: --steps means optimizer steps" in problems
    assert "preview-old: --guidance is not in the vocabulary table" in problems
    assert "--sd-model is in the vocabulary table without preview-old" in problems
    stale = [(f, m, c | {"evaluate"}) if f == ("--sd-model",) else (f, m, c) for f, m, c in rows]
    assert "table row ('--sd-model',): lists ['evaluate', " in "\n".join(vocabulary_problems(parsers, stale))


def test_every_option_has_help(parsers):
    missing = [f"{command}: {action.option_strings or action.dest}" for command, parser in parsers.items()
               for action in options(parser) if not (action.help or "").strip()]
    assert missing == []


def _shown(default) -> bool:
    return not any(default is nothing for nothing in (None, False, argparse.SUPPRESS)) and default != []


def test_help_shows_every_default(parsers):
    """Each option's help, as --help prints it, contains its default (unless None or False)."""
    missing = []
    for command, parser in parsers.items():
        printed = re.sub(r"\s+", "", parser.format_help())
        formatter = parser._get_formatter()
        for action in options(parser):
            if not _shown(action.default):
                continue
            text = formatter._expand_help(action)
            if str(action.default) not in text or re.sub(r"\s+", "", text) not in printed:
                missing.append(f"{command} {'/'.join(action.option_strings)} (default {action.default!r}): {text!r}")
    assert missing == [], "\n".join(missing)


def test_the_default_check_sees_a_hidden_default():
    parser = cliargs.ArgumentParser(prog="x", formatter_class=argparse.HelpFormatter)  # argparse's: hides defaults
    parser.add_argument("--seed", type=int, default=0, help="the run seed")
    formatter = parser._get_formatter()
    assert "0" not in formatter._expand_help(parser._actions[-1])
    shown = cliargs.ArgumentParser(prog="x")
    shown.add_argument("--seed", type=int, default=0, help="the run seed")
    shown.add_argument("--lr", type=float, default=0.1, help="rate (default: 0.1 for batch 256)")
    assert "the run seed (default: 0)" in shown.format_help()
    assert "(default: 0.1 for batch 256)" in shown.format_help() and "256) (default" not in shown.format_help()


def test_version(capsys):
    from streamsynth.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"streamsynth {cliargs.version()}"
    with pytest.raises(SystemExit) as exit_:
        _load_train().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"streamsynth {cliargs.version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", cliargs.version())


def test_streamsynth_version_as_a_user_runs_it():
    result = subprocess.run([sys.executable, "-m", "streamsynth.cli", "--version"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("streamsynth 0.") and not result.stderr


def test_descriptions_are_not_percent_formatted_and_wrap(parsers):
    text = parsers["audit-privacy"].format_help()
    assert "About 50% balanced" in re.sub(r"\s+", " ", text) and "%%" not in text
    width = parsers["audit-privacy"]._get_formatter()._width
    assert max(len(line) for line in text.splitlines()) <= width  # one-paragraph descriptions are wrapped
    assert "    python train.py --online-synthesis " in parsers["train.py"].format_help()  # examples kept as written


@pytest.mark.parametrize("argv", [
    ["profile", "--model", "x", "--out", "o"],  # would have been taken for --model-dir as an abbreviation
    ["profile", "--sd-arch", "tiny", "--batch", "2", "--out", "o"],
    ["preview", "--guidance", "2"],
    ["preview", "--steps", "2"],
    ["caption-bench", "--arch", "tiny"],
    ["caption-bench", "--batch-size", "4", "8"],  # lists are comma-separated
    ["caption", "--images", "i", "--out", "o", "--prompt", "a photo of"],
])
def test_old_spellings_are_errors_not_abbreviations(argv, capsys):
    from streamsynth.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_comma_lists():
    from streamsynth.cli import build_parser

    args = build_parser().parse_args(["caption-bench", "--batch-size", "4,8", "--kv-cache", "dynamic,static"])
    assert args.batch_size == [4, 8] and args.kv_cache == ["dynamic", "static"]
    assert build_parser().parse_args(["caption-bench"]).kv_cache == ["auto"]  # the string default, converted
    args = build_parser().parse_args(["loader-bench"])
    assert args.workers == [1, 2] and args.replay == [1, 4] and args.augment == ["batched"]
    assert build_parser().parse_args(["preview", "--classes", "tench,0"]).classes == ["tench", "0"]
    parse = cliargs.comma_list(int, choices=(1, 2))
    assert parse("1, 2") == [1, 2]
    for bad in ("1,,2", "1,3", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_train_resume_takes_an_optional_path(tmp_path, capsys):
    train = _load_train()
    assert train.parse_args(["--online-synthesis"]).resume is None
    assert train.parse_args(["--online-synthesis", "--resume", "--steps", "3"]).resume == ""  # OUT/checkpoint.pt
    checkpoint = tmp_path / "somewhere.pt"
    checkpoint.write_bytes(b"")
    args = train.parse_args(["--online-synthesis", "--resume", str(checkpoint)])
    assert args.resume == str(checkpoint) and args.model == RUN_DEFAULTS[EMBEDDED]["model"]
    with pytest.raises(SystemExit):
        train.parse_args(["--online-synthesis", "--resume", str(tmp_path / "missing.pt")])
    assert "no such checkpoint file" in capsys.readouterr().err


def test_the_eval_folders_are_the_same_flags_in_train_and_evaluate(parsers):
    def flags(parser):
        return {f for a in parser._actions for f in a.option_strings if f.startswith("--imagenet-")}

    assert flags(parsers["train.py"]) == flags(parsers["evaluate"]) == {f"--{s}" for s in cliargs.EVAL_SUITES}


def _shell_commands(path: Path) -> list[list[str]]:
    """The `streamsynth ...` and `python train.py ...` lines of a Markdown file's shell blocks, continuations joined,
    comments cut; lines with a `...` placeholder are left out."""
    import shlex

    commands, block, shell = [], None, False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if block is None:
                block, shell = [], line[3:].strip() in ("", "bash", "sh")
            else:
                for command in "".join(block).replace("\\\n", " ").splitlines() if shell else []:
                    words = shlex.split(command, comments=True)
                    if words[:1] == ["streamsynth"] or words[:2] == ["python", "train.py"]:
                        commands.append(words) if "..." not in words else None
                block = None
        elif block is not None:
            block.append(line)
    return commands


def test_the_documented_commands_parse_with_the_vocabulary(parsers):
    from streamsynth.cli import build_parser

    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "kernels" / "README.md"]
    commands = [(doc.name, words) for doc in documents for words in _shell_commands(doc)]
    assert len(commands) >= 20
    for doc, words in commands:
        try:
            if words[0] == "streamsynth":
                build_parser().parse_args(words[1:])
            else:
                parsers["train.py"].parse_args(words[2:])
        except SystemExit:
            pytest.fail(f"{doc}: {' '.join(words)} does not parse")
