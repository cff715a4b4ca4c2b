"""How much work each image costs: the speed presets and the command-line options that choose the sampler.

Every lever that makes an image cheaper trades some quality, so each is off by default and the presets name only
combinations whose speed and quality were measured together (README, "Fewer UNet evaluations per image";
`benchmarks/speed_levers.py` measures both). `reference` is the published recipe. A preset fills in the sampler
settings the user did not give; a flag given explicitly always wins over the preset.

The commands that synthesize (train.py, `streamsynth generate`, `streamsynth loader-bench`) share these flags
through `add_sampler_arguments` and turn them into generator settings with `sampler_settings`, so one flag means
one thing everywhere.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .config import SynthesisConfig
from .loading import SCHEDULERS


@dataclass(frozen=True)
class SpeedPreset:
    """A measured combination of sampler settings."""

    scheduler: str | None  # None: the model's own (PNDM for SD1.5)
    num_inference_steps: int
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    feature_cache_interval: int = 1
    summary: str = ""


SPEED_PRESETS = {
    "reference": SpeedPreset("pndm", 50, summary="the published recipe: 50 PNDM steps, guidance on every step"),
    "balanced": SpeedPreset("dpm++", 20, summary="20 DPM-Solver++ steps, guidance on every step"),
    # Guidance on the first half: on the digits harness it beat guidance on the middle half on every seed (95.4 vs
    # 93.9 % top-1), although Kynkäänniemi et al. found early guidance harmful for FID; early steps settle the class.
    "fast": SpeedPreset("dpm++", 10, guidance_interval=(0.0, 0.5),
                        summary="10 DPM-Solver++ steps, guidance on the first half only"),
}

# Each lever alone, on the reference recipe otherwise: what the benchmarks compare, beside the presets.
SPEED_LEVERS = {
    "interval 0.25-0.75": SpeedPreset("pndm", 50, guidance_interval=(0.25, 0.75),
                                      summary="guidance on the middle half of the steps"),
    "dpm++ 10": SpeedPreset("dpm++", 10, summary="10 DPM-Solver++ steps"),
    "unipc 10": SpeedPreset("unipc", 10, summary="10 UniPC steps"),
    "dpm++ 5": SpeedPreset("dpm++", 5, summary="5 DPM-Solver++ steps"),
    "dpm++ 10 guided middle": SpeedPreset("dpm++", 10, guidance_interval=(0.25, 0.75),
                                          summary="10 DPM-Solver++ steps, guidance on the middle half"),
    "deepcache 3": SpeedPreset("pndm", 50, feature_cache_interval=3, summary="a full UNet pass every third step"),
}


def _interval(text: str) -> tuple[float, float]:
    try:
        start, stop = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,STOP (fractions of the steps, e.g. 0.25,0.75), got {text!r}")
    return start, stop


def add_sampler_arguments(parser, default_steps: str) -> None:
    """The sampler's flags on `parser` (a parser or an argument group); `default_steps` is said in the help."""
    parser.add_argument("--speed", choices=list(SPEED_PRESETS),
                        help="a measured speed preset: " + "; ".join(f"{name}, {preset.summary}"
                                                                     for name, preset in SPEED_PRESETS.items())
                        + " (explicit sampler flags win over it)")
    parser.add_argument("--num-inference-steps", type=int, help=f"denoising steps (default: {default_steps})")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS),
                        help="scheduler (default: the model's own, PNDM for SD1.5)")
    parser.add_argument("--guidance-scale", type=float, default=1.5,
                        help="classifier-free guidance scale; low guidance (1.5-2) helps diversity")
    parser.add_argument("--guidance-interval", type=_interval, metavar="START,STOP",
                        help="classifier-free guidance only on the steps in [START, STOP), as fractions of the "
                        "schedule; elsewhere one conditional pass (default: 0,1, every step)")
    parser.add_argument("--feature-cache-interval", type=int, metavar="N",
                        help="reuse the UNet's deep features between full passes, one full pass every N steps "
                        "(DeepCache) (default: 1, off)")
    parser.add_argument("--lora", metavar="PATH",
                        help="LoRA weights fused into the UNet, e.g. LCM-LoRA with --scheduler lcm (a folder, "
                        ".safetensors file or hub id)")
    parser.add_argument("--decoder", metavar="PATH",
                        help="a tiny VAE decoder (diffusers AutoencoderTiny, e.g. TAESD) in place of the VAE's")


def fill_from_speed_preset(args: argparse.Namespace) -> None:
    """Sets the sampler flags the user left out (None) to the `--speed` preset's values; without --speed, nothing.
    A command with defaults of its own (train.py's presets) calls this first, so that --speed wins over them."""
    if not args.speed:
        return
    preset = SPEED_PRESETS[args.speed]
    for field in ("num_inference_steps", "scheduler", "guidance_interval", "feature_cache_interval"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(preset, field))


def sampler_settings(args: argparse.Namespace, default_steps: int) -> dict:
    """GeneratorConfig keyword arguments (`synthesis`, `scheduler`, `lora`, `decoder`) from the sampler's flags:
    each explicit flag, else the `--speed` preset's value, else the default (`default_steps` steps, the model's own
    scheduler, guidance on every step, no feature cache)."""
    fill_from_speed_preset(args)
    synthesis = SynthesisConfig(
        num_inference_steps=args.num_inference_steps or default_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval or (0.0, 1.0),
        feature_cache_interval=args.feature_cache_interval or 1,
        safety_check=getattr(args, "safety_checker", False),
    )
    return {"synthesis": synthesis, "scheduler": args.scheduler, "lora": args.lora, "decoder": args.decoder}
