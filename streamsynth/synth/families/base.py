"""What sets one family of text-to-image models apart: the part of sampling the one loop (`Synthesizer`) leaves to it.

The loop is the same for every family: each sample's noise from its own seed, classifier-free guidance on the steps
`SynthesisConfig.guided` names, the scheduler's update, decoding, post-processing. A `Family` says how prompts become
the denoiser's text inputs (and how many tokens each encoder reads), which timesteps the scheduler is set to, how the
denoiser is called on a batch of latents, and how latents become images, each as its diffusers pipeline does it, op
for op, so that the images are that pipeline's for the same prompts and seeds.

Text inputs (`Conditioning`) are a tensor or a mapping of tensors, batch rows first; the loop stacks the
unconditional rows above the conditional ones for a guided step, so nothing in a family depends on guidance.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Mapping, Union

import torch

log = logging.getLogger(__name__)

Conditioning = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class TextEncoder:
    """One of a family's text encoders as users meet it: its kind and how many tokens of a prompt it reads."""

    kind: str  # "CLIP", "OpenCLIP", "T5", "Gemma 2"
    tokens: int

    def __str__(self) -> str:
        return f"{self.kind} ({self.tokens} tokens)"


class Family:
    """A family of diffusers text-to-image pipelines, and what sampling from it takes (see the module docstring).

    A subclass fills in the class attributes and the methods that raise `NotImplementedError`; its module, in this
    package, names an instance `FAMILY`, which the registry (`streamsynth.synth.families`) finds by itself.
    """

    name: str  # as users read it: "SDXL"
    key: str  # a short id: "sdxl" (random-weight model folders and benchmarks are named by it)
    pipeline_classes: tuple[str, ...]  # the `_class_name`s in model_index.json this family samples
    denoiser_attribute = "unet"  # the pipeline's component that denoises: "unet" or "transformer"
    # Scheduler names (`streamsynth.synth.loading.SCHEDULERS`) that fit the way the family was trained; its own
    # scheduler (no name given) always does.
    schedulers: tuple[str, ...] = ()
    # DDPM-trained families scale the initial noise by `init_noise_sigma` and the denoiser's input with
    # `scale_model_input`, as their diffusers pipelines do; flow-matching pipelines call neither.
    sigma_scaled_inputs = True
    # The AutoencoderTiny (TAESD) that decodes the family's latents in place of its VAE (a hub id, for messages), or
    # None where none does.
    tiny_decoder: str | None = None
    has_safety_checker = False
    # Options of the diffusers pipeline's __call__ under which it samples what this family's loop samples: the
    # documented differences (each family's module docstring says why), for the tests and benchmarks that compare.
    reference_call_options: dict = {}

    # ----- loading --------------------------------------------------------------------------------------------------

    def load_options(self, index: dict, safety_checker: bool) -> dict:
        """Extra keyword arguments for the pipeline's `from_pretrained` of a checkpoint whose model_index.json is
        `index`."""
        return {}

    def check(self, pipe) -> None:
        """Raises ValueError, in one line with the fix, for a checkpoint of this family the loop cannot sample."""

    # ----- shapes ---------------------------------------------------------------------------------------------------

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attribute)

    @property
    def uses_unet(self) -> bool:
        return self.denoiser_attribute == "unet"

    def native_size(self, pipe) -> int:
        """The side in pixels the model was trained at: its denoiser's sample size in latents, times the VAE's
        factor."""
        return self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    def size_multiple(self, pipe) -> int:
        """Height and width must be multiples of this: the VAE's factor (times the transformer's patch size)."""
        return pipe.vae_scale_factor * self.denoiser(pipe).config.get("patch_size", 1)

    def latent_dtype(self, pipe) -> torch.dtype:
        return self.denoiser(pipe).dtype

    # ----- text -----------------------------------------------------------------------------------------------------

    def text_encoders(self, pipe) -> list[TextEncoder]:
        """The encoders a prompt goes through, with their token budgets (what the docs' family table lists)."""
        raise NotImplementedError

    def encode(self, pipe, prompts: list[str]) -> Conditioning:
        """The denoiser's text inputs for `prompts`, one row each."""
        raise NotImplementedError

    def encode_unconditional(self, pipe) -> Conditioning:
        """The unconditional branch's text inputs, one row (the loop repeats it for each sample)."""
        return self.encode(pipe, [""])

    # ----- denoising ------------------------------------------------------------------------------------------------

    def set_timesteps(self, pipe, steps: int, device: torch.device, latent_size: tuple[int, int]) -> None:
        """Prepares the scheduler's timesteps for latents of `latent_size` (height, width)."""
        pipe.scheduler.set_timesteps(steps, device=device)

    def step_inputs(self, pipe, text: Conditioning, latent_size: tuple[int, int]) -> Conditioning:
        """`text` and whatever else the denoiser takes that stays the same over one batch's steps (SDXL's time ids),
        made once per batch rather than at every step: what `predict` receives."""
        return text

    def predict(self, pipe, latents: torch.Tensor, t: torch.Tensor, text: Conditioning) -> torch.Tensor:
        """The denoiser's prediction on a batch of (scheduler-scaled) latents at timestep `t`, in the space the
        scheduler's `step` takes."""
        raise NotImplementedError

    # ----- decoding -------------------------------------------------------------------------------------------------

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [-1, 1], as the VAE produces them."""
        vae = pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    # ----- random weights -------------------------------------------------------------------------------------------

    def random_pipeline(self, size: str, device: str | torch.device = "cpu", seed: int = 0):
        """A pipeline of this family with random weights drawn from `seed`, in eval mode as `from_pretrained` loads
        one (T5's dropout would otherwise draw at every call): `size` "tiny" (a few MB, for tests and CPU
        benchmarks) or "native" (the released architecture at full size, for timing on a GPU; build it there)."""
        if size not in ("tiny", "native"):
            raise ValueError(f"unknown model size {size!r}: use tiny or native")
        torch.manual_seed(seed)
        pipe = self.build_random(size, torch.device(device))
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipe

    def build_random(self, size: str, device: torch.device):
        """The pipeline `random_pipeline` returns, its modules built on `device` (`size`: "tiny" or "native")."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"


# ----- what several families share ----------------------------------------------------------------------------------

_reported_cuts: set[tuple[str, str]] = set()


def tokenize(tokenizer, prompts: list[str], max_length: int, family: str, encoder: str,
             attention_mask: bool = False, prefix: str = ""):
    """Token ids (and the attention mask, if asked) of `prompts` (each after `prefix`, an instruction the family puts
    before every prompt), padded to `max_length` and cut there, as diffusers' pipelines tokenize. A cut prompt is
    logged as a warning the first time this process cuts one for `encoder` of `family` (each synthesis worker says
    it once), at debug level after that."""
    texts = [prefix + prompt for prompt in prompts]
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                       return_attention_mask=attention_mask, return_tensors="pt")
    lengths = [len(ids) for ids in tokenizer(texts).input_ids]
    longest = max(lengths, default=0)
    if longest > max_length:
        prefix_tokens = len(tokenizer(prefix).input_ids) if prefix else 0
        first = (family, encoder) not in _reported_cuts
        _reported_cuts.add((family, encoder))
        log.log(logging.WARNING if first else logging.DEBUG,
                "%s reads %d tokens of a prompt with its %s encoder; a prompt of %d tokens was cut to them%s: %r",
                family, max_length - prefix_tokens, encoder, longest - prefix_tokens,
                " (further cuts are logged at debug level)" if first else "", prompts[lengths.index(longest)])
    return tokens


def call_default(pipe, argument: str):
    """The default of an argument of the pipeline's `__call__` (a token budget, an instruction prefix): read from
    diffusers itself, so a sample follows the pipeline's own defaults."""
    return _call_defaults(type(pipe))[argument]


@functools.cache
def _call_defaults(pipeline_class: type) -> dict:
    """Read once per pipeline class: `encode` asks for them for every batch."""
    return {name: p.default for name, p in inspect.signature(pipeline_class.__call__).parameters.items()}


def clip_hidden_states(tokenizer, text_encoder, prompts: list[str], max_length: int, family: str,
                       encoder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, first output) of a CLIP text encoder, as SDXL and SD3 read it: the first output
    is the pooled projection of a `CLIPTextModelWithProjection` (the last hidden state of a plain `CLIPTextModel`)."""
    ids = tokenize(tokenizer, prompts, max_length, family, encoder).input_ids
    output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    return output.hidden_states[-2], output[0]


def masked_states(pipe, prompts: list[str], max_length: int, family: str, encoder: str,
                  prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states in the encoder's dtype, attention mask) of the pipeline's one text encoder (T5, Gemma) for the
    prompts lower-cased and stripped, as PixArt-Σ and Sana read them."""
    text_encoder = pipe.text_encoder
    prompts = [prompt.lower().strip() for prompt in prompts]
    tokens = tokenize(pipe.tokenizer, prompts, max_length, family, encoder, attention_mask=True, prefix=prefix)
    mask = tokens.attention_mask.to(text_encoder.device)
    states = text_encoder(tokens.input_ids.to(text_encoder.device), attention_mask=mask)[0]
    return states.to(text_encoder.dtype), mask


def noise_half(transformer, output: torch.Tensor) -> torch.Tensor:
    """A transformer's noise prediction: the first half of its output channels where it also predicts a learned
    variance (the scheduler takes the noise only)."""
    if transformer.config.out_channels // 2 == transformer.config.in_channels:
        return output.chunk(2, dim=1)[0]
    return output
