"""One path from flags to a generator: `--help` tells the truth about every default, `--config` reruns a run, and
preview draws what the stream makes."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from streamsynth.commands import options

ROOT = Path(__file__).resolve().parents[1]
# A model named by hub id: print-config resolves every setting without loading (or downloading) anything.
HUB_MODEL = "someone/some-stable-diffusion"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """The entry points that make images, by name: train.py and the streamsynth commands that build a generator."""
    from streamsynth import train
    from streamsynth.cli import build_parser

    commands = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands = dict(action.choices)
    return {"train.py": train.build_parser(), "generate": commands["generate"], "preview": commands["preview"],
            "loader-bench": commands["loader-bench"]}


def _print_config(name: str, *extra: str) -> dict:
    """What `--print-config` prints: the settings the run resolves and uses (and records in run.json)."""
    import contextlib
    import io

    from streamsynth import train
    from streamsynth.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if name == "train.py":
            train.main(["--online-synthesis", *extra, "--print-config"])
        else:
            assert main([name, *(["--out", "unused"] if name == "generate" else []), *extra, "--print-config"]) == 0
    return json.loads(printed.getvalue())


def stated_defaults(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest → what `--help` says the default is, for every option whose help says one."""
    formatter = parser._get_formatter()
    stated = {}
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        text = " ".join(formatter._expand_help(action).split())
        found = re.search(r"\(default: (.*)\)$", text) or re.search(r"default: ([^)]*)\)?$", text)
        if found:
            stated[action.dest] = found.group(1)
    return stated


def _literal(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# Defaults stated in words: each is a rule checked against the resolved settings (`config`) of a run of that kind on
# a machine without CUDA. A new worded default must get its rule here.
WORDED = {
    "sd_model": lambda c, kind: c["sd_model"] == (None if kind == options.EMBEDDED else HUB_MODEL),
    "captions": lambda c, kind: c["captions"] is None,
    "scheduler": lambda c, kind: c["scheduler"] is None,  # the model's own
    "guidance_interval": lambda c, kind: c["guidance_interval"] == [0.0, 1.0],
    "feature_cache_interval": lambda c, kind: c["feature_cache_interval"] == 1,
    "dtype": lambda c, kind: c["dtype"] is None,  # fp32 on this CPU: checked in test_a_worded_dtype_is_what_loads
    "fast": lambda c, kind: c["fast"] is None,  # off on the CPU: checked in test_the_fast_path_default_per_device
    "synth_devices": lambda c, kind: c["synth_devices"] is None,
    "mix": lambda c, kind: c["mix"] is None,
    "epoch_size": lambda c, kind: c["epoch_size"] is None,
    "lr": lambda c, kind: c["lr"] == pytest.approx(c["lr_base"] * c["batch_size"] * c["accum_steps"] / 256),
    "warmup_steps": lambda c, kind: c["warmup_steps"] == max(1, c["steps"] // 50),
    "amp": lambda c, kind: c["amp"] == "none",  # this machine has no CUDA
    "device": lambda c, kind: c["device"] == "cpu",
    "classes": lambda c, kind: c["classes"] is None,  # the first 10
}


@pytest.mark.parametrize("name", ["train.py", "generate", "preview", "loader-bench"])
def test_every_stated_default_is_the_value_the_run_uses(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the worded defaults below are a CPU run's
    parser = _parsers()[name]
    stated = stated_defaults(parser)
    configs = {options.EMBEDDED: _print_config(name), options.MODEL: _print_config(name, "--sd-model", HUB_MODEL)}
    checked = []
    for dest, text in stated.items():
        for kind, config in configs.items():
            assert dest in config, f"{name} --help states a default for {dest}, which the run does not record"
            per_run = re.match(r"(\S+) on the embedded default, else (\S+?)(,|$)", text)
            if per_run:
                expected = _literal(per_run.group(1) if kind == options.EMBEDDED else per_run.group(2))
                assert config[dest] == expected, f"{name} {dest}: help says {text!r}, a {kind} run uses {config[dest]!r}"
            elif dest in WORDED:
                assert WORDED[dest](config, kind), f"{name} {dest}: help says {text!r}, a {kind} run uses {config[dest]!r}"
            else:
                value = config[dest]
                shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                assert text == shown or _literal(text) == value, \
                    f"{name} {dest}: help says {text!r}, a {kind} run uses {value!r} (a worded default needs a rule)"
        checked.append(dest)
    assert {"num_inference_steps", "image_size", "synth_batch_size", "guidance_scale", "seed", "prompt"} <= set(checked)
    if name == "train.py":
        assert {"model", "steps", "batch_size", "workers", "replay", "lr", "warmup_steps"} <= set(checked)


def test_the_default_check_catches_a_help_that_lies():
    parser = argparse.ArgumentParser(formatter_class=__import__("streamsynth.commands.args", fromlist=["x"]).HelpFormatter)
    parser.add_argument("--num-inference-steps", type=int, help="denoising steps (default: 20 on the embedded "
                        "default, else 50)")
    stated = stated_defaults(parser)
    per_run = re.match(r"(\S+) on the embedded default, else (\S+?)(,|$)", stated["num_inference_steps"])
    assert _literal(per_run.group(2)) == 50 != options.RUN_DEFAULTS[options.MODEL]["num_inference_steps"] + 1


def test_a_speed_preset_wins_over_the_run_defaults_and_a_flag_over_both():
    from streamsynth import train
    from streamsynth.synth.speed import SPEED_PRESETS

    fast = SPEED_PRESETS["fast"]
    args = train.parse_args(["--online-synthesis", "--speed", "fast"])
    assert (args.num_inference_steps, args.scheduler, tuple(args.guidance_interval)) == \
        (fast.num_inference_steps, fast.scheduler, fast.guidance_interval)
    args = train.parse_args(["--online-synthesis", "--speed", "fast", "--num-inference-steps", "7"])
    assert args.num_inference_steps == 7 and args.scheduler == fast.scheduler
    assert train.parse_args(["--online-synthesis"]).num_inference_steps == 20  # the embedded default's


def test_a_worded_dtype_and_fast_path_are_what_a_worker_gets():
    from streamsynth.synth.config import GeneratorConfig
    from streamsynth.synth.fast import FastPathOptions
    from streamsynth.synth.loading import resolve_dtype

    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    config = options.generator_config(options.resolve(_parsers()["preview"].parse_args([])), "unused/hub-id", None)
    assert isinstance(config, GeneratorConfig) and config.fast == "auto"
    assert config.fast_path_on("cpu") is None and config.fast_path_on("cuda:1") == FastPathOptions()


def test_bad_values_are_refused_when_parsed(capsys):
    from streamsynth import train

    for argv, said in [(["--checkpoint-every", "0"], "at least 1"), (["--lr", "nan"], "finite"),
                       (["--seed", str(2**63)], "seed"), (["--label-smoothing", "2"], "from 0 to 1"),
                       (["-j", "-1"], "at least 0"), (["--guidance-interval", "0.5,0.2"], "START < STOP")]:
        with pytest.raises(SystemExit) as stop:
            train.parse_args(["--online-synthesis", *argv])
        assert stop.value.code == 2
        assert said in capsys.readouterr().err, argv


def test_config_file_values_are_defaults_and_flags_win(tmp_path):
    from streamsynth import train

    (tmp_path / "c.json").write_text(json.dumps({"config": {"num_inference_steps": 7, "seed": 3}}))
    args = train.parse_args(["--online-synthesis", "--config", str(tmp_path / "c.json"), "--seed", "4"])
    assert (args.num_inference_steps, args.seed) == (7, 4)
    (tmp_path / "c.yaml").write_text("replay: 2\nmodel: resnet18\n")
    args = train.parse_args(["--online-synthesis", "--config", str(tmp_path / "c.yaml")])
    assert (args.replay, args.model) == (2, "resnet18")
    (tmp_path / "bad.json").write_text(json.dumps({"num_inference_stepz": 7}))
    with pytest.raises(SystemExit):
        train.parse_args(["--online-synthesis", "--config", str(tmp_path / "bad.json")])


def test_preview_draws_the_streams_own_images(tmp_path):
    """The preview command's grid holds the stream's images for the same flags: the first samples of each class, in
    the stream's sample-id order, equal to what the stream makes for those ids in its first groups."""
    from streamsynth.cli import main
    from streamsynth.commands.preview import first_samples, preview_grid
    from streamsynth.stream import SyntheticStream

    flags = ["--num-inference-steps", "3", "--seed", "5", "--classes", "0,1,2", "--samples", "2"]
    assert main(["preview", *flags, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "preview.png").is_file()

    args = options.resolve(_parsers()["preview"].parse_args(flags))
    model, captions = options.source_paths(args)
    stream = SyntheticStream(captions, options.generator_config(args, model, None), prompt=args.prompt, seed=args.seed,
                             batch_size=64)
    shown = preview_grid(stream, ["0", "1", "2"], 2, tmp_path / "again.png")
    # The stream's own first group, made as training makes it (one batch of the layout's first 64 sample ids).
    group = stream.make_group(0, 0)
    position = {spec.sample_id: i for i, spec in enumerate(group.specs)}
    wanted = [spec for row in first_samples(stream, [0, 1, 2], 2) for spec in row]
    assert all(spec.sample_id in position for spec in wanted)  # the first samples of each class are in group 0
    expected = torch.stack([group.images[position[spec.sample_id]] for spec in wanted])
    assert [s.prompt for row in shown.specs for s in row] == [group.specs[position[s.sample_id]].prompt for s in wanted]
    # The UNet batches 6 images here and 32 there: equal up to float rounding, which moves a grey level at most.
    assert (shown.images.int() - expected.int()).abs().max() <= 1
    assert (shown.images == expected).float().mean() > 0.99


def test_absurd_sizes_start_with_a_word_on_their_cost(caplog):
    from streamsynth import train

    train.warn_about_cost(train.parse_args(["--online-synthesis"]))
    assert caplog.records == []  # the defaults are not absurd
    train.warn_about_cost(train.parse_args(["--online-synthesis", "--num-inference-steps", "5000", "--image-size",
                                            "3000", "-b", "1000000"]))
    said = caplog.text
    assert "100x the reference recipe's 50 denoising steps" in said and "179x the pixels" in said
    assert "-b 1000000 at 3000 px" in said
