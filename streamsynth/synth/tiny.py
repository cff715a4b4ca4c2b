"""A tiny, randomly initialised Stable Diffusion with the component classes of SD1.5.

No weights can be downloaded where streamsynth is developed and tested, so the tests and the speed benchmarks use
this model where any generator will do (the embedded default is the trained digits model,
`streamsynth.synth.digits_model`). It is saved with `save_pretrained` and always loaded back with `from_pretrained`,
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


def character_clip_tokenizer(folder: Path):
    """A character-level CLIP tokenizer: CLIP's byte alphabet with no merges, so it needs no downloaded vocabulary."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    return tokenizer


def build_tiny_pipeline(with_safety_checker: bool = True, seed: int = 0):
    """A `StableDiffusionPipeline` of SD1.5's classes at a few MB: 64x64 images from 8x8x4 latents, PNDM."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = character_clip_tokenizer(Path(tmp))
    vocab_size = len(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    # Four VAE blocks, as SD1.5 has, give its 8x spatial factor.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    # SD1.5's scheduler configuration.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
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


def save_tiny_pipeline(folder: str | os.PathLike, with_safety_checker: bool = True) -> Path:
    """Build the tiny model and `save_pretrained` it to `folder` (created atomically: built aside, then renamed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    from .loading import quiet_hf_progress

    quiet_hf_progress()
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build_tiny_pipeline(with_safety_checker).save_pretrained(staging, safe_serialization=True)
        mark_random_weights(staging, TINY_MODEL_VERSION)
        try:
            os.replace(staging, folder)
        except OSError:
            if not is_tiny_model(folder):  # another process won the race with the same model: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_tiny_model(folder: str | os.PathLike) -> bool:
    """True for a folder written by `save_tiny_pipeline` (this version of the tiny model)."""
    marker = _marker(folder)
    return bool(marker and marker["architecture"] == TINY_MODEL_VERSION)


def ensure_tiny_pipeline() -> Path:
    """The tiny random model's folder under the cache folder, built and saved on first use."""
    folder = cache_dir() / TINY_MODEL_VERSION
    if not is_tiny_model(folder):
        save_tiny_pipeline(folder)
    return folder
