"""The one image-decoding policy of streamsynth: captioning, reading the cache and evaluation decode images here.

Decoding never raises for a bad image. `decode_image` returns either an RGB picture or the reason it cannot be used,
in words (`empty file (0 bytes)`, `not an image file PIL can read ...`, `corrupt or truncated image data (...)`,
`too large: ...`); `read_image_file` adds the reasons a file cannot be read at all (missing, permission denied, a
folder). Each caller skips such an image, counts it and names it with its reason: captioning in its report, cache
reading and evaluation in a warning and in their results. A truncated image is refused rather than half decoded:
its grey lower half would give a wrong caption or a wrong score.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy of any PIL image: EXIF-rotated, 16-bit scaled, transparency on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("L") clips 16-bit values at 255 instead of scaling them, which turns most pictures white.
        pixels = np.asarray(image).astype(np.uint32)
        image = Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def plain_rgb(image: Image.Image) -> Image.Image:
    """`image.convert("RGB")`, exactly what torchvision's ImageFolder does (evaluation keeps its pixels)."""
    return image.convert("RGB")


def decode_image(
    data: bytes, min_size: int | None = None, convert: Callable[[Image.Image], Image.Image] = to_rgb
) -> Image.Image | str:
    """Decode `data` into an RGB image (through `convert`, default `to_rgb`), or return why it cannot be used.

    `min_size`: the side the consumer will resize to; large JPEGs are then decoded at a reduced scale (DCT
    scaling), which is much faster and still at least this size. Images beyond PIL's decompression-bomb limit are
    refused, not decoded: they would take gigabytes of memory in a worker.
    """
    if not data:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            # Between PIL's warning and error thresholds an image is large but legitimate: decode it quietly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if min_size and image.format == "JPEG":
                image.draft(None, (min_size, min_size))
            image.load()
            return convert(image)
    except Image.DecompressionBombError as err:
        return f"too large: {err}"
    except UnidentifiedImageError:
        return "not an image file PIL can read (unknown format or corrupt header)"
    except (OSError, SyntaxError, ValueError, SystemError) as err:
        # PIL reports truncated and corrupt pixel data as OSError, some broken headers as SyntaxError/ValueError.
        return f"corrupt or truncated image data ({type(err).__name__}: {err})"
    except MemoryError:
        return "too large to decode in the memory available"
    except Exception as err:  # PIL's plugins raise struct.error, IndexError, ... on some malformed files
        return f"corrupt image data ({type(err).__name__}: {err})"


def read_file_bytes(path: str | os.PathLike, offset: int = 0, size: int = -1) -> bytes | str:
    """The bytes of a file (or of `size` bytes at `offset`), or why they cannot be read."""
    try:
        with open(path, "rb") as f:
            if size < 0:
                return f.read()
            f.seek(offset)
            data = f.read(size)
    except OSError as err:
        return f"cannot read the file ({err.strerror or err})"
    if len(data) < size:
        return f"the file ends early: {len(data)} of {size} bytes (truncated)"
    return data


def read_image_file(
    path: str | os.PathLike, min_size: int | None = None, convert: Callable[[Image.Image], Image.Image] = to_rgb
) -> Image.Image | str:
    """`decode_image` of a file's bytes, or why it cannot be read or decoded."""
    data = read_file_bytes(path)
    return data if isinstance(data, str) else decode_image(data, min_size, convert)


def image_to_uint8_tensor(image: Image.Image):
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    import torch

    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
