"""Speed levers against their diffusers references: limited-interval guidance through diffusers' own step-end
callback (the documented way to change guidance during sampling), and the count of UNet evaluations it saves."""

from __future__ import annotations

import pytest
import torch

from streamsynth.synth import SynthesisConfig, Synthesizer, load_pipeline

PROMPTS = ["a photo of tench, a man holding a fish", "a photo of church, a white church", "a photo of golf ball"]
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model, "cpu", "fp32")


def _diffusers_with_interval(pipe, steps: int, scale: float, interval: tuple[float, float]) -> torch.Tensor:
    """StableDiffusionPipeline, guidance switched on and off between steps by `callback_on_step_end`."""
    cond, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    uncond, _ = pipe.encode_prompt([""] * len(PROMPTS), "cpu", 1, False)
    both = torch.cat([uncond, cond])
    def guided(i: int, total: int) -> bool:
        return interval[0] <= i / total < interval[1]

    def switch(p, i, t, kwargs):
        total = len(p.scheduler.timesteps)
        nxt = guided(i + 1, total)
        p._guidance_scale = scale if nxt else 1.0
        return {"prompt_embeds": both if nxt else cond}

    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    # Step 0's guidance comes from the call itself: guided from the start, or plain conditional embeddings.
    first = guided(0, steps + 1 if type(pipe.scheduler).__name__ == "PNDMScheduler" else steps)
    kwargs = ({"prompt": PROMPTS, "guidance_scale": scale} if first
              else {"prompt_embeds": cond, "guidance_scale": 1.0})
    return pipe(**kwargs, num_inference_steps=steps, generator=generators, output_type="pt",
                callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images


@pytest.mark.parametrize("interval", [(0.0, 0.5), (0.25, 0.75), (0.6, 1.0)])
def test_limited_interval_guidance_matches_diffusers_callback(pipe, interval):
    config = SynthesisConfig(num_inference_steps=8, guidance_scale=3.0, guidance_interval=interval)
    ours = Synthesizer(pipe, config).generate(PROMPTS, SEEDS)
    theirs = _diffusers_with_interval(pipe, 8, 3.0, interval)
    assert (ours - theirs).abs().max().item() <= 1e-4
    everywhere = Synthesizer(pipe, SynthesisConfig(num_inference_steps=8, guidance_scale=3.0)).generate(PROMPTS, SEEDS)
    assert (ours - everywhere).abs().max().item() > 1e-3  # the interval changes the images: the test can fail


def test_guided_steps_follow_the_interval():
    config = SynthesisConfig(num_inference_steps=10, guidance_scale=1.5, guidance_interval=(0.2, 0.6))
    assert [i for i in range(10) if config.guided(i, 10)] == [2, 3, 4, 5]
    assert not any(SynthesisConfig(guidance_scale=1.0).guided(i, 50) for i in range(50))
    assert all(SynthesisConfig().guided(i, 50) for i in range(50))


@pytest.mark.parametrize("interval", [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), (0.3,)])
def test_a_bad_guidance_interval_is_refused(interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        SynthesisConfig(guidance_interval=interval)


@pytest.mark.parametrize("scheduler", [None, "dpm++", "unipc", "lcm"])
def test_a_lever_image_does_not_depend_on_its_batch(tiny_model, scheduler):
    """Each few-step sampler, with the guidance interval on: an image is a function of its (prompt, seed) alone."""
    pipe = load_pipeline(tiny_model, "cpu", "fp32", scheduler=scheduler)
    synth = Synthesizer(pipe, SynthesisConfig(num_inference_steps=6, guidance_interval=(0.3, 0.7)))
    batch = synth.generate(PROMPTS, SEEDS)
    for i in range(len(PROMPTS)):
        assert (synth.generate([PROMPTS[i]], [SEEDS[i]])[0] - batch[i]).abs().max().item() <= 1e-5


# ----- presets ----------------------------------------------------------------------------------------------------

def test_the_reference_preset_is_the_published_recipe_and_the_default():
    from streamsynth.synth.speed import SPEED_PRESETS, speed_preset

    reference = SPEED_PRESETS["reference"]
    assert (reference.scheduler, reference.num_inference_steps, reference.guidance_interval,
            reference.feature_cache_interval) == ("pndm", 50, (0.0, 1.0), 1)
    assert speed_preset("reference") == {"synthesis": SynthesisConfig(), "scheduler": "pndm"}


def test_library_code_takes_a_speed_preset():
    from streamsynth import GeneratorConfig
    from streamsynth.synth.speed import SPEED_PRESETS, speed_preset

    fast = SPEED_PRESETS["fast"]
    config = GeneratorConfig("someone/a-model", **speed_preset("fast"), image_size=64)
    assert (config.synthesis.num_inference_steps, config.synthesis.guidance_interval, config.scheduler) == \
        (fast.num_inference_steps, fast.guidance_interval, fast.scheduler)
    assert config.synthesis.guidance_scale == SynthesisConfig().guidance_scale
    with pytest.raises(ValueError, match="unknown speed preset 'fastest'"):
        speed_preset("fastest")


def test_the_fast_preset_makes_at_least_four_times_fewer_unet_evaluations(pipe):
    """Counted on the UNet's calls, not computed from the settings: the acceptance's 'UNet evaluations per image'."""
    from streamsynth.synth.loading import scheduler_from_name
    from streamsynth.synth.speed import SPEED_PRESETS

    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    own = pipe.scheduler
    try:
        counts = {}
        for name in ("reference", "fast"):
            preset = SPEED_PRESETS[name]
            pipe.scheduler = scheduler_from_name(preset.scheduler, own.config)
            rows.clear()
            config = SynthesisConfig(num_inference_steps=preset.num_inference_steps,
                                     guidance_interval=preset.guidance_interval, height=32, width=32)
            Synthesizer(pipe, config).generate(PROMPTS[:2], SEEDS[:2])
            counts[name] = sum(rows) / 2
    finally:
        hook.remove()
        pipe.scheduler = own
    assert counts["reference"] == 102  # PNDM's 51 timesteps for 50 steps, two passes each
    assert counts["reference"] / counts["fast"] >= 4


def test_the_quality_harness_judges_each_lever_against_the_reference_images(tmp_path):
    """benchmarks/digits_cip.py's fidelity half, at toy sizes: same samples, the reference's images as the yardstick."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import digits_cip
    finally:
        sys.path.pop(0)
    digits_cip.main(["--conditions", "levers", "--levers", "fast,reference", "--no-classifiers", "--fidelity-images",
                     "8", "--steps", "3", "--out", str(tmp_path)])
    found = {row["condition"]: row for row in json.loads((tmp_path / "results.json").read_text())["fidelity"]}
    assert set(found) == {"reference", "fast"} and all(row["images"] == 8 for row in found.values())
    assert 0 <= found["fast"]["fidelity"] <= 100
    assert found["reference"]["mean_abs_difference_to_reference"] == 0.0
    assert found["fast"]["mean_abs_difference_to_reference"] > 0.5  # other samplers draw other images
