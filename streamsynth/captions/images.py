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

Decoding follows streamsynth's one policy (`streamsynth.imagefiles`): `decode_image` never raises for a bad file, it
returns either an RGB image or the reason it is unusable.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..imagefiles import list_class_images, read_file_bytes
from ..safeio import UnsafePathError, safe_name
from ..shards import index_shard

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")


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

    def read_bytes(self) -> bytes | str:
        """The image's bytes, or why they cannot be read (missing, permission denied, a truncated shard)."""
        return read_file_bytes(self.path, self.offset, self.size)


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
    # class index → why its folder could not be listed (permission denied, ...): such a class has no images
    unreadable_classes: dict[int, str] = field(default_factory=dict)

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
        try:
            entries = list(path.iterdir())
        except OSError as err:
            raise ImageSourceError(f"--images {text}: cannot list the folder ({err.strerror or err})") from None
        shards = sorted(str(p) for p in entries if p.name.endswith(".tar"))
        has_class_folders = any(p.is_dir() and not p.name.startswith(".") for p in entries)
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
    """Every image file of an ImageFolder tree, listed as torchvision's `ImageFolder` lists it (classes sorted, files
    with an image extension at any depth, in sorted order), except where that would read the wrong images: nothing
    outside `root` is read, a loop is walked once, a link into another class's folder is not followed, a file is
    listed once (`streamsynth.imagefiles.list_class_images`). What is left out is named in `unusable` (or, for a class
    folder, in `unreadable_classes`) instead of being passed over in silence. Class folders without readable files
    are kept (see docs/captioning.md). A class folder whose name cannot be a class id is an `ImageSourceError`."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    root = Path(root)
    try:
        class_ids, class_to_index = find_classes(str(root))
    except FileNotFoundError:
        raise ImageSourceError(
            f"--images {root}: no class folders found; an ImageFolder root holds one folder per class "
            "(named by class id, e.g. n01440764) with the images inside"
        ) from None
    except OSError as err:
        raise ImageSourceError(f"--images {root}: cannot list the folder ({err.strerror or err})") from None
    for cid in class_ids:
        try:
            safe_name(cid, "class folder")
        except UnsafePathError as err:
            raise ImageSourceError(f"--images {root}: {err}; rename the folder") from None
    class_real = {cid: os.path.realpath(root / cid) for cid in class_ids}
    images: list[ImageRef] = []
    unusable: list[Skipped] = []
    unreadable: dict[int, str] = {}
    for cid in class_ids:
        index = class_to_index[cid]
        others = [real for other, real in class_real.items() if other != cid]
        listing = list_class_images(root, cid, IMG_EXTENSIONS, others)
        if listing.unreadable:
            unreadable[index] = f"class folder unreadable ({listing.unreadable})"
        unusable += [Skipped(Path(path).relative_to(root).as_posix(), reason) for path, reason in listing.skipped]
        images += [ImageRef(Path(path).relative_to(root).as_posix(), index, path) for path in listing.files]
    return ImageCollection(str(root), "imagefolder", class_ids, images, unusable, unreadable)


def index_shards(shards: list[str], class_field: str = "cls", source: str = "") -> ImageCollection:
    """Index WebDataset shards: one `ImageRef` (offset and size of the image member) per sample with an image.

    A damaged shard (not a tar, truncated, unreadable) does not end the run: its whole samples are kept and the
    damage is listed in `unusable`, under the shard's name, with its reason."""
    found: list[tuple[str, str, str, int, int]] = []  # key, class id, shard, offset, size
    unusable: list[Skipped] = []
    for shard in shards:
        name = Path(shard).name
        index = index_shard(shard)
        if index.problem:
            unusable.append(Skipped(name, f"shard {index.problem}; its other samples are used"
                                          if index.samples else f"shard {index.problem}"))
        for sample in index.samples:
            key, fields = f"{name}/{sample.key}", sample.fields
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
            try:
                class_id = index.read(sample, class_field).decode("utf-8", "replace").strip()
            except OSError as err:
                unusable.append(Skipped(key, f"cannot read its class field ({err})"))
                continue
            if not class_id:
                unusable.append(Skipped(key, f"class field {class_field!r} is empty"))
                continue
            try:
                safe_name(class_id, f"class field {class_field!r}")
            except UnsafePathError as err:
                unusable.append(Skipped(key, str(err)))
                continue
            found.append((key, class_id, shard, *fields[image_field]))
    class_ids = _sorted_class_ids({class_id for _, class_id, *_ in found})
    if not class_ids:
        paths = {Path(shard).name: shard for shard in shards}
        damaged = [s for s in unusable if s.key in paths]
        if damaged and len(damaged) == len(shards):
            raise ImageSourceError(
                f"{paths[damaged[0].key]}: {damaged[0].reason.removeprefix('shard ')}; WebDataset shards must be plain "
                ".tar files (decompress .tar.gz shards first)"
                + (f" ({len(damaged) - 1} other shards too)" if len(damaged) > 1 else "")
            )
        raise ImageSourceError(f"--images {source}: no sample in {len(shards)} shard(s) has both an image and a class")
    index = {cid: i for i, cid in enumerate(class_ids)}
    images = [ImageRef(key, index[cid], shard, offset, size) for key, cid, shard, offset, size in found]
    return ImageCollection(source, "webdataset", class_ids, images, unusable)


def _sorted_class_ids(ids: set[str]) -> list[str]:
    # Integer labels (the usual `.cls`) sort numerically so that label index i is class "i" when labels are 0..N-1.
    if all(cid.isdigit() for cid in ids):
        return sorted(ids, key=int)
    return sorted(ids)
