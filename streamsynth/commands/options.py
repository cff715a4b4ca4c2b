"""The one path from a command line to a generator: the synthesis flags every command that makes images shares, the
defaults they take, and the functions that turn parsed flags into the library's settings.

    flags ──add_*_options──▶ argparse ──resolve()──▶ every value filled in ──generator_config()──▶ GeneratorConfig
                                  ▲ --config FILE (a run's run.json, or JSON/YAML)        └──stream_options()──▶ stream

`train.py`, `streamsynth generate`, `streamsynth preview` and `streamsynth loader-bench` add their flags with these
functions and build their generator with `generator_config`, so a flag means one thing, defaults the same, and
`preview` draws what training makes. Defaults that depend on the run are data (`RUN_DEFAULTS`), read by `--help`
and by `resolve` alike: a run on the embedded default (no --sd-model, --captions or --train-dir) is a CPU-sized run
of the tiny digits model; a run on a model of yours is the reference recipe at ImageNet size. A `--speed` preset
(`streamsynth.synth.speed.SPEED_PRESETS`) fills the sampler's settings before those; a flag given always wins.
`--config FILE` sets every flag the file names, as if typed before the others; `--print-config` prints the resolved
values (what the run uses, and what its run.json records) and exits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .args import comma_list, device_name, nonnegative_float, positive_int, seed

EMBEDDED, MODEL = "embedded", "model"
# The defaults that depend on the run: on the embedded default (EMBEDDED) a classifier learns the digits in a
# minute or two on a 2-core CPU; on a model of yours (MODEL) the reference recipe at ImageNet scale.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    EMBEDDED: {"num_inference_steps": 20, "image_size": 16, "synth_batch_size": 32,
               "model": "test_resnet", "steps": 200, "batch_size": 32, "workers": 2, "replay": 4},
    MODEL: {"num_inference_steps": 50, "image_size": 224, "synth_batch_size": 8,
            "model": "resnet50", "steps": 100_000, "batch_size": 256, "workers": 4, "replay": 1},
}
# Sampler settings a --speed preset fills in (each also a flag of its own), and the value when neither says.
SPEED_FIELDS = {"num_inference_steps": None, "scheduler": None, "guidance_interval": (0.0, 1.0),
                "feature_cache_interval": 1}
PROMPT_HELP = "prompt strategy: cip, basic, name, clip, or a template with {name} and {caption}"


def run_default_help(dest: str, more: str = "") -> str:
    """The help's statement of a default that depends on the run, from `RUN_DEFAULTS` (`more`: what else may set
    it)."""
    return (f"(default: {RUN_DEFAULTS[EMBEDDED][dest]} on the embedded default, else {RUN_DEFAULTS[MODEL][dest]}"
            f"{', or ' + more if more else ''})")


def run_kind(args: argparse.Namespace) -> str:
    """EMBEDDED when the run names no model, caption store or real data of its own."""
    own = [getattr(args, name, None) for name in ("sd_model", "captions", "train_dir")]
    return MODEL if any(own) else EMBEDDED


def _interval(text: str) -> tuple[float, float]:
    try:
        start, stop = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,STOP (fractions of the steps, e.g. 0.25,0.75), got {text!r}")
    if not 0.0 <= start < stop <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < STOP <= 1, got {text!r}")
    return start, stop


# ----- the flags -----------------------------------------------------------------------------------------------------

def add_source_options(parser) -> None:
    """--sd-model, --captions, --prompt, --seed: which model, which captions, which prompts, which samples."""
    parser.add_argument("--sd-model", metavar="MODEL",
                        help="text-to-image model of a supported family (docs/families.md): a hub id or diffusers "
                        "folder (default: the embedded tiny digits model)")
    parser.add_argument("--captions", metavar="STORE",
                        help="caption store (LMDB) (default: the embedded digits captions)")
    parser.add_argument("--prompt", default="cip", help=PROMPT_HELP)
    parser.add_argument("--seed", type=seed, default=0,
                        help="run seed: with a sample's id it fixes the sample (and, in training, the classifier's "
                        "initialisation)")


def add_sampler_options(parser) -> None:
    """--speed and the sampler's settings it fills in; --guidance-scale, --lora, --decoder."""
    from ..synth.loading import SCHEDULERS
    from ..synth.speed import SPEED_PRESETS

    parser.add_argument("--speed", choices=list(SPEED_PRESETS),
                        help="a measured speed preset: " + "; ".join(f"{name}, {preset.summary}"
                                                                     for name, preset in SPEED_PRESETS.items())
                        + " (flags given win over it)")
    parser.add_argument("--num-inference-steps", type=positive_int, metavar="N",
                        help=f"denoising steps {run_default_help('num_inference_steps', more='--speed')}")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS),
                        help="scheduler (default: the model's own, PNDM for SD1.5, or --speed)")
    parser.add_argument("--guidance-scale", type=nonnegative_float, default=1.5,
                        help="classifier-free guidance scale; low guidance (1.5-2) helps diversity")
    parser.add_argument("--guidance-interval", type=_interval, metavar="START,STOP",
                        help="classifier-free guidance only on the steps in [START, STOP), as fractions of the "
                        "schedule; elsewhere one conditional pass (default: 0,1, every step, or --speed)")
    parser.add_argument("--feature-cache-interval", type=positive_int, metavar="N",
                        help="reuse the UNet's deep features between full passes, one full pass every N steps "
                        "(DeepCache) (default: 1, off, or --speed)")
    parser.add_argument("--lora", metavar="PATH",
                        help="LoRA weights fused into the UNet, e.g. LCM-LoRA with --scheduler lcm (a folder, "
                        ".safetensors file or hub id)")
    parser.add_argument("--decoder", metavar="PATH",
                        help="a tiny VAE decoder (diffusers AutoencoderTiny, e.g. TAESD) in place of the VAE's")


def add_generator_options(parser, devices_help: str | None) -> None:
    """Where and how the generator runs: --image-size, --synth-batch-size, --dtype, --synth-devices (left out when
    `devices_help` is None: the command has a --device of its own), --safety-checker, --fast."""
    parser.add_argument("--image-size", type=positive_int, metavar="PIXELS",
                        help=f"side of the images handed out, in pixels {run_default_help('image_size')}")
    parser.add_argument("--synth-batch-size", type=positive_int, metavar="N",
                        help=f"images per UNet batch in a worker {run_default_help('synth_batch_size')}")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                        help="synthesis dtype (default: fp16 on CUDA, fp32 on the CPU)")
    if devices_help is not None:
        parser.add_argument("--synth-devices", metavar="DEVICES", help=devices_help)
    parser.add_argument("--safety-checker", action="store_true", help="redraw images the model's safety checker flags")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="the fast path: Triton GroupNorm+SiLU and GEGLU, probed attention backend "
                             "(kernels/README.md) (default: on where synthesis runs on a GPU, off on the CPU)")


def add_config_options(parser) -> None:
    """--config FILE and --print-config."""
    parser.add_argument("--config", metavar="FILE",
                        help="take every flag this file sets (a run's run.json, or a JSON or YAML mapping of flag "
                        "names to values) as if given first; flags on the command line win")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (what the run would use and record) as JSON and exit")


# ----- from flags to settings ----------------------------------------------------------------------------------------

def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with the values of `--config FILE` as the parser's defaults."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config")
    known, _ = early.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**config_values(parser, known.config))
    return parser.parse_args(argv)


def config_values(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text()
        values = _yaml(text) if file.suffix in (".yaml", ".yml") else json.loads(text)
    except OSError as err:
        parser.error(f"--config {path}: {err.strerror or err}")
    except ValueError as err:
        parser.error(f"--config {path} is not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'JSON'} ({err})")
    if isinstance(values, dict) and isinstance(values.get("config"), dict):
        values = values["config"]  # a run's run.json
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    known = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(known))
    if unknown:
        parser.error(f"--config {path} sets {', '.join(unknown)}, which this command does not take")
    defaults = {}
    for dest, value in values.items():
        if dest in ("config", "print_config", "help", "version"):
            continue
        if isinstance(value, list) and known[dest].type is _interval:
            value = tuple(value)
        defaults[dest] = value
    return defaults


def _yaml(text: str):
    try:
        import yaml
    except ImportError:
        raise ValueError("reading YAML needs PyYAML (pip install pyyaml); or give the config as JSON") from None
    return yaml.safe_load(text)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with every default filled in: a flag given (or set by --config), else the --speed preset's
    value, else `RUN_DEFAULTS[kind]`, else the setting's own default."""
    from ..synth.speed import SPEED_PRESETS

    resolved = argparse.Namespace(**vars(args))
    kind = run_kind(args)
    preset = SPEED_PRESETS[args.speed] if getattr(args, "speed", None) else None
    for name, fallback in SPEED_FIELDS.items():
        if hasattr(resolved, name) and getattr(resolved, name) is None:
            value = getattr(preset, name) if preset is not None else None
            if value is None:
                value = RUN_DEFAULTS[kind].get(name, fallback)
            setattr(resolved, name, value)
    for name, value in RUN_DEFAULTS[kind].items():
        if hasattr(resolved, name) and getattr(resolved, name) is None:
            setattr(resolved, name, value)
    return resolved


def recorded(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved flags as JSON-ready data: what --print-config prints and run.json records under "config"."""
    skip = {"config", "print_config", "resume", "func", "argv", "parser"}
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in skip}))


def print_config(args: argparse.Namespace) -> None:
    print(json.dumps(recorded(args), indent=2))


def generator_config(args: argparse.Namespace, model: str, devices: list[str] | None):
    """The `GeneratorConfig` of resolved flags (see `resolve`), for `model` on `devices` (None: each rank's own GPU,
    else the CPU)."""
    from ..synth.config import GeneratorConfig, SynthesisConfig
    from ..synth.fast import FastPathOptions

    synthesis = SynthesisConfig(
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval), feature_cache_interval=args.feature_cache_interval,
        safety_check=args.safety_checker)
    fast = "auto" if args.fast is None else (FastPathOptions() if args.fast else None)
    return GeneratorConfig(model, synthesis=synthesis, image_size=args.image_size, devices=devices,
                           dtype=args.dtype, scheduler=args.scheduler, batch_size=args.synth_batch_size, fast=fast,
                           lora=args.lora, decoder=args.decoder)


def source_paths(args: argparse.Namespace) -> tuple[str, str]:
    """(model, captions) the run uses: those given, else the embedded default's."""
    from ..digits import embedded_captions, embedded_model

    return (args.sd_model or str(embedded_model())), (args.captions or str(embedded_captions()))


def node_devices(spec: str | None) -> list[str] | None:
    """`--synth-devices` as a node's device list for `GeneratorConfig.devices`: None (each rank's own GPU, else the
    CPU) when not given; "auto", every GPU of the node; else the comma-separated list."""
    import torch

    if spec is None:
        return None
    if spec == "auto":
        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] or None
    return comma_list(device_name)(spec)
