"""The sampling loop against diffusers' own StableDiffusionPipeline, loaded through from_pretrained."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from streamsynth.seeding import derive_seed
from streamsynth.synth import ModelLoadError, SynthesisConfig, Synthesizer, load_pipeline, resize_to_uint8
from streamsynth.synth.loading import scheduler_from_name

PROMPTS = ["a photo of tench, a man holding a fish", "a photo of church, a white church", "a photo of golf ball", ""]
SEEDS = [11, 22, 33, 44]


def _diffusers_images(pipe, steps: int, guidance: float) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt").images


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model, "cpu", "fp32")


@pytest.mark.parametrize("scheduler, steps", [(None, 12), ("ddim", 12), ("euler-ancestral", 12), ("dpm++", 8),
                                              ("unipc", 8), ("lcm", 4)])
def test_matches_diffusers_pipeline(pipe, scheduler, steps, monkeypatch):
    """PNDM is the model's own (SD1.5's) scheduler; Euler ancestral draws fresh noise at every step, LCM between
    steps; DPM-Solver++ and UniPC are multistep solvers for 10-25 steps."""
    if scheduler:  # for this test only: the other tests share the pipeline with the model's own scheduler
        monkeypatch.setattr(pipe, "scheduler", scheduler_from_name(scheduler, pipe.scheduler.config))
    ours = Synthesizer(pipe, SynthesisConfig(num_inference_steps=steps, guidance_scale=1.5)).generate(PROMPTS, SEEDS)
    theirs = _diffusers_images(pipe, steps, 1.5)
    assert ours.shape == theirs.shape == (4, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_no_guidance_matches_diffusers(pipe):
    ours = Synthesizer(pipe, SynthesisConfig(num_inference_steps=5, guidance_scale=1.0)).generate(PROMPTS, SEEDS)
    assert (ours - _diffusers_images(pipe, 5, 1.0)).abs().max().item() <= 1e-4


def test_a_sample_does_not_depend_on_its_batch(pipe):
    synth = Synthesizer(pipe, SynthesisConfig(num_inference_steps=8))
    batch = synth.generate(PROMPTS, SEEDS)
    shuffled = synth.generate(PROMPTS[::-1], SEEDS[::-1]).flip(0)
    for i in range(len(PROMPTS)):
        alone = synth.generate([PROMPTS[i]], [SEEDS[i]])[0]
        # Equal up to float32 rounding: batched and single matrix products may sum in a different order.
        assert (alone - batch[i]).abs().max().item() <= 1e-5
    assert (shuffled - batch).abs().max().item() <= 1e-5
    assert (batch[0] - batch[1]).abs().max().item() > 0.05  # and different samples really differ


def test_same_seed_same_image_different_seed_different_image(pipe):
    synth = Synthesizer(pipe, SynthesisConfig(num_inference_steps=4))
    a, b, c = synth.generate([PROMPTS[0]] * 3, [1, 1, 2])
    # Same (prompt, seed) in two rows of one batch: equal up to the rounding of the row's position in a GEMM.
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - c).abs().max().item() > 0.05


def test_flagged_images_are_redrawn_from_derived_seeds(tiny_model):
    pipe = load_pipeline(tiny_model, "cpu", "fp32", safety_checker=True)
    config = SynthesisConfig(num_inference_steps=4, safety_check=True)

    class FlagFirstDrawOfSample0(Synthesizer):
        calls = 0

        def flagged(self, images):
            real = super().flagged(images)  # the real (tiny, random) checker runs and returns one flag per image
            assert len(real) == len(images)
            self.calls += 1
            return [self.calls == 1 and i == 0 for i in range(len(images))]

    synth = FlagFirstDrawOfSample0(pipe, config)
    images = synth.generate(PROMPTS[:2], SEEDS[:2])
    plain = Synthesizer(pipe, SynthesisConfig(num_inference_steps=4))
    redrawn = plain.generate([PROMPTS[0]], [derive_seed(SEEDS[0], 1)])[0]
    assert (images[0] - redrawn).abs().max().item() <= 1e-5
    assert (images[1] - plain.generate([PROMPTS[1]], [SEEDS[1]])[0]).abs().max().item() <= 1e-5


def test_image_that_stays_flagged_becomes_black(tiny_model):
    pipe = load_pipeline(tiny_model, "cpu", "fp32", safety_checker=True)

    class AlwaysFlag(Synthesizer):
        def flagged(self, images):
            return [True] * len(images)

    images = AlwaysFlag(pipe, SynthesisConfig(num_inference_steps=2, safety_check=True, max_redraws=2)).generate(
        PROMPTS[:1], SEEDS[:1])
    assert images.abs().max().item() == 0


def test_derive_seed_is_stable_and_63_bit():
    assert derive_seed(0, "noise", 5) == derive_seed(0, "noise", 5)
    assert derive_seed(0, "noise", 5) != derive_seed(0, "noise", 6) != derive_seed(1, "noise", 5)
    assert all(0 <= derive_seed(i) < 2**63 for i in range(100))


def test_resize_to_uint8():
    images = torch.rand(2, 3, 64, 64)
    out = resize_to_uint8(images, 32)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 32, 32)
    assert (out.float() / 255 - torch.nn.functional.avg_pool2d(images, 2)).abs().max() < 0.3
    with pytest.raises(ValueError, match="shape"):
        resize_to_uint8(torch.rand(3, 64, 64), 32)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*model_index.json"):
        load_pipeline(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path / "empty")


def test_safety_check_needs_a_checker(tiny_model):
    pipe = load_pipeline(tiny_model, "cpu")
    assert pipe.safety_checker is None
    with pytest.raises(ValueError, match="safety checker"):
        Synthesizer(pipe, SynthesisConfig(safety_check=True))


def test_loaded_pipeline_is_a_diffusers_pipeline(tiny_model):
    pipe = load_pipeline(tiny_model, "cpu", "fp32", scheduler="ddim")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_pipeline(tiny_model, "cpu", scheduler="nope")


def test_models_built_with_random_weights_say_so(tmp_path, tiny_model, monkeypatch):
    from streamsynth.synth import has_random_weights, sd15
    from streamsynth.synth.tiny import build_tiny_pipeline

    assert has_random_weights(tiny_model)
    assert not has_random_weights(tmp_path) and not has_random_weights("stable-diffusion-v1-5/stable-diffusion-v1-5")
    # The SD1.5 architecture is too large to build here; its saving path is the same with the tiny model in its place.
    monkeypatch.setattr(sd15, "build_random_sd15", lambda device: build_tiny_pipeline(with_safety_checker=False))
    folder = sd15.save_random_sd15(tmp_path / "sd15-random")
    assert has_random_weights(folder) and (folder / "model_index.json").is_file()


def test_each_scheduler_name_is_the_diffusers_class_it_says(pipe):
    """Named literally here, not looked up in streamsynth's table; each is built from the model's own config (its
    noise schedule), not diffusers' defaults."""
    import diffusers

    from streamsynth.synth.loading import SCHEDULERS

    expected = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler,
                "euler": diffusers.EulerDiscreteScheduler, "euler-ancestral": diffusers.EulerAncestralDiscreteScheduler,
                "dpm++": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler,
                "lcm": diffusers.LCMScheduler}
    assert set(SCHEDULERS) == set(expected)
    own = pipe.scheduler.config
    assert (own.beta_schedule, own.beta_start, own.beta_end) != ("linear", 0.0001, 0.02)  # not diffusers' defaults
    for name, cls in expected.items():
        scheduler = scheduler_from_name(name, own)
        assert type(scheduler) is cls, name
        assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end) == (
            own.beta_schedule, own.beta_start, own.beta_end), name
