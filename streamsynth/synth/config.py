"""The generator's settings as frozen data: what each synthesis worker builds its `Synthesizer` from.

`SynthesisConfig` holds the knobs of one sampling run (steps, guidance, resolution, safety check);
`GeneratorConfig` adds which model, where, in which precision and with which fast-path options. Both are frozen and
picklable, so a config crosses into spawned workers as it is and no worker can change it under another.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from .fast import FastPathOptions
from .loading import check_decoder_source, check_family_options, check_lora_source, check_model_source
from .tiny import has_random_weights


@dataclass(frozen=True)
class SynthesisConfig:
    """The knobs of one sampling run; defaults follow the reference recipe."""

    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    height: int | None = None  # None: the model's native size (512 for SD1.5)
    width: int | None = None
    safety_check: bool = False
    max_redraws: int = 8
    # Limited-interval guidance (Kynkäänniemi et al., NeurIPS 2024): classifier-free guidance only on the steps
    # whose position in the schedule, as a fraction in [0, 1), lies in [start, stop); elsewhere one conditional
    # pass per step. (0, 1) guides every step, as the reference recipe does. The paper states its interval in noise
    # levels; a fraction of the steps is the same idea on any scheduler and is how diffusers' guiders state it.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # DeepCache (Ma et al., CVPR 2024; see `streamsynth.synth.feature_cache`): the full UNet on steps i with
    # i % N == 0 and only its shallow path, fed with the deep feature kept from the last full step, in between.
    # 1 runs the full UNet on every step (off).
    feature_cache_interval: int = 1

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be non-negative, got {self.guidance_scale}")
        object.__setattr__(self, "guidance_interval", tuple(float(f) for f in self.guidance_interval))
        start, stop = self.guidance_interval if len(self.guidance_interval) == 2 else (1.0, 0.0)
        if not 0.0 <= start < stop <= 1.0:
            raise ValueError(f"guidance_interval must be (start, stop) with 0 <= start < stop <= 1 (fractions of the "
                             f"steps), got {self.guidance_interval}")
        if not isinstance(self.feature_cache_interval, int) or self.feature_cache_interval < 1:
            raise ValueError(f"feature_cache_interval must be an integer of at least 1 (1 switches the cache off), "
                             f"got {self.feature_cache_interval!r}")

    def guided(self, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` runs classifier-free guidance (a scale of 1 or less never does, as in
        diffusers)."""
        start, stop = self.guidance_interval
        return self.guidance_scale > 1.0 and start <= step / steps < stop


@dataclass(frozen=True)
class GeneratorConfig:
    """Which text-to-image model makes the images, where, and how they come out.

    Args:
        model: a hub id or diffusers folder of a supported family (`streamsynth.synth.families`), loaded with
            `from_pretrained` once per worker (a local folder is checked here, its family and the options it takes
            too, so a wrong one fails in the trainer, not in every worker).
        synthesis: steps, guidance scale, resolution and safety check.
        image_size: side of the square uint8 images handed out (resized on the generator's device); None keeps
            the model's resolution.
        devices: where workers generate. None (default): each rank's own GPU (cuda:LOCAL_RANK), else the CPU; a
            list is split among a node's ranks when it has a device for each, and a rank's worker w uses its
            share's device w mod n (`streamsynth.stream.devices`).
        dtype: "fp16", "bf16" or "fp32"; default fp16 on CUDA, fp32 on the CPU.
        scheduler: a scheduler name (see `streamsynth.synth.loading.SCHEDULERS`) that fits the model's family;
            default: the model's own.
        batch_size: images per denoiser batch in a worker (a generation group is made in chunks of this size).
        fast: fast-path options (Triton kernels, fused guidance step, attention backend, compile); None runs the
            plain diffusers components; "auto" (default) the default options on a CUDA device and none elsewhere,
            decided by each worker for its own device (measured faster on GPUs, images equal within rounding).
        lora: a LoRA (a .safetensors file, a folder as `save_lora_weights` writes it, or a hub id) fused into the
            model's weights at load, e.g. an LCM-LoRA for 4-step sampling with scheduler "lcm" and guidance 1.
        decoder: an `AutoencoderTiny` (TAESD) folder or hub id that decodes in place of the model's VAE, much
            cheaper per image at some cost in detail.
    """

    model: str
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    image_size: int | None = 224
    devices: tuple[str, ...] | None = None
    dtype: str | None = None
    scheduler: str | None = None
    batch_size: int = 8
    fast: FastPathOptions | str | None = "auto"
    lora: str | None = None
    decoder: str | None = None

    def __post_init__(self) -> None:
        family = check_model_source(self.model, provided=("vae",) if self.decoder is not None else ())
        # Normalise what callers may pass as a path or a list, so that equal configs compare and pickle equal.
        object.__setattr__(self, "model", os.fspath(self.model))
        for name, check in (("lora", check_lora_source), ("decoder", check_decoder_source)):
            if getattr(self, name) is not None:
                check(getattr(self, name))
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(str(d) for d in self.devices) or None)
        if self.batch_size < 1:
            raise ValueError(f"the generator's batch_size must be at least 1, got {self.batch_size}")
        if isinstance(self.fast, str) and self.fast != "auto":
            raise ValueError(f"fast must be FastPathOptions, None or \"auto\", got {self.fast!r}")
        if family is not None:  # a hub id's family is known once a worker loads it
            check_family_options(family, self.scheduler, self.synthesis.safety_check, self.decoder,
                                 self.synthesis.feature_cache_interval)
        compiled = isinstance(self.fast, FastPathOptions) and (self.fast.compile_unet or self.fast.cuda_graphs)
        if compiled and self.synthesis.feature_cache_interval > 1:
            # The cache swaps the deep blocks' forward between calls, which a compiled graph does not see (and
            # CUDA graphs reuse the memory the cached features live in).
            raise ValueError("feature_cache_interval > 1 does not combine with a compiled UNet (compile_unet, "
                             "cuda_graphs): drop one of them")

    # Fields that say where the images are made, not what they are: left out of `identity`.
    PLACEMENT_FIELDS = ("devices",)

    @property
    def uses_cuda(self) -> bool:
        if self.devices is None:
            return torch.cuda.is_available()
        return any(d.startswith("cuda") for d in self.devices)

    def fast_path_on(self, device: str | torch.device) -> FastPathOptions | None:
        """The fast-path options a worker on `device` switches on ("auto": the defaults on CUDA, none elsewhere)."""
        if self.fast == "auto":
            return FastPathOptions() if torch.device(device).type == "cuda" else None
        return self.fast

    def identity(self) -> dict:
        """Every setting that changes what the images are, as JSON-ready data (for manifests and resume checks): all
        fields but `PLACEMENT_FIELDS`, so a new field can never escape a check."""
        data = asdict(self)
        for name in self.PLACEMENT_FIELDS:
            data.pop(name)
        return data

    @property
    def random_weights(self) -> bool:
        """True when the model, or the tiny decoder put in its VAE's place, is one streamsynth built with random
        weights (its images are noise)."""
        return any(has_random_weights(folder) for folder in (self.model, self.decoder) if folder is not None)
