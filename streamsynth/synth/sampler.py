"""The sampling loop: prompts and seeds in, images out, with classifier-free guidance.

It reads as the algorithm: encode text, draw each sample's initial noise from its own seed, denoise, decode, check.
Every sample's noise comes from its own generator and every layer treats batch rows independently, so an image
depends on its (prompt, seed) alone, never on the rest of the batch. That is what lets the stream assign work to
any worker and batch it any way while staying reproducible.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Callable

import torch

from ..seeding import derive_seed
from .config import GeneratorConfig, SynthesisConfig
from .feature_cache import FeatureCache
from .postprocess import resize_to_uint8

if TYPE_CHECKING:
    from .fast import FastPathOptions

log = logging.getLogger(__name__)


class Synthesizer:
    """Generates images for (prompt, seed) pairs with the components of a diffusers Stable Diffusion pipeline.

    Two steps may be swapped for fused ones (see `streamsynth.synth.fast`), each computing what it replaces:
    `fused_step(noise, t, latents, guidance_scale or None) -> latents` replaces `guided_step` (the guidance combine
    and `scheduler.step`), and `postprocess(decoded, size) -> uint8` replaces `resize_to_uint8`.
    """

    def __init__(self, pipe, config: SynthesisConfig | None = None, fused_step: Callable | None = None,
                 postprocess: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None):
        self.pipe = pipe
        self.config = config or SynthesisConfig()
        self.fused_step = fused_step
        self.postprocess = postprocess
        if self.config.safety_check and pipe.safety_checker is None:
            raise ValueError("safety_check=True needs a pipeline loaded with its safety checker")
        if pipe.unet.config.get("time_cond_proj_dim") is not None:
            # A distilled UNet that takes the guidance scale as an embedding (full LCM checkpoints) would run here
            # without it and give other images than diffusers, silently.
            raise ValueError("this UNet takes its guidance scale as an input (a full LCM checkpoint), which "
                             "streamsynth's sampler does not pass: use the base model with its LCM-LoRA "
                             "(--lora, --scheduler lcm) instead")
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        scale = pipe.vae_scale_factor
        self.height = self.config.height or pipe.unet.config.sample_size * scale
        self.width = self.config.width or pipe.unet.config.sample_size * scale
        if self.height % scale or self.width % scale:
            raise ValueError(f"height and width must be multiples of {scale}, got {self.height}x{self.width}")
        self._step_takes_generator = "generator" in inspect.signature(pipe.scheduler.step).parameters
        self._empty_prompt_embedding: torch.Tensor | None = None
        self.fast_path = None  # the FastPath `from_pipeline` switched on, if any
        # DeepCache across steps (off at interval 1); its full_rows/shallow_rows count the UNet rows evaluated.
        self.feature_cache = FeatureCache(pipe.unet, self.config.feature_cache_interval)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        scheduler: str | None = None,
        config: SynthesisConfig | None = None,
        fast: "FastPathOptions | None" = None,
        lora: str | None = None,
        decoder: str | None = None,
    ) -> "Synthesizer":
        """Load a pipeline with `from_pretrained` (with `lora` fused in and `decoder` as its VAE, see
        `load_pipeline`); with `fast`, switch the fast path's options on (see `fast.py`)."""
        from .loading import load_pipeline

        config = config or SynthesisConfig()
        pipe = load_pipeline(model, device, dtype, scheduler=scheduler, safety_checker=config.safety_check,
                             lora=lora, decoder=decoder)
        return cls.from_pipeline(pipe, config, fast)

    @classmethod
    def from_pipeline(cls, pipe, config: SynthesisConfig | None = None,
                      fast: "FastPathOptions | None" = None) -> "Synthesizer":
        """A Synthesizer on a loaded pipeline; with `fast`, the fast path switched on (what it did: `fast_path`)."""
        if fast is None:
            return cls(pipe, config)
        from .fast import apply

        fast_path = apply(pipe, fast)
        synth = cls(pipe, config, fused_step=fast_path.fused_step, postprocess=fast_path.postprocess)
        synth.fast_path = fast_path
        return synth

    @classmethod
    def from_config(cls, config: GeneratorConfig, device: str | torch.device) -> "Synthesizer":
        """The generator `config` describes, loaded on `device` (what each synthesis worker does once)."""
        return cls.from_pretrained(config.model, device=device, dtype=config.dtype, scheduler=config.scheduler,
                                   config=config.synthesis, fast=config.fast_path_on(device), lora=config.lora,
                                   decoder=config.decoder)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0].to(self.dtype)

    def empty_prompt_embedding(self) -> torch.Tensor:
        """The unconditional branch's text embedding, computed once."""
        if self._empty_prompt_embedding is None:
            self._empty_prompt_embedding = self.encode_text([""])
        return self._empty_prompt_embedding

    def initial_latents(self, seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each sample's starting noise from its own CPU generator, so it matches diffusers on any device."""
        from diffusers.utils.torch_utils import randn_tensor

        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        scale = self.pipe.vae_scale_factor
        shape = (len(seeds), self.pipe.unet.config.in_channels, self.height // scale, self.width // scale)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        return latents * self.pipe.scheduler.init_noise_sigma, generators

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, text: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Runs the scheduler's timesteps, which `set_timesteps` must have prepared."""
        unet, scheduler, scale = self.pipe.unet, self.pipe.scheduler, self.config.guidance_scale
        timesteps = scheduler.timesteps
        plan = [self.config.guided(i, len(timesteps)) for i in range(len(timesteps))]
        both = torch.cat([self.empty_prompt_embedding().expand_as(text), text]) if any(plan) else None
        for i, (t, guided) in enumerate(zip(timesteps, plan)):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            with self.feature_cache.step(i, len(model_input)):
                noise = unet(model_input, t, encoder_hidden_states=both if guided else text, return_dict=False)[0]
            if self.fused_step is not None:
                latents = self.fused_step(noise, t, latents, scale if guided else None)
            else:
                latents = self.guided_step(noise, t, latents, generators, guided)
        self.feature_cache.clear()
        return latents

    def guided_step(self, noise: torch.Tensor, t, latents: torch.Tensor,
                    generators: list[torch.Generator], guided: bool = True) -> torch.Tensor:
        """The classifier-free guidance combine (on a guided step), then the scheduler's update: what `fused_step`
        computes at once."""
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + self.config.guidance_scale * (cond - uncond)
        step_kwargs = {"generator": generators} if self._step_takes_generator else {}
        return self.pipe.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [-1, 1], as the VAE produces them."""
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    @torch.no_grad()
    def flagged(self, images: torch.Tensor) -> list[bool]:
        """Which images the pipeline's safety checker flags."""
        _, flags = self.pipe.run_safety_checker(images, self.device, self.dtype)
        return [bool(f) for f in flags]

    @torch.no_grad()
    def generate_decoded(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """VAE output in [-1, 1], shape (batch, 3, height, width), on the pipeline's device and in its dtype.

        With the safety check on, a flagged image is redrawn from `derive_seed(seed, attempt)` until it passes or
        `max_redraws` is spent (then it is replaced by black and logged); the redraw is a pure function of the
        sample too.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        images = self._draw(prompts, seeds)
        if self.config.safety_check:
            images = self._redraw_flagged(images, prompts, seeds)
        return images

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Images in [0, 1], shape (batch, 3, height, width), as diffusers' `output_type="pt"` gives them."""
        return (self.generate_decoded(prompts, seeds) / 2 + 0.5).clamp(0, 1)

    def generate_uint8(self, prompts: list[str], seeds: list[int], size: int | None) -> torch.Tensor:
        """uint8 images resized to `size` on the generator's device: what a classifier's loader takes."""
        decoded = self.generate_decoded(prompts, seeds)
        if self.postprocess is not None:
            return self.postprocess(decoded, size)
        return resize_to_uint8((decoded / 2 + 0.5).clamp(0, 1), size)

    def _draw(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        # Timesteps first: some schedulers' init_noise_sigma depends on them.
        self.pipe.scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        latents, generators = self.initial_latents(seeds)
        latents = self.denoise(latents, self.encode_text(prompts), generators)
        return self.decode(latents)

    def _redraw_flagged(self, images: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        pending = [i for i, flag in enumerate(self.flagged(images)) if flag]
        for attempt in range(1, self.config.max_redraws + 1):
            if not pending:
                return images
            redrawn = self._draw([prompts[i] for i in pending], [derive_seed(seeds[i], attempt) for i in pending])
            flags = self.flagged(redrawn)
            for row, i in enumerate(pending):
                images[i] = redrawn[row]
            pending = [i for i, flag in zip(pending, flags) if flag]
        for i in pending:
            log.warning("seed %d: still flagged after %d redraws; replaced by a black image", seeds[i], self.config.max_redraws)
            images[i] = -1.0
        return images
