"""A tiny, randomly initialised Stable Diffusion with the component classes of SD1.5 (or of SD2.1, SD-Turbo's class).

No weights can be downloaded where streamsynth is developed and tested, so the tests and the speed benchmarks use
this model where any generator will do (the embedded default is the trained digits model,
`streamsynth.digits.model`). It is saved with `save_pretrained` and always loaded back with `from_pretrained`,
the path a real checkpoint takes. Its images are noise-like: it exercises the machinery, it does not draw.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

RANDOM_WEIGHTS_NOTICE = (
    "the generator has RANDOM WEIGHTS (a model streamsynth built for tests or benchmarks): its images are noise and a "
    "classifier trained on them learns nothing real. Point --sd-model at a real checkpoint (a hub id such as "
    "stable-diffusion-v1-5/stable-diffusion-v1-5 or a local diffusers folder) and --captions at a real caption store."
)
TINY_MODEL_VERSION = "tiny-sd-v2"
# Written into every model folder streamsynth fills with random weights, so that any later use can say so.
RANDOM_WEIGHTS_MARKER = "streamsynth_random_weights.json"


def mark_random_weights(folder: str | os.PathLike, architecture: str) -> None:
    (Path(folder) / RANDOM_WEIGHTS_MARKER).write_text(
        json.dumps({"architecture": architecture, "random_weights": True})
    )


def _marker(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / RANDOM_WEIGHTS_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def has_random_weights(folder: str | os.PathLike) -> bool:
    """True for a model folder streamsynth built with random weights (the tiny model, the SD1.5 architecture)."""
    marker = _marker(folder)
    return bool(marker and marker["random_weights"])


def cache_dir() -> Path:
    """Where streamsynth keeps what it builds once: $STREAMSYNTH_CACHE, else $XDG_CACHE_HOME/streamsynth."""
    if os.environ.get("STREAMSYNTH_CACHE"):
        return Path(os.environ["STREAMSYNTH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamsynth"


def character_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """A character-level CLIP tokenizer: CLIP's byte alphabet with no merges, so it needs no downloaded vocabulary.
    It pads with `pad_token`: CLIP's end-of-text token, as SD1.5's tokenizer does, or "!", as SD2's OpenCLIP one does.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                              pad_token=pad_token)
    return tokenizer


# The characters the tiny T5 and Gemma vocabularies spell words with; anything else is T5's <unk>, or Gemma's bytes.
_CHARACTERS = [chr(c) for c in range(33, 127)]


def character_t5_tokenizer(max_length: int = 512):
    """A character-level T5 tokenizer (a unigram model over single characters, with and without the word-start
    mark), built in memory: T5's special tokens at T5's ids (pad 0, end 1, unknown 2), nothing downloaded."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -2.5) for c in _CHARACTERS] + [(c, -3.0) for c in _CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def character_gemma_tokenizer(max_length: int = 8192):
    """A character-level Gemma tokenizer (byte-fallback BPE without merges), built in memory: Gemma's special tokens
    at Gemma's ids (pad 0, end 1, begin 2), a token per byte so that any text tokenizes, nothing downloaded."""
    from transformers import GemmaTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += _CHARACTERS + ["\u2581"]
    return GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], add_bos_token=True,
                          model_max_length=max_length)


def tiny_clip_text_encoder(tokenizer, hidden_act: str = "quick_gelu", projection_dim: int | None = None):
    """A two-layer CLIP text encoder of width 32 over `tokenizer`'s vocabulary; with `projection_dim`, a
    `CLIPTextModelWithProjection` (the pooled, projected output SDXL's second and SD3's CLIP encoders give)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def tiny_autoencoder(**config):
    """An AutoencoderKL with four blocks of 8-16 channels: SD's 8x spatial factor at a few hundred KB (`config`:
    latent channels, scaling and shift factors, as the family's VAE has them)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **config,
    )


def _sd15_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )


def _turbo_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, prediction_type="epsilon", timestep_spacing="trailing",
    )


# What sets the architectures apart, at tiny size. SD2.1 against SD1.5: attention through linear projections with
# a head count per block, and an OpenCLIP text encoder (GELU, "!" padding). SD-Turbo, distilled from SD2.1 for 1-4
# steps without guidance, ships an Euler scheduler with trailing timesteps, so its first step starts at pure noise.
# `version` is what the random-weight marker records.
ARCHITECTURES = {
    "sd15": dict(version=TINY_MODEL_VERSION, unet={"attention_head_dim": 4}, hidden_act="quick_gelu",
                 pad_token="<|endoftext|>", scheduler=_sd15_scheduler),
    "sd21-turbo": dict(version="tiny-sd21-turbo-v1", unet={"attention_head_dim": (2, 4), "use_linear_projection": True},
                       hidden_act="gelu", pad_token="!", scheduler=_turbo_scheduler),
}


def build_tiny_pipeline(with_safety_checker: bool = True, seed: int = 0, architecture: str = "sd15"):
    """A `StableDiffusionPipeline` of SD1.5's classes (or SD2.1-class SD-Turbo's: `architecture="sd21-turbo"`) at a
    few MB: 64x64 images from 8x8x4 latents; PNDM (Euler with trailing timesteps)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}: use one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = character_clip_tokenizer(Path(tmp), arch["pad_token"])
    text_encoder = tiny_clip_text_encoder(tokenizer, arch["hidden_act"])
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, **arch["unet"],
    )
    vae = tiny_autoencoder()
    scheduler = arch["scheduler"]()
    safety_checker = feature_extractor = None
    if with_safety_checker:
        safety_checker = StableDiffusionSafetyChecker(
            CLIPConfig(
                text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
                vision_config={
                    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "image_size": 32, "patch_size": 8,
                },
                projection_dim=16,
            )
        )
        feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=safety_checker, feature_extractor=feature_extractor,
        requires_safety_checker=with_safety_checker,
    )


def save_tiny_pipeline(folder: str | os.PathLike, with_safety_checker: bool = True,
                       architecture: str = "sd15") -> Path:
    """Build the tiny model of `architecture` and `save_pretrained` it to `folder` (created atomically: built
    aside, then renamed)."""
    return _save_marked(folder, lambda: build_tiny_pipeline(with_safety_checker, architecture=architecture),
                        lambda: ARCHITECTURES[architecture]["version"])


def save_random_pipeline(folder: str | os.PathLike, family: str, size: str = "tiny",
                         device: str | torch.device = "cpu") -> Path:
    """A pipeline of `family` (its key, `Family.key`: "sdxl", say; see `streamsynth.synth.families`) with random
    weights at `size` ("tiny" or "native"), saved with `save_pretrained` to `folder` as `save_tiny_pipeline` saves,
    and marked as random weights."""
    from .families import family_by_key

    chosen = family_by_key(family)
    return _save_marked(folder, lambda: chosen.random_pipeline(size, device), lambda: f"{size}-{chosen.key}-v1")


def _save_marked(folder: str | os.PathLike, build, version) -> Path:
    """`build()`'s pipeline saved to `folder` with the random-weights marker `version()` (read after the build, which
    refuses an unknown architecture first): built aside, then renamed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    from .loading import quiet_hf_progress

    quiet_hf_progress()
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build().save_pretrained(staging, safe_serialization=True)
        mark_random_weights(staging, version())
        try:
            os.replace(staging, folder)
        except OSError:
            marker = _marker(folder)
            if not (marker and marker["architecture"] == version()):  # another process won the race with the same
                raise  # model: keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_tiny_model(folder: str | os.PathLike, architecture: str = "sd15") -> bool:
    """True for a folder written by `save_tiny_pipeline` (this version of the tiny model of `architecture`)."""
    marker = _marker(folder)
    return bool(marker and marker["architecture"] == ARCHITECTURES[architecture]["version"])


def ensure_tiny_pipeline() -> Path:
    """The tiny random model's folder under the cache folder, built and saved on first use."""
    folder = cache_dir() / TINY_MODEL_VERSION
    if not is_tiny_model(folder):
        save_tiny_pipeline(folder)
    return folder
