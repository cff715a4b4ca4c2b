"""Loading a Stable Diffusion pipeline with diffusers' `from_pretrained`, from a hub id or a local folder."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from ..errors import StreamsynthError, one_line

log = logging.getLogger(__name__)

# The schedulers a user may name; each is built from the checkpoint's own scheduler config so betas and offsets match.
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    # Latent consistency sampling: 2-8 steps with guidance 1, for LCM-distilled weights (an LCM-LoRA in `lora`).
    "lcm": "LCMScheduler",
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


def loading_options() -> dict:
    """Keyword arguments for diffusers' `from_pretrained`: with accelerate (a dependency of streamsynth), diffusers'
    default, low-memory loading (no random initialisation of weights that are then overwritten); without it (an
    install made without dependencies), the plain loading diffusers falls back to anyway, asked for by name so that
    diffusers does not print its four-line warning in every synthesis worker at every start."""
    from diffusers.utils import is_accelerate_available

    return {} if is_accelerate_available() else {"low_cpu_mem_usage": False}


def _looks_local(source: str | os.PathLike) -> bool:
    """Whether `source` is meant as a local path rather than a hub id ("owner/name"; only loading can check one)."""
    path = Path(source)
    return path.is_absolute() or str(source).startswith((".", "~")) or path.exists() or str(source).count("/") > 1


# The components a Stable Diffusion pipeline cannot run without. A folder that lacks one loads all the same in some
# versions of diffusers and fails later in every synthesis call (no tokenizer/: "OverflowError: int too big to
# convert"), so their folders are checked before loading.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model_source(model: str | os.PathLike, provided: tuple[str, ...] = ()) -> None:
    """Fail early, with the fix, for a local path that cannot be a diffusers pipeline (hub ids are checked on load):
    missing, without model_index.json, or without the folder of a component it needs (`REQUIRED_COMPONENTS`, less
    those `provided` by the caller, e.g. "vae" when a tiny decoder replaces it)."""
    path = Path(model)
    if _looks_local(model):
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
        for name in REQUIRED_COMPONENTS:
            if name not in provided and not _has_files(path / name):
                raise ModelLoadError(
                    f"model folder {path} has no {name}/ folder (or an empty or unreadable one), a component Stable "
                    "Diffusion needs: copy the whole pipeline folder again, or save it with "
                    "pipeline.save_pretrained(folder)"
                )


def _has_files(folder: Path) -> bool:
    try:
        return any(entry.is_file() for entry in os.scandir(folder))
    except OSError:
        return False


def check_lora_source(lora: str | os.PathLike) -> None:
    """Fail early for a local LoRA path that does not exist (a name ending in a weights suffix is a file, not a hub
    id)."""
    path = Path(lora)
    if (_looks_local(lora) or path.suffix in (".safetensors", ".bin")) and not path.exists():
        raise ModelLoadError(
            f"LoRA {path} does not exist: give a .safetensors file, a folder with pytorch_lora_weights.safetensors "
            "(as save_lora_weights writes it) or a hub id such as latent-consistency/lcm-lora-sdv1-5"
        )


def check_decoder_source(decoder: str | os.PathLike) -> None:
    """Fail early for a local path that cannot be an AutoencoderTiny folder."""
    path = Path(decoder)
    if _looks_local(decoder):
        if not path.exists():
            raise ModelLoadError(
                f"tiny decoder folder {path} does not exist: give an AutoencoderTiny folder (one with config.json) or "
                "a hub id such as madebyollin/taesd"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers model folder (no config.json): save the decoder with "
                "AutoencoderTiny.save_pretrained(folder), or give a hub id such as madebyollin/taesd"
            )


def load_pipeline(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = None,
    safety_checker: bool = False,
    lora: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
):
    """A `StableDiffusionPipeline` on `device`, loaded with `from_pretrained`; components stay in eval mode.

    `lora` (an LCM-LoRA, say) is loaded with diffusers' `load_lora_weights` and fused into the weights, so sampling
    pays nothing for it per step. `decoder` is an `AutoencoderTiny` (TAESD) put in place of the model's VAE: its
    decoder is many times cheaper than the full VAE's, at some cost in detail.
    """
    from diffusers import StableDiffusionPipeline

    quiet_hf_progress()
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_model_source(model, provided=("vae",) if decoder is not None else ())
    kwargs = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    if decoder is not None:
        # Given to from_pretrained, the full VAE is never loaded.
        kwargs["vae"] = load_tiny_decoder(decoder, torch_dtype)
    try:
        # diffusers warns at every load that a given AutoencoderTiny is not the AutoencoderKL the pipeline's `vae` is
        # annotated with; the pipeline runs it as it is (diffusers' documentation swaps it in), so in every synthesis
        # worker that warning is noise.
        with _without_log_messages("Expected types for vae:", "diffusers.pipelines.pipeline_utils"):
            pipe = StableDiffusionPipeline.from_pretrained(str(model), dtype=torch_dtype, **kwargs,
                                                           **loading_options())
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
    pipe = pipe.to(device)
    if lora is not None:
        fuse_lora(pipe, lora)  # on the device: fusing is a matrix product per adapted layer
    return pipe


def load_tiny_decoder(decoder: str | os.PathLike, dtype: torch.dtype):
    """An `AutoencoderTiny` from a folder or hub id, in `dtype`."""
    from diffusers import AutoencoderTiny

    check_decoder_source(decoder)
    try:
        return AutoencoderTiny.from_pretrained(os.fspath(decoder), dtype=dtype, **loading_options())
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load the tiny decoder {os.fspath(decoder)!r} ({type(err).__name__}: {err}): give an "
            "AutoencoderTiny folder or a hub id in the local cache, such as madebyollin/taesd"
        ) from err


@contextlib.contextmanager
def _without_log_messages(prefix: str, *loggers: str):
    """Drops, for the duration, the records of `loggers` whose message starts with `prefix` (and only those)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    for name in loggers:
        logging.getLogger(name).addFilter(keep)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(keep)


def fuse_lora(pipe, lora: str | os.PathLike) -> None:
    """Loads the LoRA `lora` into `pipe` with `load_lora_weights`, fuses it into the weights and drops the adapter
    layers (diffusers' documented fuse-then-unload), so the UNet is plain modules again, as the fast path expects.
    A LoRA that adapts none of the pipeline's modules (made for another architecture) is an error, not a no-op."""
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
    from diffusers.utils import USE_PEFT_BACKEND
    from huggingface_hub import is_offline_mode

    source = os.fspath(lora)
    check_lora_source(source)
    if not USE_PEFT_BACKEND:
        raise ModelLoadError(f"loading the LoRA {source!r} needs peft, which diffusers loads LoRAs with: "
                             "pip install peft")
    # Offline, diffusers cannot list a hub repository to find its weights file: name the one it saves LoRAs as (what
    # LCM-LoRA's repositories hold), so a cached hub id loads.
    offline_hub_id = is_offline_mode() and not Path(source).exists()
    kwargs = {"weight_name": LORA_WEIGHT_NAME_SAFE} if offline_hub_id else {}
    try:
        # A LoRA for the UNet alone (LCM-LoRA) makes diffusers warn that the text encoder got no keys, in every
        # worker; a LoRA that adapts nothing at all is refused below.
        with _without_log_messages("No LoRA keys associated to", "diffusers.loaders.lora_base",
                                   "diffusers.loaders.peft"):
            pipe.load_lora_weights(source, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # the hub client's and peft's errors too: each means this LoRA cannot be used
        raise ModelLoadError(
            f"could not load the LoRA {source!r} ({type(err).__name__}: {one_line(err)}): give a LoRA for this "
            "model's architecture as a .safetensors file, a folder with pytorch_lora_weights.safetensors, or a hub "
            "id in the local cache"
        ) from err
    if not any(pipe.get_list_adapters().values()):
        raise ModelLoadError(
            f"the LoRA {source!r} adapts none of the model's layers: it was made for another architecture; give a "
            "LoRA trained for this model"
        )
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def scheduler_from_name(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: use one of {sorted(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def preload_pipeline_library() -> None:
    """Imports diffusers' pipeline class (and the transformers modules it imports) in this process, once: loader
    workers forked from it then only load the model's weights, instead of spending the import (about 8 s of CPU on a
    CPU core) in every worker at every start and restart. Workers started with spawn import anew."""
    try:
        import diffusers

        diffusers.StableDiffusionPipeline  # diffusers imports a class's module when it is first asked for
    except ImportError:  # the workers' own load says what is missing, as a worker error
        pass
