"""SDXL through streamsynth's loop against diffusers' StableDiffusionXLPipeline, on a tiny random model: two CLIP
encoders, the pooled projection and the added time ids, zeros for the empty prompt, the DDPM schedulers, a tiny
decoder, the fast path and DeepCache on its UNet."""

from __future__ import annotations

import pytest
import torch
from familykit import PROMPTS, SEEDS, assert_matches_diffusers, diffusers_images, native_parameters, save_tiny_decoder

from streamsynth.synth import SynthesisConfig, Synthesizer, load_pipeline


@pytest.fixture(scope="module")
def model(tiny_family):
    return tiny_family("sdxl")


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model, "cpu", "fp32")


@pytest.mark.parametrize("scheduler, steps, guidance", [(None, 4, 3.0), ("euler-ancestral", 3, 3.0), ("dpm++", 4, 1.0),
                                                        ("lcm", 2, 1.0)])
def test_matches_diffusers(pipe, scheduler, steps, guidance, monkeypatch):
    """Its own Euler scheduler; Euler ancestral draws noise at every step (as SDXL-Turbo's 1-4 steps do); LCM's
    2-8 steps without guidance are what an SDXL LCM-LoRA samples with."""
    assert_matches_diffusers(pipe, steps, guidance, scheduler, monkeypatch, alone=scheduler is None)


def test_an_lcm_lora_matches_diffusers(model, tmp_path):
    """A LoRA on the SDXL UNet (as an SDXL LCM-LoRA adapts it), fused at load, against `load_lora_weights`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    config = SynthesisConfig(num_inference_steps=2, guidance_scale=1.0)
    ours = Synthesizer(load_pipeline(model, "cpu", "fp32", scheduler="lcm", lora=tmp_path), config)
    theirs = load_pipeline(model, "cpu", "fp32", scheduler="lcm")
    theirs.load_lora_weights(tmp_path)
    assert (ours.generate(PROMPTS, SEEDS) - diffusers_images(theirs, 2, 1.0)).abs().max().item() <= 1e-4
    without = Synthesizer(load_pipeline(model, "cpu", "fp32", scheduler="lcm"), config)
    assert (ours.generate(PROMPTS[:1], SEEDS[:1]) - without.generate(PROMPTS[:1], SEEDS[:1])).abs().max() > 0.05


def test_the_empty_prompt_is_zeros_as_sdxl_base_says(pipe):
    assert pipe.config.force_zeros_for_empty_prompt
    unconditional = Synthesizer(pipe).empty_prompt_embedding()
    assert unconditional["prompt"].shape == (1, 77, 64) and unconditional["pooled"].shape == (1, 32)
    assert all(not value.any() for value in unconditional.values())


def test_a_tiny_decoder_matches_diffusers(model, tmp_path):
    """TAESDXL's class in the VAE's place (no latent statistics, no upcast), as diffusers' documentation swaps it in."""
    from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

    decoder = save_tiny_decoder(tmp_path / "taesdxl")
    ours = Synthesizer(load_pipeline(model, "cpu", "fp32", decoder=decoder), SynthesisConfig(num_inference_steps=2,
                                                                                              guidance_scale=3.0))
    theirs = StableDiffusionXLPipeline.from_pretrained(model, vae=AutoencoderTiny.from_pretrained(decoder))
    theirs.set_progress_bar_config(disable=True)
    assert (ours.generate(PROMPTS, SEEDS) - diffusers_images(theirs, 2, 3.0)).abs().max().item() <= 1e-4


def test_the_fast_path_acts_on_the_sdxl_unet_as_on_sd15s(pipe, model):
    from streamsynth.synth.fast import FastPathOptions

    config = SynthesisConfig(num_inference_steps=2, guidance_scale=3.0)
    options = FastPathOptions(triton_kernels=False, channels_last=True, fuse_qkv=True)
    fast = Synthesizer.from_pipeline(load_pipeline(model, "cpu", "fp32"), config, options)
    assert fast.fast_path.applied == ["attention=sdpa with fused QKV in vae+unet", "channels_last in vae+unet"]
    plain = Synthesizer(pipe, config).generate(PROMPTS, SEEDS)
    assert (fast.generate(PROMPTS, SEEDS) - plain).abs().max().item() <= 1e-4


def test_deepcache_skips_the_sdxl_unets_deep_blocks(pipe):
    synth = Synthesizer(pipe, SynthesisConfig(num_inference_steps=4, feature_cache_interval=2))
    batch = synth.generate(PROMPTS[:2], SEEDS[:2])
    assert synth.feature_cache.shallow_rows == synth.feature_cache.full_rows == 8  # 2 images x 2 branches x 2 steps
    alone = synth.generate(PROMPTS[1:2], SEEDS[1:2])
    assert (alone[0] - batch[1]).abs().max().item() <= 1e-5
    full = Synthesizer(pipe, SynthesisConfig(num_inference_steps=4)).generate(PROMPTS[:2], SEEDS[:2])
    assert (full - batch).abs().max().item() > 1e-3


def test_the_native_architecture_is_sdxl_base():
    """SDXL base 1.0: a 2.6 B UNet, CLIP ViT-L and OpenCLIP ViT-bigG, the 84 M VAE."""
    assert native_parameters("sdxl") == {"vae": 84, "text_encoder": 123, "text_encoder_2": 695, "unet": 2567}
