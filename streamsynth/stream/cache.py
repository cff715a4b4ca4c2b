"""The optional WebDataset cache: keep what the stream made, train from it later.

Each generation group becomes one tar shard of (png, cls, json) samples, written under a hidden temporary name and
renamed when complete: a reader (plain `webdataset` included) never sees a partial shard, and a killed writer
leaves only a hidden `.tmp` file that the next writer of that shard replaces. A shard is named by its run seed and
first sample id, so a restarted or resumed run finds the shards it already wrote and does not write them again.
"""

from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..captions.store import CaptionStore
from .sampling import SampleSpec


def shard_name(seed: int, first_sample_id: int) -> str:
    return f"seed{seed}-{first_sample_id:012d}.tar"


def write_group(
    cache: str | os.PathLike, store: CaptionStore, specs: Sequence[SampleSpec], images: torch.Tensor, seed: int
) -> Path | None:
    """Write one group's samples as a shard; returns its path, or None when that shard already exists."""
    import webdataset as wds

    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / shard_name(seed, specs[0].sample_id)
    if final.exists():
        return None
    partial = folder / f".{final.name}.{os.getpid()}.tmp"
    with open(partial, "wb") as stream, wds.TarWriter(stream) as writer:
        for spec, image in zip(specs, images):
            writer.write({
                "__key__": f"{spec.sample_id:012d}",
                "png": Image.fromarray(image.permute(1, 2, 0).numpy()),
                "cls": spec.label,
                "json": {
                    "sample_id": spec.sample_id, "seed": spec.seed, "prompt": spec.prompt, "caption": spec.caption,
                    "class_id": store.classes[spec.label].id, "label": spec.label,
                },
            })
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, final)
    return final


def cache_shards(cache: str | os.PathLike) -> list[str]:
    """The complete shards in a cache folder (temporary, partial ones are hidden and never listed)."""
    shards = sorted(glob.glob(os.path.join(str(cache), "*.tar")))
    if not shards:
        raise FileNotFoundError(
            f"no cache shards in {cache}: fill it first with `train.py --online-synthesis --cache {cache}`"
        )
    return shards


def _decode_png(data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def cached_dataset(
    cache: str | os.PathLike,
    transform: Callable[[torch.Tensor], torch.Tensor],
    shuffle_buffer: int = 1000,
    seed: int = 0,
):
    """An endless `webdataset` pipeline over the cache: shards resampled with replacement, samples shuffled."""
    import webdataset as wds

    return (
        wds.WebDataset(cache_shards(cache), resampled=True, shardshuffle=False, seed=seed,
                       nodesplitter=None, empty_check=False, handler=wds.warn_and_continue)
        .shuffle(shuffle_buffer)
        .map_dict(png=_decode_png, cls=lambda raw: int(raw))
        .to_tuple("png", "cls")
        .map_tuple(transform, lambda label: label)
    )


def read_metadata(shard: str | os.PathLike) -> list[dict]:
    """The json records of one shard, in order (for audits and tests)."""
    import webdataset as wds

    return [json.loads(sample["json"]) for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]
