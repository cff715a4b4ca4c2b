"""SD3/3.5 through streamsynth's loop against diffusers' StableDiffusion3Pipeline, on a tiny random model (MMDiT with
SD3.5's dual attention and QK norm): flow matching, three encoders with T5 optional, dynamic shifting, limited-interval
guidance, few steps without guidance as SD3.5 Large Turbo samples; the fast path on a transformer; and a 2-rank
training run on it, stopped and resumed."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from familykit import PROMPTS, SEEDS, assert_matches_diffusers, native_parameters, save_tiny_decoder

from streamsynth.synth import ModelLoadError, SynthesisConfig, Synthesizer, load_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_family):
    return tiny_family("sd3")


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model, "cpu", "fp32")


@pytest.mark.parametrize("steps, guidance", [(4, 3.0), (2, 0.0)])
def test_matches_diffusers(pipe, steps, guidance):
    assert_matches_diffusers(pipe, steps, guidance)


def test_without_t5_matches_diffusers(model, tmp_path):
    """A checkpoint saved without T5 (to spare its memory) has zeros in T5's place, as in diffusers."""
    StableDiffusion3Pipeline.from_pretrained(model, text_encoder_3=None, tokenizer_3=None).save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path, "cpu", "fp32")
    assert pipe.text_encoder_3 is None
    synth = Synthesizer(pipe)
    assert [e.kind for e in synth.family.text_encoders(pipe)] == ["CLIP", "OpenCLIP"]
    assert not synth.encode_text(PROMPTS[:1])["prompt"][:, 77:].any()
    assert_matches_diffusers(pipe, 3, 3.0, alone=False)


def test_dynamic_shifting_matches_diffusers(pipe, monkeypatch):
    """Where the scheduler shifts by the image's token count (`mu`), the loop passes it as diffusers does."""
    shifting = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    monkeypatch.setattr(pipe, "scheduler", shifting)
    assert_matches_diffusers(pipe, 3, 3.0, alone=False)


def test_limited_interval_guidance_matches_diffusers_callback(pipe):
    """Guidance on the steps in [0.25, 0.75) only, against the pipeline switched by its step-end callback."""
    steps, scale, interval = 8, 3.0, (0.25, 0.75)
    ours = Synthesizer(pipe, SynthesisConfig(num_inference_steps=steps, guidance_scale=scale,
                                             guidance_interval=interval)).generate(PROMPTS, SEEDS)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    both, both_pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])

    def guided(i: int) -> bool:
        return interval[0] <= i / steps < interval[1]

    def switch(p, i, t, tensors):
        p._guidance_scale = scale if guided(i + 1) else 1.0
        return {"prompt_embeds": both if guided(i + 1) else cond,
                "pooled_prompt_embeds": both_pooled if guided(i + 1) else pooled}

    theirs = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, guidance_scale=1.0, num_inference_steps=steps,
                  height=64, width=64, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                  output_type="pt", callback_on_step_end=switch,
                  callback_on_step_end_tensor_inputs=["prompt_embeds", "pooled_prompt_embeds"]).images
    assert (ours - theirs).abs().max().item() <= 1e-4
    everywhere = Synthesizer(pipe, SynthesisConfig(num_inference_steps=steps, guidance_scale=scale)).generate(
        PROMPTS, SEEDS)
    assert (ours - everywhere).abs().max().item() > 1e-3  # the interval changes the images: the test can fail


def test_what_does_not_fit_sd3_is_refused_in_one_line(model, tmp_path):
    with pytest.raises(ValueError, match=r"^scheduler 'ddim' does not fit SD3/3.5: give it only its own"):
        load_pipeline(model, "cpu", scheduler="ddim")
    with pytest.raises(ModelLoadError, match=r"decodes 4-channel latents, SD3/3.5 makes 16-channel ones: give the tiny "
                                             r"decoder made for it, madebyollin/taesd3$"):
        load_pipeline(model, "cpu", decoder=save_tiny_decoder(tmp_path / "taesd"))


def test_the_native_architecture_is_sd35_medium():
    """SD3.5 Medium: a 2.2 B MMDiT-X, CLIP ViT-L and OpenCLIP ViT-bigG with projections, T5-XXL's 4.8 B encoder."""
    assert native_parameters("sd3") == {"vae": 84, "text_encoder": 124, "text_encoder_2": 695,
                                        "text_encoder_3": 4762, "transformer": 2243}


def test_the_fast_path_on_a_transformer_family_says_what_it_leaves_off(model, caplog):
    from streamsynth.synth.fast import FastPathOptions

    config = SynthesisConfig(num_inference_steps=2, guidance_scale=2.0)
    prompts, seeds = ["a photo of tench, a fish", "a photo of church"], [1, 2]
    plain = Synthesizer(load_pipeline(model, "cpu", "fp32"), config).generate(prompts, seeds)
    options = FastPathOptions(triton_kernels=False, channels_last=True, fuse_qkv=True)
    with caplog.at_level(logging.DEBUG, logger="streamsynth.synth.fast"):
        fast = Synthesizer.from_pipeline(load_pipeline(model, "cpu", "fp32"), config, options)
    assert (fast.generate(prompts, seeds) - plain).abs().max().item() <= 1e-4
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "fast path: attention=sdpa with fused QKV in vae" in said
    assert "fast path: channels_last in vae" in said
    assert any(line.startswith("fast path: not for SD3/3.5: channels_last in the transformer") for line in said)
    assert any(line.startswith("fast path: not for SD3/3.5: fused QKV in the transformer") for line in said)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing asked for was impossible

    compiled = load_pipeline(model, "cpu", "fp32")
    Synthesizer.from_pipeline(compiled, config, FastPathOptions(triton_kernels=False, compile_unet=True))
    assert isinstance(compiled.transformer, torch._dynamo.eval_frame.OptimizedModule)  # compiled when first called


RUN = ["--online-synthesis", "--workers", "0", "--batch-size", "2", "--image-size", "16", "--model", "resnet18",
       "--num-inference-steps", "2", "--synth-batch-size", "2", "--log-sample-ids", "--log-every", "1"]


@pytest.mark.slow
def test_two_ranks_on_sd3_resume_the_sequence_exactly(tmp_path, isolated_cache, caption_store, tiny_family):
    """torchrun, 2 ranks, online synthesis from the tiny SD3 (flow matching, three encoders): a run stopped at step 2
    and resumed to step 4 logs each rank's very sample ids of an uninterrupted run, and ends with its weights."""
    from test_train_distributed import _env, _read_ids

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), "--sd-model", str(tiny_family("sd3")), "--captions", str(caption_store.path),
               *RUN]
    for out, steps in [("reference", "4"), ("resumed", "2"), ("resumed", "4")]:
        result = subprocess.run([*command, "--steps", steps, "--out", str(tmp_path / out), "--resume"],
                                capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"resumed from .* at step 2", result.stdout)
    expected = [_read_ids(tmp_path / "reference" / f"sample_ids-rank{rank}.csv") for rank in (0, 1)]
    assert [_read_ids(tmp_path / "resumed" / f"sample_ids-rank{rank}.csv") for rank in (0, 1)] == expected
    assert sorted(int(key) for batches in expected for _, keys in batches.values() for key in keys) == list(range(16))
    finished, uninterrupted = (torch.load(tmp_path / out / "checkpoint.pt", weights_only=True)
                               for out in ("resumed", "reference"))
    assert finished["step"] == uninterrupted["step"] == 4
    torch.testing.assert_close(finished["model"], uninterrupted["model"], rtol=1e-5, atol=1e-6)
