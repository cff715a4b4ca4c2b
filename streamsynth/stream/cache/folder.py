"""A cache folder: its shards' names, the class ids its labels index (`classes.json`), and its complete shards."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Sequence

from ...errors import StreamsynthError
from ...safeio import atomic_write_text

CLASSES_FILE = "classes.json"


class CacheReadError(StreamsynthError, RuntimeError):
    """The cache cannot be read (no usable shard, a batch without a usable sample); the message names the shards."""


def shard_name(seed: int, first_sample_id: int) -> str:
    """A shard's name: its run seed and first sample id, so a rerun finds the shards it already wrote."""
    return f"seed{seed}-{first_sample_id:012d}.tar"


def write_cache_classes(cache: str | os.PathLike, class_ids: Sequence[str]) -> None:
    """Record the class ids the cached labels index, once per cache folder, so that training from the cache needs
    no caption store; a cache already filled for other classes is an error (its labels would mean other things)."""
    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLASSES_FILE
    if path.exists():
        known = cache_classes(folder)
        if known != list(class_ids):
            raise ValueError(f"the cache folder {folder} holds images of other classes ({len(known)} classes, "
                             f"starting {known[:3]}): give this run another --cache folder")
        return
    atomic_write_text(path, json.dumps({"class_ids": list(class_ids)}), what="cache labels", shared=True)


def cache_classes(cache: str | os.PathLike) -> list[str] | None:
    """The class ids of a cache folder's labels (None for a cache written before they were recorded)."""
    path = Path(cache) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        return list(json.loads(path.read_text())["class_ids"])
    except OSError as err:
        raise CacheReadError(f"cannot read {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CacheReadError(f"{path} is damaged ({err}): restore it, or delete it and give --captions") from None


def cache_shards(cache: str | os.PathLike) -> list[str]:
    """The complete shards in a cache folder (temporary, partial ones are hidden and never listed)."""
    try:
        os.listdir(cache)
    except FileNotFoundError:
        pass  # said below, with the way to fill it
    except OSError as err:
        raise CacheReadError(f"cannot list cache folder {cache}: {err.strerror or err}") from None
    shards = sorted(glob.glob(os.path.join(glob.escape(str(cache)), "*.tar")))
    if not shards:
        raise FileNotFoundError(
            f"no cache shards in {cache}: fill it first with `train.py --online-synthesis --cache {cache}`"
        )
    return shards
