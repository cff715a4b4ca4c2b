"""Few-step generators against their diffusers references: an LCM-LoRA with the LCM scheduler, a tiny VAE decoder
(AutoencoderTiny, TAESD's class) and an SD2.1-class checkpoint sampled as SD-Turbo is (1-2 steps, no guidance).

The LoRA and the decoder are random and tiny, made here the way diffusers documents (peft's LoraConfig on the UNet,
`save_lora_weights`; `AutoencoderTiny.save_pretrained`), and always loaded back from disk.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

from streamsynth.digits.embedded import embedded_model
from streamsynth.synth import (
    GeneratorConfig,
    ModelLoadError,
    SynthesisConfig,
    Synthesizer,
    has_random_weights,
    is_tiny_model,
    load_pipeline,
    save_tiny_pipeline,
)
from streamsynth.synth.tiny import mark_random_weights

PROMPTS = ["a photo of tench, a man holding a fish", "a photo of church", ""]
SEEDS = [3, 4, 5]


def _diffusers_images(pipe, steps: int, guidance: float) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                output_type="pt").images


def _diffusers_pipeline(model, **components) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generator(model, **fields) -> GeneratorConfig:
    return GeneratorConfig(model, devices=("cpu",), dtype="fp32", **fields)


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory):
    """A random LoRA on the tiny UNet's attention, feed-forward and convolution layers (where LCM-LoRA adapts SD1.5),
    saved by `save_lora_weights` as a folder with pytorch_lora_weights.safetensors."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    # init_lora_weights=False draws both LoRA matrices at random (the default zeroes one, which changes nothing).
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "time_emb_proj"]))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A random AutoencoderTiny with TAESD's four blocks (an 8x decoder) at a few channels."""
    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                          num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)
    folder = tmp_path_factory.mktemp("taesd")
    vae.save_pretrained(folder)
    mark_random_weights(folder, "taesd")
    return folder


@pytest.fixture(scope="module")
def turbo_model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-turbo", with_safety_checker=False,
                              architecture="sd21-turbo")


def test_lcm_lora_matches_diffusers(tiny_model, lora):
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = SynthesisConfig(num_inference_steps=4, guidance_scale=1.0)
    synth = Synthesizer.from_config(_generator(tiny_model, scheduler="lcm", lora=str(lora), synthesis=config), "cpu")
    assert isinstance(synth.pipe.scheduler, LCMScheduler)
    # Fused and unloaded: plain layers, no per-step LoRA work.
    assert not any(isinstance(m, BaseTunerLayer) for m in synth.pipe.unet.modules())
    ours = synth.generate(PROMPTS, SEEDS)

    theirs = _diffusers_pipeline(tiny_model)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    theirs.load_lora_weights(lora)
    assert (ours - _diffusers_images(theirs, 4, 1.0)).abs().max().item() <= 1e-4

    without = Synthesizer(load_pipeline(tiny_model, "cpu", "fp32", scheduler="lcm"), config).generate(PROMPTS, SEEDS)
    assert (ours - without).abs().max().item() > 0.05  # the LoRA changes the images: the test can fail


def test_a_lora_file_and_a_cached_hub_id_load_as_the_folder_does(tiny_model, lora, tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1), a hub id loads from the local cache, laid out here as huggingface_hub lays it."""
    import huggingface_hub.constants

    weights = lora / "pytorch_lora_weights.safetensors"
    snapshot = tmp_path / "hub" / "models--someone--lcm-lora-tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(weights, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    reference = load_pipeline(tiny_model, "cpu", "fp32", lora=lora).unet.state_dict()
    for source in (weights, "someone/lcm-lora-tiny"):
        unet = load_pipeline(tiny_model, "cpu", "fp32", lora=source).unet.state_dict()
        assert all(torch.equal(unet[k], reference[k]) for k in reference), source


def test_tiny_decoder_matches_diffusers(tiny_model, tiny_decoder, caplog):
    config = SynthesisConfig(num_inference_steps=3, guidance_scale=1.5)
    with caplog.at_level(logging.WARNING):
        synth = Synthesizer.from_config(_generator(tiny_model, decoder=tiny_decoder, synthesis=config), "cpu")
    assert "Expected types" not in caplog.text  # diffusers' type warning is dropped; AutoencoderTiny runs as it is
    vae = synth.pipe.vae
    assert isinstance(vae, AutoencoderTiny) and vae.config.scaling_factor == 1.0 and synth.pipe.vae_scale_factor == 8
    ours = synth.generate(PROMPTS, SEEDS)

    theirs = _diffusers_pipeline(tiny_model, vae=AutoencoderTiny.from_pretrained(tiny_decoder))
    assert (ours - _diffusers_images(theirs, 3, 1.5)).abs().max().item() <= 1e-4

    full_vae = Synthesizer(load_pipeline(tiny_model, "cpu", "fp32"), config).generate(PROMPTS, SEEDS)
    assert (ours - full_vae).abs().max().item() > 0.05


def test_the_fast_path_takes_a_tiny_decoder(tiny_model, tiny_decoder):
    """AutoencoderTiny has no attention and no GroupNorm: the fast path's attention, QKV fusion and kernel patch
    leave it as it is. (The Triton kernels themselves are test_fast's: under the interpreter they take minutes.)"""
    from streamsynth.kernels.patch import patch
    from streamsynth.synth.fast import FastPathOptions

    assert patch(AutoencoderTiny.from_pretrained(tiny_decoder)) == {}
    config = SynthesisConfig(num_inference_steps=2, guidance_scale=1.5)
    options = FastPathOptions(triton_kernels=False, fused_step=False, fused_postprocess=False, channels_last=True,
                              fuse_qkv=True)
    fast = Synthesizer.from_pretrained(tiny_model, dtype="fp32", config=config, fast=options, decoder=tiny_decoder)
    plain = Synthesizer.from_pretrained(tiny_model, dtype="fp32", config=config, decoder=tiny_decoder)
    assert (fast.generate(PROMPTS, SEEDS) - plain.generate(PROMPTS, SEEDS)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("steps", [1, 2])
def test_sd_turbo_class_matches_diffusers(turbo_model, steps):
    pipe = load_pipeline(turbo_model, "cpu", "fp32")
    assert pipe.unet.config.use_linear_projection and list(pipe.unet.config.attention_head_dim) == [2, 4]
    assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.tokenizer.pad_token == "!"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    ours = Synthesizer(pipe, SynthesisConfig(num_inference_steps=steps, guidance_scale=0.0)).generate(PROMPTS, SEEDS)
    assert int(pipe.scheduler.timesteps[0]) == 999  # trailing: the first of few steps starts from pure noise
    theirs = _diffusers_images(_diffusers_pipeline(turbo_model), steps, 0.0)
    assert ours.shape == theirs.shape == (3, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_a_random_tiny_decoder_makes_the_generator_say_random_weights(tiny_decoder):
    trained = embedded_model()
    assert not GeneratorConfig(trained).random_weights
    assert GeneratorConfig(trained, decoder=str(tiny_decoder)).random_weights


def test_the_turbo_class_model_says_it_has_random_weights(turbo_model):
    assert has_random_weights(turbo_model) and is_tiny_model(turbo_model, "sd21-turbo")
    assert not is_tiny_model(turbo_model)  # not the SD1.5-class tiny model
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        save_tiny_pipeline(turbo_model.parent / "other", architecture="sdxl")


def test_missing_lora_or_decoder_is_a_clear_error(tiny_model, tmp_path):
    missing = tmp_path / "no-such-lora"
    for make in (lambda: load_pipeline(tiny_model, lora=missing), lambda: _generator(tiny_model, lora=missing)):
        with pytest.raises(ModelLoadError, match=re.escape(f"LoRA {missing} does not exist")):
            make()
    with pytest.raises(ModelLoadError, match="LoRA lcm.safetensors does not exist"):
        _generator(tiny_model, lora="lcm.safetensors")  # a file name, not a hub id

    missing = tmp_path / "no-such-taesd"
    for make in (lambda: load_pipeline(tiny_model, decoder=missing), lambda: _generator(tiny_model, decoder=missing)):
        with pytest.raises(ModelLoadError, match=re.escape(f"tiny decoder folder {missing} does not exist")):
            make()
    with pytest.raises(ModelLoadError, match="no config.json"):
        _generator(tiny_model, decoder=tmp_path)


def test_a_lora_that_fits_nothing_is_refused(tiny_model, tmp_path):
    from safetensors.torch import save_file

    not_a_lora = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2)}, not_a_lora)
    with pytest.raises(ModelLoadError, match="could not load the LoRA .*weights.safetensors"):
        load_pipeline(tiny_model, lora=not_a_lora)
    # SDXL's second text encoder: keys this pipeline has no component for, which diffusers would skip silently.
    other = tmp_path / "sdxl.safetensors"
    key = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 32), f"{key}.lora_B.weight": torch.zeros(32, 4)}, other)
    with pytest.raises(ModelLoadError, match="adapts none of the model's layers"):
        load_pipeline(tiny_model, lora=other)


def test_generator_config_with_lora_and_decoder_pickles_equal(tiny_model, lora, tiny_decoder):
    config = _generator(tiny_model, scheduler="lcm", lora=lora, decoder=tiny_decoder)
    assert config.lora == str(lora) and config.decoder == str(tiny_decoder)  # paths normalised to strings
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and (copy.lora, copy.decoder) == (str(lora), str(tiny_decoder))
    assert GeneratorConfig(tiny_model).lora is None and GeneratorConfig(tiny_model).decoder is None


def test_a_unet_that_takes_its_guidance_as_input_is_refused(tiny_model):
    """Full LCM checkpoints embed the guidance scale; without it they would sample silently wrong images."""
    from diffusers import UNet2DConditionModel

    pipe = load_pipeline(tiny_model, "cpu", "fp32")
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 8})
    with pytest.raises(ValueError, match="LCM-LoRA"):
        Synthesizer(pipe, SynthesisConfig(num_inference_steps=2))
