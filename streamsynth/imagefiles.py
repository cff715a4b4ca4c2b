"""The one image-decoding policy of streamsynth, and the one way an image folder is listed: captioning, reading the
cache and evaluation decode images here, and captioning, evaluation and `--train-dir` list class folders here.

Decoding never raises for a bad image. `decode_image` returns either an RGB picture or the reason it cannot be used,
in words (`empty file (0 bytes)`, `not an image file PIL can read ...`, `corrupt or truncated image data (...)`,
`too large: ...`); `read_image_file` adds the reasons a file cannot be read at all (missing, permission denied, a
folder). Each caller skips such an image, counts it and names it with its reason: captioning in its report, cache
reading and evaluation in a warning and in their results. A truncated image is refused rather than half decoded:
its grey lower half would give a wrong caption or a wrong score.

`list_class_images` lists a class folder as torchvision's `ImageFolder` does (image files at any depth, folders and
files in sorted order) except where that would read the wrong images: a symbolic link that leads outside the image
folder or into another class's folder is not followed, a loop is walked once, and a file reached twice (through a
link, or a hard link) is listed once; each of these is named, with why, instead of being passed over.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

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


def printable_path(path: str | os.PathLike) -> str:
    """`path` as text that can be printed and stored: bytes that are not UTF-8 (a file name from another system's
    encoding) become `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8_path(path: str) -> bool:
    """Whether `path` is valid UTF-8 text (Python carries the bytes of a name that is not as lone surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class ClassFolderListing:
    """The image files of one class folder, and what was left out of the listing, with why."""

    files: list[str] = field(default_factory=list)  # in torchvision ImageFolder's order, each real file once
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it is not listed)
    unreadable: str | None = None  # why the class folder itself cannot be listed ("Permission denied", ...)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def list_class_images(root: str | os.PathLike, class_folder: str, extensions: tuple[str, ...],
                      other_classes: Sequence[str] = ()) -> ClassFolderListing:
    """The files of `root/class_folder` whose names end (in any case) with one of `extensions`, at any depth.

    Nothing outside `root` is read: a symbolic link that leads outside it is not followed, nor one into another
    class's folder (`other_classes`: their real paths), so no image is scored or captioned under the wrong class. A
    link back to a folder already listed (a loop) is not followed, and a file reached a second time is not listed
    again. Each is in `skipped`, as is a sub-folder that cannot be listed; a class folder that cannot be listed, or is
    a link out of `root`, has its reason in `unreadable`. Non-UTF-8 names are listed as they are (see
    `is_utf8_path`)."""
    root_real = os.path.realpath(root)
    top = os.path.join(root, class_folder)
    listing = ClassFolderListing()
    if os.path.islink(top):
        real = os.path.realpath(top)
        if _inside(root_real, real):
            listing.unreadable = f"a symbolic link to {real}, the image folder or a folder above it, not followed"
        elif not _inside(real, root_real):
            listing.unreadable = f"a symbolic link to {real}, outside {root}, not followed"
        elif any(_inside(real, other) for other in other_classes):
            listing.unreadable = f"a symbolic link to {real}, inside another class's folder, not followed"
        if listing.unreadable:
            return listing
    try:
        st = os.stat(top)
    except OSError as err:
        listing.unreadable = err.strerror or str(err)
        return listing
    visited = {(st.st_dev, st.st_ino)}
    seen: dict[tuple[int, int], str] = {}
    walked: list[tuple[str, list[str]]] = []
    stack = [(top, st.st_dev)]
    while stack:
        folder, device = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as err:
            if folder == top:
                listing.unreadable = err.strerror or str(err)
                return listing
            listing.skipped.append((folder, f"folder not listed ({err.strerror or err})"))
            continue
        names, subfolders = [], []
        for entry in entries:
            is_image = entry.name.lower().endswith(extensions)
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                try:
                    target = os.stat(entry.path)
                except OSError as err:
                    if is_image:
                        listing.skipped.append((entry.path, f"a symbolic link to {real} that cannot be followed "
                                                            f"({err.strerror or err})"))
                    continue
                is_folder = stat.S_ISDIR(target.st_mode)
                if not (is_folder or is_image):
                    continue
                if not _inside(real, root_real):
                    listing.skipped.append((entry.path, f"a symbolic link to {real}, outside {root}: not followed"))
                    continue
                if any(_inside(real, other) for other in other_classes):
                    listing.skipped.append((entry.path, f"a symbolic link to {real}, inside another class's folder: "
                                                        "not followed"))
                    continue
                identity = (target.st_dev, target.st_ino)
                if is_folder and (identity in visited or _inside(root_real, real)):
                    listing.skipped.append((entry.path, f"a symbolic link to {real}, a loop (it leads back to a "
                                                        "folder already listed): not followed"))
                    continue
            elif entry.is_dir(follow_symlinks=False):
                is_folder = True
                # Its device is the folder's, unless it is a mount point: lstat says.
                identity = (entry.stat(follow_symlinks=False).st_dev, entry.inode())
                if identity in visited:
                    continue  # already listed through a link that came first
            elif is_image:
                is_folder = False
                identity = (device, entry.inode())  # a file's device is its folder's: no stat needed
            else:
                continue
            if is_folder:
                visited.add(identity)
                subfolders.append((entry.path, identity[0]))
            elif identity in seen:
                listing.skipped.append((entry.path, f"the same file as {seen[identity]}: listed once"))
            else:
                seen[identity] = entry.path
                names.append(entry.name)
        walked.append((folder, names))
        stack.extend(reversed(subfolders))
    walked.sort(key=lambda item: item[0])
    listing.files = [os.path.join(folder, name) for folder, names in walked for name in names]
    return listing
