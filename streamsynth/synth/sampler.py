"""The sampling loop: prompts and seeds in, images out, with classifier-free guidance; one loop for every family.

It reads as the algorithm: encode text, draw each sample's initial noise from its own seed, denoise, decode, check.
Every sample's noise comes from its own generator and every layer treats batch rows independently, so an image
depends on its (prompt, seed) alone, never on the rest of the batch. That is what lets the stream assign work to
any worker and batch it any way while staying reproducible. What differs between families of models (how text is
encoded, how the denoiser is called, how latents are decoded) is the family's (`streamsynth.synth.families`).
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Callable

import torch

from ..seeding import derive_seed
from .config import GeneratorConfig, SynthesisConfig
from .families import Conditioning, family_of_pipeline
from .feature_cache import FeatureCache
from .loading import check_family_options
from .postprocess import resize_to_uint8

if TYPE_CHECKING:
    from .fast import FastPathOptions

log = logging.getLogger(__name__)


class Synthesizer:
    """Generates images for (prompt, seed) pairs with the components of a diffusers text-to-image pipeline of any
    supported family (`family`).

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
        self.family = family_of_pipeline(pipe)
        if self.config.safety_check and getattr(pipe, "safety_checker", None) is None:
            raise ValueError("safety_check=True needs a pipeline loaded with its safety checker")
        self.family.check(pipe)
        check_family_options(self.family, feature_cache_interval=self.config.feature_cache_interval)
        denoiser = self.family.denoiser(pipe)
        self.device = denoiser.device
        self.dtype = denoiser.dtype
        size, multiple = self.family.native_size(pipe), self.family.size_multiple(pipe)
        self.height = self.config.height or size
        self.width = self.config.width or size
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {self.height}x{self.width}")
        self._step_takes_generator = "generator" in inspect.signature(pipe.scheduler.step).parameters
        self._empty_prompt_embedding: Conditioning | None = None
        self.fast_path = None  # the FastPath `from_pipeline` switched on, if any
        # DeepCache across steps (off at interval 1); its full_rows/shallow_rows count the denoiser rows evaluated.
        self.feature_cache = FeatureCache(denoiser, self.config.feature_cache_interval)

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
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """The denoiser's text inputs for `prompts` (a tensor, or a mapping of tensors, one row per prompt)."""
        return self.family.encode(self.pipe, prompts)

    def empty_prompt_embedding(self) -> Conditioning:
        """The unconditional branch's text inputs, computed once."""
        if self._empty_prompt_embedding is None:
            self._empty_prompt_embedding = self.family.encode_unconditional(self.pipe)
        return self._empty_prompt_embedding

    def initial_latents(self, seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each sample's starting noise from its own CPU generator, so it matches diffusers on any device."""
        from diffusers.utils.torch_utils import randn_tensor

        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (len(seeds), self.family.denoiser(self.pipe).config.in_channels, *self.latent_size)
        latents = randn_tensor(shape, generator=generators, device=self.device,
                               dtype=self.family.latent_dtype(self.pipe))
        if self.family.sigma_scaled_inputs:
            latents = latents * self.pipe.scheduler.init_noise_sigma
        return latents, generators

    @property
    def latent_size(self) -> tuple[int, int]:
        scale = self.pipe.vae_scale_factor
        return self.height // scale, self.width // scale

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, text: Conditioning, generators: list[torch.Generator]) -> torch.Tensor:
        """Runs the scheduler's timesteps, which `set_timesteps` must have prepared."""
        scheduler, scale, family = self.pipe.scheduler, self.config.guidance_scale, self.family
        timesteps = scheduler.timesteps
        plan = [self.config.guided(i, len(timesteps)) for i in range(len(timesteps))]
        both = _guidance_rows(self.empty_prompt_embedding(), text) if any(plan) else None
        latent_size = tuple(latents.shape[-2:])
        text = family.step_inputs(self.pipe, text, latent_size)
        both = family.step_inputs(self.pipe, both, latent_size) if both is not None else None
        for i, (t, guided) in enumerate(zip(timesteps, plan)):
            model_input = torch.cat([latents] * 2) if guided else latents
            if family.sigma_scaled_inputs:
                model_input = scheduler.scale_model_input(model_input, t)
            with self.feature_cache.step(i, len(model_input)):
                noise = family.predict(self.pipe, model_input, t, both if guided else text)
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
        return self.family.decode(self.pipe, latents)

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
        self.family.set_timesteps(self.pipe, self.config.num_inference_steps, self.device, self.latent_size)
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


def _guidance_rows(unconditional: Conditioning, conditional: Conditioning) -> Conditioning:
    """A guided step's text inputs: the unconditional row repeated for each sample, above the conditional rows."""
    if isinstance(conditional, torch.Tensor):
        return torch.cat([unconditional.expand_as(conditional), conditional])
    return {name: _guidance_rows(unconditional[name], rows) for name, rows in conditional.items()}
