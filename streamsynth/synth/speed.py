"""How much work each image costs: the speed presets, measured combinations of sampler settings.

Every lever that makes an image cheaper trades some quality, so each is off by default and the presets name only
combinations whose speed and quality were measured together (docs/performance.md, "Fewer UNet evaluations per image";
`benchmarks/speed_levers.py` measures both). `reference` is the published recipe. A preset fills in the sampler
settings the user did not give; a flag given explicitly always wins over the preset.

The presets are data: the commands' `--speed` flag (`streamsynth.commands.options`) and its help read them from here,
and library code takes one with `speed_preset(name)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SynthesisConfig


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


def speed_preset(name: str) -> dict:
    """A speed preset as `GeneratorConfig` keyword arguments (`synthesis`, `scheduler`), for library code:
    `GeneratorConfig(model, **speed_preset("fast"), image_size=224)`. Guidance scale and the other synthesis settings
    keep their defaults; change them with `dataclasses.replace(config.synthesis, ...)`."""
    if name not in SPEED_PRESETS:
        raise ValueError(f"unknown speed preset {name!r}: choose one of {list(SPEED_PRESETS)}")
    preset = SPEED_PRESETS[name]
    synthesis = SynthesisConfig(num_inference_steps=preset.num_inference_steps,
                                guidance_interval=preset.guidance_interval,
                                feature_cache_interval=preset.feature_cache_interval)
    return {"synthesis": synthesis, "scheduler": preset.scheduler}
