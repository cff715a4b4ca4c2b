"""Finding the real images to caption, and decoding any one of them into an RGB picture.

Two layouts are read:
- an ImageFolder tree, `ROOT/{class id}/.../{image}`, listed the way `torchvision.datasets.ImageFolder` lists it
  (class = top-level folder, sorted; files by image extension; the key is the path relative to ROOT);
- WebDataset shards, uncompressed `.tar` files whose members are grouped into samples by webdataset's own rule
  (`{key}.{field}`), each sample holding one image field and one class field (default `cls`); the key is
  `{shard file name}/{sample key}`.

Shards are indexed once by reading tar headers only (the image bytes are seeked over, not read), so every sample
becomes an (offset, size) in its shard. That lets any DataLoader worker decode any sample, even from a single
shard, and lets a resumed run skip what is done without reading it, which a sequential webdataset pipeline cannot.

Decoding never raises for a bad file: `decode_image` returns either an RGB image or the reason it is unusable.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageSourceError(ValueError):
    """The `--images` argument names nothing that can be read as images; the message says what was expected."""


@dataclass(frozen=True)
class ImageRef:
    """One image to caption: where its bytes are and which class it belongs to."""

    key: str
    class_index: int
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str


@dataclass
class ImageCollection:
    """Everything found under `--images`: the classes in label order, the images, and samples unusable as listed."""

    source: str
    layout: str  # "imagefolder" or "webdataset"
    class_ids: list[str]
    images: list[ImageRef]
    unusable: list[Skipped] = field(default_factory=list)

    def images_per_class(self) -> list[int]:
        counts = [0] * len(self.class_ids)
        for image in self.images:
            counts[image.class_index] += 1
        return counts


def find_images(source: str | os.PathLike, class_field: str = "cls") -> ImageCollection:
    """List the images under `source`: an ImageFolder tree, a `.tar` shard, a brace pattern or a folder of shards."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        has_class_folders = any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
        if shards and not has_class_folders:
            return index_shards(shards, class_field, source=text)
        return list_image_folder(path)
    if path.is_file():
        return index_shards([text], class_field, source=text)
    from webdataset.shardlists import expand_urls

    shards = [s for pattern in expand_urls(text) for s in sorted(glob.glob(pattern))]
    if not shards:
        raise ImageSourceError(
            f"--images {text}: no such folder, file or shard pattern; give an ImageFolder root (one folder per "
            "class), a .tar shard, a folder of .tar shards or a brace pattern such as 'train-{000000..000146}.tar'"
        )
    return index_shards(shards, class_field, source=text)


def list_image_folder(root: str | os.PathLike) -> ImageCollection:
    """Every image file of an ImageFolder tree; class folders without readable files are kept (see README)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    try:
        class_ids, class_to_index = find_classes(str(root))
    except FileNotFoundError:
        raise ImageSourceError(
            f"--images {root}: no class folders found; an ImageFolder root holds one folder per class "
            "(named by class id, e.g. n01440764) with the images inside"
        ) from None
    samples = make_dataset(str(root), class_to_index, extensions=IMG_EXTENSIONS, allow_empty=True)
    images = [ImageRef(Path(p).relative_to(root).as_posix(), c, p) for p, c in samples]
    return ImageCollection(str(root), "imagefolder", class_ids, images)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    return f.read() if f is not None else b""


def index_shards(shards: list[str], class_field: str = "cls", source: str = "") -> ImageCollection:
    """Index WebDataset shards: one `ImageRef` (offset and size of the image member) per sample with an image."""
    from webdataset.tariterators import base_plus_ext

    found: list[tuple[str, str, str, int, int]] = []  # key, class id, shard, offset, size
    unusable: list[Skipped] = []
    for shard in shards:
        name = Path(shard).name
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            # Mode "r:" reads an uncompressed tar with seeks, so only headers and the small class members are read.
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    prefix, suffix = base_plus_ext(member.name)
                    if prefix is not None:
                        samples.setdefault(prefix, {})[suffix.lower()] = member
                for prefix, fields in samples.items():
                    key = f"{name}/{prefix}"
                    image_field = next((f for f in IMAGE_FIELDS if f in fields), None)
                    if image_field is None:
                        unusable.append(Skipped(key, f"sample has no image field (fields: {sorted(fields)})"))
                        continue
                    if class_field not in fields:
                        unusable.append(
                            Skipped(key, f"sample has no class field {class_field!r} (fields: {sorted(fields)}); "
                                         "name the right one with --class-field")
                        )
                        continue
                    class_id = _read_member(tar, fields[class_field]).decode("utf-8", "replace").strip()
                    if not class_id:
                        unusable.append(Skipped(key, f"class field {class_field!r} is empty"))
                        continue
                    member = fields[image_field]
                    found.append((key, class_id, shard, member.offset_data, member.size))
        except tarfile.ReadError as err:
            raise ImageSourceError(
                f"{shard}: not an uncompressed tar file ({err}); WebDataset shards must be plain .tar "
                "(decompress .tar.gz shards first)"
            ) from None
    class_ids = _sorted_class_ids({class_id for _, class_id, *_ in found})
    if not class_ids:
        raise ImageSourceError(f"--images {source}: no sample in {len(shards)} shard(s) has both an image and a class")
    index = {cid: i for i, cid in enumerate(class_ids)}
    images = [ImageRef(key, index[cid], shard, offset, size) for key, cid, shard, offset, size in found]
    return ImageCollection(source, "webdataset", class_ids, images, unusable)


def _sorted_class_ids(ids: set[str]) -> list[str]:
    # Integer labels (the usual `.cls`) sort numerically so that label index i is class "i" when labels are 0..N-1.
    if all(cid.isdigit() for cid in ids):
        return sorted(ids, key=int)
    return sorted(ids)


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


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image | str:
    """Decode `data` into an RGB image, or return why it cannot be used.

    `min_size`: the side the captioner will resize to; large JPEGs are then decoded at a reduced scale (DCT
    scaling), which is much faster and still at least this size. Images beyond PIL's decompression-bomb limit are
    refused, not decoded: they would take gigabytes of memory in a worker.
    """
    if not data:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            # Between PIL's warning and error thresholds an image is large but legitimate: caption it quietly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if min_size and image.format == "JPEG":
                image.draft(None, (min_size, min_size))
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        return f"too large: {err}"
    except UnidentifiedImageError:
        return "not an image file PIL can read (unknown format or corrupt header)"
    except (OSError, SyntaxError, ValueError, SystemError) as err:
        # PIL reports truncated and corrupt pixel data as OSError, some broken headers as SyntaxError/ValueError.
        return f"corrupt or truncated image data ({type(err).__name__}: {err})"
