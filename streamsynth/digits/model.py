"""The shipped digits generator's architecture: Stable Diffusion's component classes at the size of 8x8 digits.

The embedded default model is a `StableDiffusionPipeline` built from the same classes as SD1.5
(`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` with a `CLIPTokenizer`, `PNDMScheduler` with SD1.5's
configuration), scaled down to draw the UCI 8x8 handwritten digits. `streamsynth train-digits-generator`
trains it; it ships in `streamsynth/data/digits-sd` and is loaded with `from_pretrained`, the path SD1.5 takes.

Sizes (see docs/digits.md for why):

- images: 8x8 RGB, the digits' own resolution (grey, so the three channels are equal). The stream resizes them to
  the classifier's size on the generator's device, and held-out real digits take the same resize.
- VAE: two blocks, so a spatial factor of 2 (SD1.5 has four, factor 8): 8x8x3 images, 4x4x4 latents.
- UNet: two levels (4x4, 2x2), cross-attention at both, conditioned on the text encoder's token states.
- text: a two-layer CLIP text encoder over a word-level CLIP BPE vocabulary (CLIP's byte alphabet plus the words of
  the digits prompts, so any text still tokenizes, unknown words as characters), 32 tokens.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable

import torch

DIGITS_MODEL_VERSION = "digits-sd-v1"
# Written into the shipped model's folder by the training script, beside the diffusers files.
MODEL_CARD = "streamsynth_model.json"
MAX_TOKENS = 32
NATIVE_SIZE = 8  # pixels; the VAE's factor 2 makes 4x4 latents

# Words that get a token of their own: the prompt frame, the class names and the digit describer's vocabulary.
PROMPT_WORDS = (
    "a photo of zero one two three four five six seven eight nine "
    "thin medium thick strokes slanted left right upright small average size large "
    "in the upper lower at top bottom on center"
).split()


def word_clip_tokenizer(folder: Path, words: Iterable[str] = PROMPT_WORDS, max_length: int = MAX_TOKENS):
    """A CLIP BPE tokenizer whose merges spell out `words` (one token each) over CLIP's byte alphabet.

    Any other text still tokenizes (down to single characters), as with CLIP's own vocabulary; nothing is
    downloaded.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    known = set(tokens)
    merges: dict[str, None] = {}
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            merges[f"{merged} {part}"] = None
            merged += part
            if merged not in known:
                known.add(merged)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def build_digits_pipeline(seed: int = 0):
    """The untrained pipeline (fp32, random init from `seed`); `train_digits_generator` trains it."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = word_clip_tokenizer(Path(tmp))
    vocab_size = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    ))
    unet = UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, sample_size=NATIVE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    # SD1.5's scheduler and its configuration; the model is trained with the DDPM noise schedule these betas define.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def shipped_digits_model() -> Path:
    """The trained digits generator shipped inside the package (a diffusers folder)."""
    return Path(str(resources.files("streamsynth") / "data" / "digits-sd"))


def model_card(folder: str | os.PathLike) -> dict | None:
    """What the training script recorded about a digits model folder (settings, final losses), if anything."""
    path = Path(folder) / MODEL_CARD
    return json.loads(path.read_text()) if path.is_file() else None


def is_digits_model(folder: str | os.PathLike) -> bool:
    card = model_card(folder)
    return bool(card and card.get("architecture") == DIGITS_MODEL_VERSION)
