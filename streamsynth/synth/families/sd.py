"""Stable Diffusion 1.x and 2.x (and what shares their shape: SD-Turbo, LCM-LoRA'd checkpoints, the embedded digits
model): a UNet conditioned on one CLIP text encoder's last hidden states, DDPM-trained, an 8x AutoencoderKL.

As `StableDiffusionPipeline` samples: prompts padded and cut to the tokenizer's length (77 for CLIP), the
unconditional branch from the empty prompt, `scale_model_input` before each UNet call, the latents divided by the
VAE's scaling factor before decoding.
"""

from __future__ import annotations

import torch

from .base import Family, TextEncoder, tokenize


class StableDiffusion(Family):
    name = "SD1.x/2.x"
    key = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    tiny_decoder = "madebyollin/taesd"
    schedulers = ("pndm", "ddim", "euler", "euler-ancestral", "dpm++", "unipc", "lcm")
    has_safety_checker = True

    def load_options(self, index: dict, safety_checker: bool) -> dict:
        return {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}

    def check(self, pipe) -> None:
        if pipe.unet.config.get("time_cond_proj_dim") is not None:
            # A distilled UNet that takes the guidance scale as an embedding (full LCM checkpoints) would run here
            # without it and give other images than diffusers, silently.
            raise ValueError("this UNet takes its guidance scale as an input (a full LCM checkpoint), which "
                             "streamsynth's sampler does not pass: use the base model with its LCM-LoRA "
                             "(--lora, --scheduler lcm) instead")

    def text_encoders(self, pipe) -> list[TextEncoder]:
        return [TextEncoder("CLIP", pipe.tokenizer.model_max_length)]

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str]) -> torch.Tensor:
        tokenizer, denoiser = pipe.tokenizer, pipe.unet
        ids = tokenize(tokenizer, prompts, tokenizer.model_max_length, self.name, "CLIP").input_ids
        return pipe.text_encoder(ids.to(denoiser.device))[0].to(denoiser.dtype)

    def predict(self, pipe, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return pipe.unet(latents, t, encoder_hidden_states=text, return_dict=False)[0]

    def build_random(self, size: str, device: torch.device):
        """Tiny: `streamsynth.synth.tiny`'s SD1.5-class model without safety checker; native: SD1.5 (`sd15`). Both
        seed themselves: with the seed `random_pipeline` set."""
        from ..sd15 import build_random_sd15
        from ..tiny import build_tiny_pipeline

        if size == "tiny":
            return build_tiny_pipeline(with_safety_checker=False, seed=torch.initial_seed()).to(device)
        return build_random_sd15(device, torch.initial_seed())


FAMILY = StableDiffusion()
