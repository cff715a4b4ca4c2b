"""Loading a text-to-image pipeline with diffusers' `from_pretrained`, from a hub id or a local folder: its family
(`streamsynth.synth.families`) is the one its model_index.json names."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import StreamsynthError, one_line
from .families import Family, family_of, supported_families

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


# A folder that lacks a component its model_index.json names loads all the same in some versions of diffusers and
# fails later in every synthesis call (no tokenizer/: "OverflowError: int too big to convert"), so the folders are
# checked before loading. These are the ones a pipeline loads without (streamsynth passes no safety checker unless
# asked, and no image encoder).
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def check_model_source(model: str | os.PathLike, provided: tuple[str, ...] = ()) -> Family | None:
    """Fail early, with the fix, for a local path that cannot be a diffusers pipeline (hub ids are checked on load):
    missing, without model_index.json, of a family streamsynth does not sample, or without the folder of a component
    it needs (`required_components`, less those `provided` by the caller, e.g. "vae" when a tiny decoder replaces
    it). Returns a local folder's family; None for a hub id (its family is known once it is loaded)."""
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
        index = model_index(model)
        family = model_family(model, index)  # an unsupported family is refused here, in the trainer, not in workers
        for name in required_components(index, provided):
            if not _has_files(path / name):
                raise ModelLoadError(
                    f"model folder {path} has no {name}/ folder (or an empty or unreadable one), a component its "
                    "model_index.json names: copy the whole pipeline folder again, or save it with "
                    "pipeline.save_pretrained(folder)"
                )
        return family
    return None


def required_components(index: dict, provided: tuple[str, ...] = ()) -> list[str]:
    """The components a pipeline's model_index.json names that loading needs a folder for: every one it lists with a
    class, less the optional ones (`OPTIONAL_COMPONENTS`) and those the caller `provided`."""
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2 and value[0]
            and name not in OPTIONAL_COMPONENTS and name not in provided]


def _has_files(folder: Path) -> bool:
    try:
        return any(entry.is_file() for entry in os.scandir(folder))
    except OSError:
        return False


def model_index(model: str | os.PathLike) -> dict:
    """A model's model_index.json (its pipeline class and components): read from a local folder, or from the hub's
    copy (the local cache when offline)."""
    path = Path(model) / "model_index.json"
    if path.is_file():
        try:
            index = json.loads(path.read_text())
        except ValueError as err:
            raise ModelLoadError(f"{path} is damaged ({err}): save the pipeline again with save_pretrained") from err
    else:
        from diffusers import DiffusionPipeline

        try:
            index = dict(DiffusionPipeline.load_config(os.fspath(model)))
        except OSError as err:
            raise ModelLoadError(
                f"could not read the model_index.json of {os.fspath(model)!r}: {one_line(err)}; give a local "
                "diffusers folder, or a hub id whose files are in the local cache (set HF_HUB_OFFLINE=1 to use the "
                "cache only)"
            ) from err
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ModelLoadError(f"the model_index.json of {os.fspath(model)} names no pipeline class (_class_name): save "
                             "the pipeline again with save_pretrained")
    return index


def pipeline_class(model: str | os.PathLike) -> str:
    """The diffusers pipeline class name a model's model_index.json gives."""
    return model_index(model)["_class_name"]


def model_family(model: str | os.PathLike, index: dict | None = None) -> Family:
    """The family a model belongs to, by the pipeline class its model_index.json (`index`, read if not given)
    names; any other is refused in one line that names the supported ones."""
    name = (index or model_index(model))["_class_name"]
    family = family_of(name)
    if family is None:
        raise ModelLoadError(f"{os.fspath(model)} is a {name}, which streamsynth does not sample: give a model of a "
                             f"supported family: {supported_families()}")
    return family


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
    """The diffusers pipeline of `model`'s family on `device`, loaded with `from_pretrained`; components stay in eval
    mode.

    `lora` (an LCM-LoRA, say) is loaded with diffusers' `load_lora_weights` and fused into the weights, so sampling
    pays nothing for it per step. `decoder` is an `AutoencoderTiny` (TAESD) put in place of the model's VAE: its
    decoder is many times cheaper than the full VAE's, at some cost in detail.
    """
    import diffusers

    quiet_hf_progress()
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    family = check_model_source(model, provided=("vae",) if decoder is not None else ())
    index = model_index(model)
    family = family or model_family(model, index)
    check_family_options(family, scheduler, safety_checker, decoder)
    kwargs = family.load_options(index, safety_checker)
    if decoder is not None:
        # Given to from_pretrained, the full VAE is never loaded.
        kwargs["vae"] = load_tiny_decoder(decoder, torch_dtype)
    try:
        # diffusers warns at every load that a given AutoencoderTiny is not the AutoencoderKL the pipeline's `vae` is
        # annotated with; the pipeline runs it as it is (diffusers' documentation swaps it in), so in every synthesis
        # worker that warning is noise.
        with _without_log_messages("Expected types for vae:", "diffusers.pipelines.pipeline_utils"):
            pipe = getattr(diffusers, index["_class_name"]).from_pretrained(
                os.fspath(model), dtype=torch_dtype, **kwargs, **loading_options())
    except OSError as err:
        raise ModelLoadError(
            f"could not load {family.name} from {os.fspath(model)!r}: {err}\n"
            "Give a local diffusers folder, or a hub id whose weights are in the local cache (this machine may have "
            "no network; set HF_HUB_OFFLINE=1 to use the cache only)."
        ) from err
    if safety_checker and pipe.safety_checker is None:
        raise ModelLoadError(
            f"{model} has no safety checker but the safety check was asked for: add one to the pipeline folder "
            "or turn the safety check off"
        )
    if decoder is not None:
        _check_decoder_fits(pipe, family, decoder)
    if scheduler is not None:
        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if lora is not None:
        if not hasattr(pipe, "load_lora_weights"):
            raise ModelLoadError(f"diffusers loads no LoRA into {family.name} pipelines: drop the LoRA")
        fuse_lora(pipe, lora)  # on the device: fusing is a matrix product per adapted layer
    return pipe


def check_family_options(family: Family, scheduler: str | None = None, safety_checker: bool = False,
                         decoder: str | os.PathLike | None = None, feature_cache_interval: int = 1) -> None:
    """Refuses, in one line with the fix, an option the family has no part for: a scheduler that does not fit its
    training (ValueError, as an unknown scheduler), a safety checker, a tiny decoder, DeepCache without a UNet."""
    if scheduler is not None:
        check_scheduler(scheduler, family)
    if safety_checker and not family.has_safety_checker:
        raise ModelLoadError(f"{family.name} pipelines have no safety checker: turn the safety check off")
    if decoder is not None and family.tiny_decoder is None:
        raise ModelLoadError(f"no tiny decoder (AutoencoderTiny) decodes {family.name}'s latents: drop the decoder")
    if feature_cache_interval > 1 and not family.uses_unet:
        raise ValueError(f"feature_cache_interval > 1 (DeepCache) skips a UNet's deep blocks; {family.name} denoises "
                         "with a transformer: use 1")


def _check_decoder_fits(pipe, family: Family, decoder: str | os.PathLike) -> None:
    channels = family.denoiser(pipe).config.in_channels
    if pipe.vae.config.latent_channels != channels:
        raise ModelLoadError(
            f"the tiny decoder {os.fspath(decoder)} decodes {pipe.vae.config.latent_channels}-channel latents, "
            f"{family.name} makes {channels}-channel ones: give the tiny decoder made for it, {family.tiny_decoder}"
        )


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


def check_scheduler(name: str, family: Family) -> None:
    """A scheduler name must be known, and fit the way the family was trained (a flow-matching model takes its own)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: use one of {sorted(SCHEDULERS)}")
    if name not in family.schedulers:
        fits = f"one of {list(family.schedulers)} or" if family.schedulers else "only"
        raise ValueError(f"scheduler {name!r} does not fit {family.name}: give it {fits} its own (no scheduler)")


def preload_pipeline_library(model: str | os.PathLike) -> None:
    """Imports the diffusers pipeline class of `model` (and the transformers modules it imports) in this process,
    once: loader workers forked from it then only load the model's weights, instead of spending the import (about
    8 s of CPU on a CPU core) in every worker at every start and restart. Workers started with spawn import anew."""
    try:
        import diffusers

        getattr(diffusers, pipeline_class(model))  # diffusers imports a class's module when it is first asked for
    except (ImportError, AttributeError, ModelLoadError):  # the workers' own load says what is wrong, as a worker error
        pass
