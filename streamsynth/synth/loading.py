"""Loading a Stable Diffusion pipeline with diffusers' `from_pretrained`, from a hub id or a local folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import StreamsynthError

log = logging.getLogger(__name__)

# The schedulers a user may name; each is built from the checkpoint's own scheduler config so betas and offsets match.
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(StreamsynthError, RuntimeError):
    """A model path or hub id could not be loaded; the message says what to give instead."""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the reference recipe), fp32 elsewhere, unless the user names one."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def quiet_hf_progress() -> None:
    """diffusers and transformers draw a progress bar per component load; one per worker per load is noise."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def check_model_source(model: str | os.PathLike) -> None:
    """Fail early, with the fix, for a local path that cannot be a diffusers pipeline (hub ids are checked on load)."""
    path = Path(model)
    looks_local = path.is_absolute() or str(model).startswith((".", "~")) or path.exists() or str(model).count("/") > 1
    if looks_local:
        if not path.exists():
            raise ModelLoadError(
                f"model folder {path} does not exist: give a diffusers folder (one with model_index.json) or a hub "
                "id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
            )
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers pipeline folder (no model_index.json): save one with "
                "pipeline.save_pretrained(folder), or convert a single-file checkpoint with "
                "StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)"
            )


def load_pipeline(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = None,
    safety_checker: bool = False,
):
    """A `StableDiffusionPipeline` on `device`, loaded with `from_pretrained`; components stay in eval mode."""
    from diffusers import StableDiffusionPipeline

    quiet_hf_progress()
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_model_source(model)
    kwargs = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(model), dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not load Stable Diffusion from {model!r}: {err}\n"
            "Give a local diffusers folder, or a hub id whose weights are in the local cache (this machine may have "
            "no network; set HF_HUB_OFFLINE=1 to use the cache only)."
        ) from err
    if safety_checker and pipe.safety_checker is None:
        raise ModelLoadError(
            f"{model} has no safety checker but the safety check was asked for: add one to the pipeline folder "
            "or turn the safety check off"
        )
    if scheduler is not None:
        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def scheduler_from_name(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: use one of {sorted(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)
