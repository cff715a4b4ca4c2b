"""Stable Diffusion v1.5's architecture with random weights: the same shapes and FLOPs as the released model.

For measuring speed where no checkpoint can be downloaded. The configurations below are SD1.5's published
component configurations (UNet, VAE, CLIP ViT-L/14 text encoder, PNDM scheduler), written out as data. The
tokenizer is streamsynth's character-level CLIP tokenizer: prompts are padded to 77 tokens either way, so the
text encoder's cost is the real one. Images from these weights are noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)


def build_random_sd15(device: str | torch.device = "cpu", seed: int = 0):
    """A `StableDiffusionPipeline` of SD1.5's architecture with random weights, built on `device` (fast on a GPU)."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import character_clip_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = character_clip_tokenizer(Path(tmp))
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, **special))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_random_sd15(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Path:
    """Builds the random-weight SD1.5 and `save_pretrained`s it (fp16 weights) to `folder`, unless already there."""
    from .tiny import mark_random_weights

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        build_random_sd15(device).to(dtype=torch.float16).save_pretrained(folder, safe_serialization=True)
        mark_random_weights(folder, "sd15")
    return folder


def kernel_workloads(dtype: torch.dtype, device: str | torch.device = "cpu", batch: int = 1, random: bool = True,
                     kernel: str | None = None, upcast: torch.dtype | None = None):
    """Every call SD1.5's fast path makes to a Triton kernel (or to `kernel` only) at 512², as repeatable `Workload`s
    (kernels/workloads.py): what `python -m streamsynth.benchmarks.kernel_compile_check` compiles and `python -m
    streamsynth.benchmarks.kernel_bench` times."""
    from ..kernels.workloads import ModelConfigs, model_workloads

    return model_workloads(ModelConfigs(UNET, VAE, TEXT_ENCODER, SCHEDULER), dtype, device, batch, random, kernel,
                           upcast)
