"""Small images and tiny captioners for the captioning tests (test_captioning.py, test_scale.py, the conftest's
`blip2_model`): random photos encoded in any format, folder trees written from bytes, and random captioners that can
only emit lower-case letters, so a caption is never empty and never contains the prompt by accident."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from streamsynth.captions.architectures import never_emit

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TENCH, SPRINGER, CHAINSAW = "n01440764", "n02102040", "n03000684"  # ImageNet ids: tench, English springer, chain saw


def photo(size=(48, 36), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def letters_only(module: torch.nn.Module, letter_ids: list[int]) -> None:
    vocab = module.get_output_embeddings().weight.shape[0]
    never_emit(module, [i for i in range(vocab) if i not in set(letter_ids)])


def save_letters_blip2(folder: Path) -> Path:
    """The tiny random BLIP-2, letters only, saved with `save_pretrained` as a real checkpoint is."""
    from transformers import Blip2Processor

    from streamsynth.captions.architectures import random_blip2

    torch.manual_seed(0)
    model, image_processor, tokenizer = random_blip2("tiny")
    letters_only(model, tokenizer.convert_tokens_to_ids(list(LETTERS)))
    model.save_pretrained(folder)
    Blip2Processor(image_processor, tokenizer, num_query_tokens=model.config.num_query_tokens).save_pretrained(folder)
    return folder
