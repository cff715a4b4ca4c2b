"""DeepCache-style feature caching (`SynthesisConfig.feature_cache_interval`): off by default and then the plain loop
bit for bit; when on, the shallow path is wired exactly (a reuse at the filling call's inputs is the full UNet), the
deep blocks run only on the full steps, and images stay functions of their own (prompt, seed)."""

from __future__ import annotations

import math

import pytest
import torch

from streamsynth.synth import SynthesisConfig, Synthesizer, load_pipeline
from streamsynth.synth.feature_cache import FeatureCache
from streamsynth.transforms import one_thread

PROMPTS = ["a photo of tench, a man holding a fish", "a photo of church, a white church", "a photo of golf ball"]
SEEDS = [5, 6, 7]


@pytest.fixture(autouse=True)
def single_thread():
    """These models are small enough that intra-op threads' spin-waits cost more than the work (10x on 2 shared
    cores); every comparison here is between runs on the same thread count."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipe(tiny_model):
    # DDIM: as many timesteps as inference steps (PNDM adds one), so step counts read plainly.
    return load_pipeline(tiny_model, "cpu", "fp32", scheduler="ddim")


@pytest.fixture(scope="module")
def digits():
    from streamsynth.digits.embedded import embedded_model

    return load_pipeline(embedded_model(), "cpu", "fp32", scheduler="ddim")


class BlockCalls:
    """Counts calls of the first resnet of a deep down block, the mid block and a deep up block (which a shallow step
    skips), and of the first and last blocks (which every step runs). A stand-in forward never calls its children,
    so these counts are of real computation."""

    def __init__(self, unet):
        self.counts = {"deep_down": 0, "mid": 0, "deep_up": 0, "first_down": 0, "last_up": 0}
        modules = {"deep_down": unet.down_blocks[1], "mid": unet.mid_block, "deep_up": unet.up_blocks[0],
                   "first_down": unet.down_blocks[0], "last_up": unet.up_blocks[-1]}
        self.handles = [module.resnets[0].register_forward_hook(self._counter(name)) for name, module in modules.items()]

    def _counter(self, name):
        def count(module, args, output):
            self.counts[name] += 1
        return count

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _uncached_latents(synth: Synthesizer, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """The guided sampling loop as `Synthesizer.denoise` ran it before the cache: the reference for interval 1."""
    scheduler = synth.pipe.scheduler
    scheduler.set_timesteps(synth.config.num_inference_steps)
    latents, generators = synth.initial_latents(seeds)
    text = synth.encode_text(prompts)
    both = torch.cat([synth.empty_prompt_embedding().expand_as(text), text])
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = synth.pipe.unet(model_input, t, encoder_hidden_states=both, return_dict=False)[0]
            latents = synth.guided_step(noise, t, latents, generators)
    return latents


def test_interval_1_is_the_uncached_loop_bit_for_bit(pipe):
    synth = Synthesizer(pipe, SynthesisConfig(num_inference_steps=3))
    assert synth.config.feature_cache_interval == 1
    reference = _uncached_latents(synth, PROMPTS, SEEDS)
    pipe.scheduler.set_timesteps(3)
    latents, generators = synth.initial_latents(SEEDS)
    assert torch.equal(synth.denoise(latents, synth.encode_text(PROMPTS), generators), reference)
    assert (synth.feature_cache.full_rows, synth.feature_cache.shallow_rows) == (3 * 2 * len(SEEDS), 0)


@pytest.mark.parametrize("model", ["pipe", "digits"])
def test_a_reuse_at_the_filling_calls_inputs_is_the_full_unet(model, request):
    unet = request.getfixturevalue(model).unet
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    other_sample = torch.randn(sample.shape, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    cache = FeatureCache(unet, interval=2)
    with torch.no_grad():
        def run(step, x, t):
            with cache.step(step, len(x)):
                return unet(x, t, encoder_hidden_states=text, return_dict=False)[0]

        full = run(0, sample, 500)
        assert (run(1, sample, 500) - full).abs().max().item() <= 1e-5
        # Negative controls: the shallow path computes from its inputs, and its deep part is the kept one.
        for x, t in ((sample, 300), (other_sample, 500)):
            reused = run(1, x, t)
            assert (reused - full).abs().max().item() > 1e-3
            assert (reused - unet(x, t, encoder_hidden_states=text, return_dict=False)[0]).abs().max().item() > 1e-3
    assert (cache.full_rows, cache.shallow_rows) == (2, 6)


def test_interval_3_runs_the_deep_blocks_on_every_third_step(pipe):
    steps, interval, rows = 9, 3, 2 * len(SEEDS)
    plain = Synthesizer(pipe, SynthesisConfig(num_inference_steps=steps)).generate(PROMPTS, SEEDS)
    synth = Synthesizer(pipe, SynthesisConfig(num_inference_steps=steps, feature_cache_interval=interval))
    calls = BlockCalls(pipe.unet)
    try:
        cached = synth.generate(PROMPTS, SEEDS)
    finally:
        calls.remove()
    full_steps = math.ceil(steps / interval)
    assert calls.counts == {"deep_down": full_steps, "mid": full_steps, "deep_up": full_steps,
                            "first_down": steps, "last_up": steps}
    assert (synth.feature_cache.full_rows, synth.feature_cache.shallow_rows) == (
        full_steps * rows, (steps - full_steps) * rows)
    # The cache changes the images: the test can fail. (That they stay close is checked on the trained digits
    # model: this one's random weights have no slowly changing deep features to reuse.)
    assert (cached - plain).abs().max().item() > 1e-4
    # Nothing stays patched: every module runs its own forward again.
    assert not [name for name, module in pipe.unet.named_modules() if "forward" in module.__dict__]
    assert synth.feature_cache._deep is None  # the kept feature is dropped after the run


def test_an_image_does_not_depend_on_its_batch_with_the_cache_and_interval_guidance(pipe):
    steps = 9
    config = SynthesisConfig(num_inference_steps=steps, feature_cache_interval=3, guidance_interval=(0.3, 0.7))
    assert [i for i in range(steps) if config.guided(i, steps)] == [3, 4, 5, 6]
    synth = Synthesizer(pipe, config)
    calls = BlockCalls(pipe.unet)
    try:
        batch = synth.generate(PROMPTS, SEEDS)
    finally:
        calls.remove()
    # Full: steps 0, 3 and 6 of the interval, and 7, where the UNet batch drops from 2B to B rows (forced full).
    b = len(SEEDS)
    assert calls.counts["mid"] == 4
    assert (synth.feature_cache.full_rows, synth.feature_cache.shallow_rows) == (
        b + 2 * b + 2 * b + b, b + b + 2 * b + 2 * b + b)
    # fp32 kernels round differently for one row and for a batch, and nine steps compound it: up to 1.04e-5 on one
    # CPU (others stay under 1e-5); an image mixed with another's cached features would differ by orders more.
    for i in range(len(PROMPTS)):
        assert (synth.generate([PROMPTS[i]], [SEEDS[i]])[0] - batch[i]).abs().max().item() <= 3e-5


def test_the_cache_composes_with_the_fused_guided_step(pipe):
    from streamsynth.kernels.guided_step import FusedGuidedStep

    config = SynthesisConfig(num_inference_steps=4, feature_cache_interval=2)
    plain = Synthesizer(pipe, config).generate(PROMPTS[:1], SEEDS[:1])
    fused = Synthesizer(pipe, config, fused_step=FusedGuidedStep(pipe.scheduler)).generate(PROMPTS[:1], SEEDS[:1])
    assert (fused - plain).abs().max().item() <= 1e-5


def test_the_digits_model_with_the_cache(digits):
    unet = digits.unet
    assert len(unet.down_blocks) == len(unet.up_blocks) == 2  # the deep path is one block each way and the mid block
    prompts, seeds, steps = ["a handwritten digit 3", "a handwritten digit 7"], [1, 2], 9
    plain = Synthesizer(digits, SynthesisConfig(num_inference_steps=steps)).generate(prompts, seeds)
    synth = Synthesizer(digits, SynthesisConfig(num_inference_steps=steps, feature_cache_interval=3))
    cached = synth.generate(prompts, seeds)
    assert (synth.feature_cache.full_rows, synth.feature_cache.shallow_rows) == (3 * 2 * 2, 6 * 2 * 2)
    # Changed, but far less than one digit differs from another.
    change = (cached - plain).abs().mean().item()
    assert 1e-4 < change < (plain[0] - plain[1]).abs().mean().item() / 2


@pytest.mark.parametrize("interval", [0, -1, 1.5])
def test_a_bad_interval_is_refused(interval):
    with pytest.raises(ValueError, match="feature_cache_interval"):
        SynthesisConfig(feature_cache_interval=interval)


def test_a_bad_interval_is_refused_by_the_cache_too(pipe):
    with pytest.raises(ValueError, match="feature_cache_interval"):
        FeatureCache(pipe.unet, 0)


def test_the_cache_refuses_a_compiled_unet(tiny_model):
    from streamsynth import FastPathOptions, GeneratorConfig

    with pytest.raises(ValueError, match="compiled UNet"):
        GeneratorConfig(tiny_model, synthesis=SynthesisConfig(feature_cache_interval=2),
                        fast=FastPathOptions(compile_unet=True))


@pytest.fixture(scope="module")
def three_levels():
    """A UNet with three blocks each way (SD's has four): the up block that feeds the last one (up_blocks[-2]) is not
    the first, and the deep path has two blocks each way, so taking the wrong block or too few is seen here, as it
    is not in the two-block UNets above."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=2).eval()


def test_a_deeper_unet_reuses_exactly_and_skips_every_deep_block(three_levels):
    unet = three_levels
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, 16, generator=generator)
    deep = {"down1": unet.down_blocks[1], "down2": unet.down_blocks[2], "mid": unet.mid_block,
            "up0": unet.up_blocks[0], "up1": unet.up_blocks[1]}
    shallow = {"down0": unet.down_blocks[0], "up2": unet.up_blocks[2]}
    calls = {name: 0 for name in {**deep, **shallow}}
    handles = [module.resnets[0].register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
               for name, module in {**deep, **shallow}.items()]
    cache = FeatureCache(unet, interval=2)
    try:
        with torch.no_grad():
            with cache.step(0, 2):
                full = unet(sample, 400, encoder_hidden_states=text, return_dict=False)[0]
            assert all(count == 1 for count in calls.values())
            with cache.step(1, 2):
                reused = unet(sample, 400, encoder_hidden_states=text, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    assert (reused - full).abs().max().item() <= 1e-5
    assert {name: calls[name] for name in deep} == dict.fromkeys(deep, 1)  # not run again on the shallow step
    assert {name: calls[name] for name in shallow} == dict.fromkeys(shallow, 2)
