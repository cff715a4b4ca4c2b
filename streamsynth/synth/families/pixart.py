"""PixArt-Σ: a diffusion transformer (DiT with cross-attention to the text) on T5-XXL's encoding of up to 300
tokens, DDPM-trained with a learned variance, decoding with SDXL's VAE.

As `PixArtSigmaPipeline` samples, with two of its options off: prompts lower-cased and stripped (diffusers'
caption cleaning needs beautifulsoup4 and ftfy and is skipped without them, as here: `clean_caption=False`), padded
and cut to 300 T5 tokens with their attention mask; the unconditional branch from the empty prompt;
`scale_model_input` before the transformer, of whose output the first half of the channels (the noise; the second is
the variance) goes to the scheduler. Resolution binning (`use_resolution_binning`: sample at the closest trained
aspect ratio, resize to the size asked) is not applied: at the native square size it changes nothing, any other
size is sampled as asked.
"""

from __future__ import annotations

import torch

from .base import Conditioning, Family, TextEncoder, call_default, masked_states, noise_half


class PixArtSigma(Family):
    name = "PixArt-Σ"
    key = "pixart-sigma"
    pipeline_classes = ("PixArtSigmaPipeline",)
    tiny_decoder = "madebyollin/taesdxl"
    denoiser_attribute = "transformer"
    schedulers = ("dpm++", "ddim", "euler", "euler-ancestral", "unipc", "pndm")
    reference_call_options = {"clean_caption": False, "use_resolution_binning": False}

    def text_encoders(self, pipe) -> list[TextEncoder]:
        return [TextEncoder("T5", call_default(pipe, "max_sequence_length"))]

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str]) -> Conditioning:
        states, mask = masked_states(pipe, prompts, call_default(pipe, "max_sequence_length"), self.name, "T5")
        return {"prompt": states, "mask": mask}

    def predict(self, pipe, latents: torch.Tensor, t: torch.Tensor, text: Conditioning) -> torch.Tensor:
        transformer = pipe.transformer
        timestep = t[None].to(latents.device).expand(len(latents))
        output = transformer(latents, encoder_hidden_states=text["prompt"], encoder_attention_mask=text["mask"],
                             timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                             return_dict=False)[0]
        return noise_half(transformer, output)

    def build_random(self, size: str, device: torch.device):
        """Tiny: a one-layer T5 of width 32, a two-block DiT, 64x64 images; native: PixArt-Σ XL/2 at 1024² with
        T5-XXL and SDXL's VAE, as published."""
        from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, \
            PixArtTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        from ..tiny import character_t5_tokenizer, tiny_autoencoder

        tokenizer = character_t5_tokenizer()
        with torch.device(device):
            if size == "tiny":
                text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_T5))
                transformer = PixArtTransformer2DModel(**TINY_TRANSFORMER)
                vae = tiny_autoencoder(scaling_factor=0.13025)
            else:
                from ..sd15 import VAE
                from .sd3 import T5_XXL

                text_encoder = T5EncoderModel(T5Config(**T5_XXL))
                transformer = PixArtTransformer2DModel(**TRANSFORMER)
                vae = AutoencoderKL(**{**VAE, "sample_size": 1024, "scaling_factor": 0.13025})
        return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler(**SCHEDULER))


# PixArt-Σ XL/2 1024-MS's transformer and scheduler, as published.
TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, interpolation_scale=2,
    use_additional_conditions=False, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
)
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", algorithm_type="dpmsolver++",
                 solver_order=2, prediction_type="epsilon")
TINY_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
    attention_head_dim=8, cross_attention_dim=16, caption_channels=32, use_additional_conditions=False,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
)
TINY_T5 = dict(d_model=32, d_ff=32, d_kv=8, num_heads=4, num_layers=1, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8)

FAMILY = PixArtSigma()
