"""Writing the cache: one generation group becomes one tar shard of (png, cls, json) samples, written under a hidden
temporary name and renamed when complete, so no reader ever sees a partial shard and a rerun skips what is there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ...safeio import atomic_write
from ..sampling import SampleSpec
from .folder import shard_name


def write_group(
    cache: str | os.PathLike, class_ids: Sequence[str], specs: Sequence[SampleSpec], images: torch.Tensor, seed: int
) -> Path | None:
    """Write one group's samples as a shard; returns its path, or None when that shard already exists."""
    import webdataset as wds

    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / shard_name(seed, specs[0].sample_id)
    if final.exists():
        return None

    def write_shard(file) -> None:
        with wds.TarWriter(file) as writer:
            for spec, image in zip(specs, images):
                writer.write({
                    "__key__": f"{spec.sample_id:012d}",
                    "png": Image.fromarray(image.permute(1, 2, 0).numpy()),
                    "cls": spec.label,
                    "json": {
                        "sample_id": spec.sample_id, "seed": spec.seed, "prompt": spec.prompt,
                        "caption": spec.caption, "class_id": class_ids[spec.label], "label": spec.label,
                    },
                })

    # A failed write leaves neither a shard nor its temporary file (nor its space); runs that share a cache folder
    # may write the same shard at once.
    atomic_write(final, write_shard, what="cache shard", kept="the shards written before are kept",
                 fix="free some space, then resume", shared=True)
    return final
