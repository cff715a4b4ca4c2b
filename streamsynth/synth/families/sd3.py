"""Stable Diffusion 3 and 3.5 (Medium, Large, Large Turbo): a multimodal diffusion transformer (MMDiT) trained by flow
matching, conditioned on two CLIP encoders and, optionally, T5-XXL; a 16-channel 8x AutoencoderKL.

As `StableDiffusion3Pipeline` samples: both CLIP encoders read 77 tokens, their penultimate hidden states side by side
and zero-padded to T5's width, followed by T5's 256 tokens (zeros when the checkpoint has no T5: to sample without it,
save the pipeline loaded with `text_encoder_3=None, tokenizer_3=None`); the pooled projections of both CLIP encoders
side by side; the unconditional branch from the empty prompt; the flow-matching Euler scheduler with its shift (and,
where the checkpoint turns dynamic shifting on, `mu` from the image's token count); latents neither scaled by a noise
sigma nor before the transformer; decoded as latents / scaling factor + shift factor. SD3.5 Large Turbo is the same
pipeline sampled in 4 steps without guidance.
"""

from __future__ import annotations

import torch

from .base import Conditioning, Family, TextEncoder, call_default, clip_hidden_states, tokenize


class StableDiffusion3(Family):
    name = "SD3/3.5"
    key = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    tiny_decoder = "madebyollin/taesd3"
    denoiser_attribute = "transformer"
    sigma_scaled_inputs = False

    def load_options(self, index: dict, safety_checker: bool) -> dict:
        # A checkpoint saved without T5 (from a pipeline loaded with text_encoder_3=None) lists no T5 in its index;
        # diffusers loads it only when told that T5 is absent.
        if index.get("text_encoder_3", [None])[0] is None:
            return {"text_encoder_3": None, "tokenizer_3": None}
        return {}

    def text_encoders(self, pipe) -> list[TextEncoder]:
        clip = pipe.tokenizer.model_max_length
        t5 = [TextEncoder("T5", call_default(pipe, "max_sequence_length"))] if pipe.text_encoder_3 is not None else []
        return [TextEncoder("CLIP", clip), TextEncoder("OpenCLIP", clip), *t5]

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str]) -> Conditioning:
        clip_length = pipe.tokenizer.model_max_length  # the pipeline cuts both CLIP encoders' prompts to the first's
        states, pooled = [], []
        for tokenizer, encoder, kind in ((pipe.tokenizer, pipe.text_encoder, "CLIP"),
                                         (pipe.tokenizer_2, pipe.text_encoder_2, "OpenCLIP")):
            hidden, projection = clip_hidden_states(tokenizer, encoder, prompts, clip_length, self.name, kind)
            states.append(hidden.to(pipe.text_encoder.dtype))
            pooled.append(projection)
        t5 = self._t5_states(pipe, prompts)
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def _t5_states(self, pipe, prompts: list[str]) -> torch.Tensor:
        length = call_default(pipe, "max_sequence_length")
        encoder = pipe.text_encoder_3
        if encoder is None:
            return torch.zeros((len(prompts), length, pipe.transformer.config.joint_attention_dim),
                               device=pipe.transformer.device, dtype=pipe.text_encoder.dtype)
        ids = tokenize(pipe.tokenizer_3, prompts, length, self.name, "T5").input_ids
        return encoder(ids.to(encoder.device))[0].to(encoder.dtype)

    def set_timesteps(self, pipe, steps: int, device: torch.device, latent_size: tuple[int, int]) -> None:
        scheduler = pipe.scheduler
        options = {}
        if scheduler.config.get("use_dynamic_shifting"):
            patch = pipe.transformer.config.patch_size
            options["mu"] = image_shift(scheduler.config, (latent_size[0] // patch) * (latent_size[1] // patch))
        scheduler.set_timesteps(steps, device=device, **options)

    def predict(self, pipe, latents: torch.Tensor, t: torch.Tensor, text: Conditioning) -> torch.Tensor:
        return pipe.transformer(hidden_states=latents, timestep=t.expand(len(latents)),
                                encoder_hidden_states=text["prompt"], pooled_projections=text["pooled"],
                                return_dict=False)[0]

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0]

    def build_random(self, size: str, device: torch.device):
        """Tiny: two 32-wide CLIP encoders, a one-layer T5 of width 64, a two-layer MMDiT with SD3.5's dual attention
        and QK norm, 64x64 images; native: SD3.5 Medium's published component configurations."""
        import tempfile
        from pathlib import Path

        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
            StableDiffusion3Pipeline
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from ..tiny import character_clip_tokenizer, character_t5_tokenizer, tiny_autoencoder, tiny_clip_text_encoder

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = character_clip_tokenizer(Path(tmp) / "1")
            tokenizer_2 = character_clip_tokenizer(Path(tmp) / "2", pad_token="!")
        tokenizer_3 = character_t5_tokenizer()
        with torch.device(device):
            if size == "tiny":
                text_encoder = tiny_clip_text_encoder(tokenizer, projection_dim=32)
                text_encoder_2 = tiny_clip_text_encoder(tokenizer_2, "gelu", projection_dim=32)
                text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), **TINY_T5))
                transformer = SD3Transformer2DModel(**TINY_TRANSFORMER)
                vae = tiny_autoencoder(**VAE_LATENTS)
            else:
                from ..sd15 import TEXT_ENCODER, VAE
                from .sdxl import OPENCLIP_BIGG

                special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER, **special))
                text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **special))
                text_encoder_3 = T5EncoderModel(T5Config(**T5_XXL))
                transformer = SD3Transformer2DModel(**TRANSFORMER)
                vae = AutoencoderKL(**{**VAE, "sample_size": 1024, **VAE_LATENTS})
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )


def image_shift(config, image_tokens: int) -> float:
    """The flow-matching schedule's `mu` for an image of `image_tokens` tokens: linear in the token count between
    the scheduler's base and maximum shift (at its base and maximum sequence length), as diffusers computes it."""
    base_tokens, max_tokens = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return image_tokens * slope + (base_shift - slope * base_tokens)


# SD3.5 Medium's MMDiT-X (dual attention in its first 13 blocks, QK RMS norm), T5-XXL v1.1's encoder and the
# 16-channel VAE's latent statistics, as published; its CLIP encoders are CLIP ViT-L/14 and OpenCLIP ViT-bigG/14.
TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
VAE_LATENTS = dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                   use_post_quant_conv=False)
TINY_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)
TINY_T5 = dict(d_model=64, d_ff=64, d_kv=16, num_heads=4, num_layers=1, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8)

FAMILY = StableDiffusion3()
