"""SD1.5's real architecture (random weights) built and sampled on the CPU, so GPU time is never spent on a build bug.

Slow for a unit test (about 30 s to build 1.07 B parameters), and the only test that samples the architecture the GPU
checks run. The fast path's kernels are tested on the tiny model: through Triton's interpreter they take minutes here.
"""

from __future__ import annotations

import pytest
import torch

from streamsynth.synth import SynthesisConfig, Synthesizer

PROMPTS, SEEDS = ["a photo of tench, a man holding a fish", "a photo of church"], [5, 6]


@pytest.fixture(scope="module")
def sd15_pipe():
    from streamsynth.synth.sd15 import build_random_sd15

    return build_random_sd15("cpu")


@pytest.mark.slow
def test_sd15_architecture_samples_like_diffusers(sd15_pipe):
    config = SynthesisConfig(num_inference_steps=2, guidance_scale=1.5, height=64, width=64)
    ours = Synthesizer(sd15_pipe, config).generate(PROMPTS, SEEDS)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    theirs = sd15_pipe(PROMPTS, height=64, width=64, num_inference_steps=2, guidance_scale=1.5, generator=generators,
                       output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max().item() > 0.05  # two samples, not one image twice

    alone = Synthesizer(sd15_pipe, config).generate(PROMPTS[1:], SEEDS[1:])
    assert (alone[0] - ours[1]).abs().max().item() <= 1e-5  # a sample does not depend on its batch
