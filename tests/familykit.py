"""What each family's test (tests/test_family_*.py) checks on its tiny model: streamsynth's loop against the family's
own diffusers pipeline, for the same prompts and seeds, in a batch and each sample alone.

The pipeline is loaded once, the user's way (`load_pipeline`: `from_pretrained` of a folder `save_pretrained` wrote);
streamsynth's `Synthesizer` and diffusers' `__call__` then sample its components, so the comparison is of the two
sampling loops alone.
"""

from __future__ import annotations

import torch

from streamsynth.synth import SynthesisConfig, Synthesizer
from streamsynth.synth.families import family_of
from streamsynth.synth.loading import scheduler_from_name

# Upper case and outer spaces: the T5 and Gemma families lower-case and strip prompts, as their pipelines do.
PROMPTS = ["a photo of tench, a man holding a fish", "a photo of church, a white church", "A Photo of Golf Ball  ", ""]
SEEDS = [11, 22, 33, 44]


def diffusers_images(pipe, steps: int, guidance: float, prompts: list[str] = PROMPTS, seeds: list[int] = SEEDS,
                     **options) -> torch.Tensor:
    """The family's diffusers pipeline at the model's native size, under its `reference_call_options`."""
    family = family_of(type(pipe).__name__)
    size = family.native_size(pipe)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                generator=generators, output_type="pt", **{**family.reference_call_options, **options}).images


def assert_matches_diffusers(pipe, steps: int, guidance: float, scheduler: str | None = None, monkeypatch=None,
                             alone: bool = True, **config) -> torch.Tensor:
    """streamsynth's images of PROMPTS and SEEDS are diffusers' within fp32 rounding (1e-4, as for SD1.5), in one
    batch and (with `alone`) each sample by itself; distinct samples differ. Returns streamsynth's images.

    `scheduler` (a name) replaces the pipeline's own for this call only (`monkeypatch` puts it back)."""
    if scheduler is not None:
        monkeypatch.setattr(pipe, "scheduler", scheduler_from_name(scheduler, pipe.scheduler.config))
    synth = Synthesizer(pipe, SynthesisConfig(num_inference_steps=steps, guidance_scale=guidance, **config))
    ours = synth.generate(PROMPTS, SEEDS)
    theirs = diffusers_images(pipe, steps, guidance)
    assert ours.shape == theirs.shape == (len(PROMPTS), 3, synth.height, synth.width)
    assert (ours - theirs).abs().max().item() <= 1e-4
    if alone:
        singles = torch.cat([synth.generate([p], [s]) for p, s in zip(PROMPTS, SEEDS)])
        assert (singles - theirs).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max().item() > 0.05  # distinct samples: the comparison can fail
    return ours


def native_parameters(key: str) -> dict[str, int]:
    """Millions of parameters of each component of a family's released architecture, built on the meta device (no
    memory, a second): what the GPU step would build, checked before GPU time is spent on it."""
    from streamsynth.synth.families import family_by_key

    pipe = family_by_key(key).random_pipeline("native", "meta")
    return {name: round(sum(p.numel() for p in part.parameters()) / 1e6) for name, part in pipe.components.items()
            if isinstance(part, torch.nn.Module)}


def save_tiny_decoder(folder, latent_channels: int = 4):
    """A random AutoencoderTiny (TAESD's class) of a few channels for `latent_channels`-channel latents, saved."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8,) * 4,
                    decoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4,
                    num_decoder_blocks=(1,) * 4).save_pretrained(folder)
    return folder
