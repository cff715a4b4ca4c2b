"""Stable Diffusion XL (base; its refiner is not needed): a UNet conditioned on two CLIP encoders' penultimate hidden
states side by side, the second encoder's pooled projection and the image's size ("added time ids").

As `StableDiffusionXLPipeline` samples: each encoder reads 77 tokens; the unconditional branch is zeros where the
checkpoint says `force_zeros_for_empty_prompt` (SDXL base does), else the empty prompt; the time ids are
(height, width, 0, 0, height, width), no crop, the same for both branches; an fp16 VAE that asks for it
(`force_upcast`: SDXL's overflows in fp16) decodes in fp32.
"""

from __future__ import annotations

import torch

from .base import Conditioning, TextEncoder, clip_hidden_states
from .sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "SDXL"
    key = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    tiny_decoder = "madebyollin/taesdxl"
    has_safety_checker = False

    def load_options(self, index: dict, safety_checker: bool) -> dict:
        # The invisible watermark is applied in the pipeline's __call__ only, which streamsynth does not run.
        return {"add_watermarker": False}

    def text_encoders(self, pipe) -> list[TextEncoder]:
        return [TextEncoder("CLIP", pipe.tokenizer.model_max_length),
                TextEncoder("OpenCLIP", pipe.tokenizer_2.model_max_length)]

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str]) -> Conditioning:
        states, outputs = [], []
        for tokenizer, encoder, kind in ((pipe.tokenizer, pipe.text_encoder, "CLIP"),
                                         (pipe.tokenizer_2, pipe.text_encoder_2, "OpenCLIP")):
            hidden, first = clip_hidden_states(tokenizer, encoder, prompts, tokenizer.model_max_length, self.name,
                                               kind)
            states.append(hidden)
            outputs.append(first)
        # The pooled text embedding is the second encoder's projection (the first encoder's first output is 3-D).
        return {"prompt": torch.cat(states, dim=-1).to(pipe.text_encoder_2.dtype), "pooled": outputs[-1]}

    def encode_unconditional(self, pipe) -> Conditioning:
        empty = self.encode(pipe, [""])
        if pipe.config.force_zeros_for_empty_prompt:
            return {name: torch.zeros_like(value) for name, value in empty.items()}
        return empty

    def step_inputs(self, pipe, text: Conditioning, latent_size: tuple[int, int]) -> Conditioning:
        # The added time ids: original size, crop offset (none) and target size, the same for every row.
        height, width = (side * pipe.vae_scale_factor for side in latent_size)
        prompt = text["prompt"]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=prompt.dtype,
                                device=prompt.device).repeat(len(prompt), 1)
        return {**text, "time_ids": time_ids}

    def predict(self, pipe, latents: torch.Tensor, t: torch.Tensor, text: Conditioning) -> torch.Tensor:
        return pipe.unet(latents, t, encoder_hidden_states=text["prompt"],
                         added_cond_kwargs={"text_embeds": text["pooled"], "time_ids": text["time_ids"]},
                         return_dict=False)[0]

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:  # SDXL's VAE overflows in fp16: it decodes in fp32 (a copy of its weights, a millisecond on a GPU)
            vae.to(torch.float32)
        try:
            latents = latents.to(vae.dtype)
            mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
            if mean is not None and std is not None:
                shape = (1, len(mean), 1, 1)
                mean, std = (torch.tensor(v).view(shape).to(latents.device, latents.dtype) for v in (mean, std))
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)

    def build_random(self, size: str, device: torch.device):
        """Tiny: two 32-wide CLIP encoders, a two-level UNet with SDXL's text-time conditioning, 64x64 images;
        native: SDXL base 1.0's published component configurations."""
        import tempfile
        from pathlib import Path

        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        from ..tiny import character_clip_tokenizer, tiny_autoencoder, tiny_clip_text_encoder

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = character_clip_tokenizer(Path(tmp) / "1")
            tokenizer_2 = character_clip_tokenizer(Path(tmp) / "2", pad_token="!")
        with torch.device(device):
            if size == "tiny":
                text_encoder = tiny_clip_text_encoder(tokenizer)
                text_encoder_2 = tiny_clip_text_encoder(tokenizer_2, "gelu", projection_dim=32)
                unet = UNet2DConditionModel(**TINY_UNET)
                vae = tiny_autoencoder(scaling_factor=0.13025, force_upcast=True)
            else:
                from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
                from diffusers import AutoencoderKL

                from ..sd15 import TEXT_ENCODER, VAE

                special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, **special))
                text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **special))
                unet = UNet2DConditionModel(**UNET)
                vae = AutoencoderKL(**{**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True})
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER),
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )


# SDXL base 1.0's UNet, its OpenCLIP ViT-bigG text encoder and its scheduler, as published (the first text encoder
# and the VAE's architecture are SD1.5's, `streamsynth.synth.sd15`).
UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
OPENCLIP_BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading", prediction_type="epsilon",
)
# The same shape at a few MB: two levels, SDXL's split of attention heads and transformer depth, text-time
# conditioning (6 time ids x 8 + the 32-wide pooled projection).
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, norm_num_groups=8,
)

FAMILY = StableDiffusionXL()
