"""The optional WebDataset cache: keep what the stream made, train from it later.

Each generation group becomes one tar shard of (png, cls, json) samples, written under a hidden temporary name and
renamed when complete: a reader (plain `webdataset` included) never sees a partial shard, and a killed writer
leaves only a hidden `.tmp` file that the next writer of that shard replaces. A shard is named by its run seed and
first sample id, so a restarted or resumed run finds the shards it already wrote and does not write them again.

Training from the cache reads it in a seeded order that is a pure function of (seed, position), so a run resumes
exactly from a batch count (`CachedBatches`): see `CacheOrder` and `CacheStream`.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from itertools import accumulate, count
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..seeding import derive_seed, keyed_permutation, seeded
from .resumable import ResumableBatches
from .sampling import SampleSpec

log = logging.getLogger(__name__)


def shard_name(seed: int, first_sample_id: int) -> str:
    return f"seed{seed}-{first_sample_id:012d}.tar"


CLASSES_FILE = "classes.json"


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
    partial = folder / f".{CLASSES_FILE}.{os.getpid()}.tmp"
    partial.write_text(json.dumps({"class_ids": list(class_ids)}))
    os.replace(partial, path)


def cache_classes(cache: str | os.PathLike) -> list[str] | None:
    """The class ids of a cache folder's labels (None for a cache written before they were recorded)."""
    path = Path(cache) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        return list(json.loads(path.read_text())["class_ids"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err}): restore it, or delete it and give --captions") from None


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
    partial = folder / f".{final.name}.{os.getpid()}.tmp"
    with open(partial, "wb") as stream, wds.TarWriter(stream) as writer:
        for spec, image in zip(specs, images):
            writer.write({
                "__key__": f"{spec.sample_id:012d}",
                "png": Image.fromarray(image.permute(1, 2, 0).numpy()),
                "cls": spec.label,
                "json": {
                    "sample_id": spec.sample_id, "seed": spec.seed, "prompt": spec.prompt, "caption": spec.caption,
                    "class_id": class_ids[spec.label], "label": spec.label,
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


def shard_sample_count(shard: str | os.PathLike) -> int:
    """The samples in a shard, counted from its tar headers alone (no image is read or decoded).

    Members are grouped into samples by webdataset's own key function, so the count is what a webdataset read yields.
    """
    from webdataset.tariterators import base_plus_ext

    with tarfile.open(shard) as tar:  # random-access mode: reading a header seeks over the member's data
        keys = [key for key, _ in (base_plus_ext(m.name) for m in tar if m.isreg()) if key is not None]
    return sum(1 for previous, key in zip([None, *keys], keys) if key != previous)


@dataclass(frozen=True)
class _PassLayout:
    shards: list[int]  # shard indices in this pass's order
    shard_starts: list[int]  # offset in the pass of each shard's first sample, then the pass length
    window_bounds: list[int]  # offset of each window's first sample, then the pass length


class CacheOrder:
    """Where position i of the endless cache stream reads from: (shard, member), a pure function of (seed, i).

    Positions [pN, (p+1)N) are pass p (N samples in the cache) and read every sample once: the shards in an order
    shuffled per pass, and the samples of each window (a run of consecutive shards in that order holding at least
    `shuffle_window` samples) shuffled together. This is webdataset's shard shuffle and shuffle buffer made
    addressable: any position is found by arithmetic and keyed permutations, without reading what comes before it.
    """

    def __init__(self, counts: Sequence[int], seed: int, shuffle_window: int = 1000):
        self.counts = list(counts)
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.samples_per_pass = sum(self.counts)
        if self.samples_per_pass == 0:
            raise ValueError("the cache shards hold no samples")
        self._layout_cache: tuple[int, _PassLayout] | None = None

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, member index in the shard) of a position."""
        pass_index, offset = divmod(position, self.samples_per_pass)
        layout = self._layout(pass_index)
        window = bisect.bisect_right(layout.window_bounds, offset) - 1
        start, end = layout.window_bounds[window], layout.window_bounds[window + 1]
        flat = start + keyed_permutation(offset - start, end - start,
                                         derive_seed(self.seed, "cache window", pass_index, window))
        slot = bisect.bisect_right(layout.shard_starts, flat) - 1
        return layout.shards[slot], flat - layout.shard_starts[slot]

    def _layout(self, pass_index: int) -> _PassLayout:
        # Positions arrive in order, so remembering the last pass computes each layout about once.
        if self._layout_cache is None or self._layout_cache[0] != pass_index:
            self._layout_cache = pass_index, self._compute_layout(pass_index)
        return self._layout_cache[1]

    def _compute_layout(self, pass_index: int) -> _PassLayout:
        key = derive_seed(self.seed, "cache shards", pass_index)
        shards = [keyed_permutation(i, len(self.counts), key) for i in range(len(self.counts))]
        shard_starts = [0, *accumulate(self.counts[s] for s in shards)]
        window_bounds = [0]
        for end in shard_starts[1:]:
            if end > window_bounds[-1] and (end - window_bounds[-1] >= self.shuffle_window
                                            or end == self.samples_per_pass):
                window_bounds.append(end)
        return _PassLayout(shards, shard_starts, window_bounds)


def read_members(shard: str, members: Collection[int]) -> dict[int, dict]:
    """The raw samples (undecoded bytes, `__key__`) at these member indices of a shard, read with webdataset up to
    the last one wanted."""
    import webdataset as wds

    wanted, last, found = set(members), max(members), {}
    for member, sample in enumerate(wds.tarfile_samples([{"url": shard}])):
        if member in wanted:
            found[member] = sample
        if member == last:
            return found
    raise RuntimeError(f"{shard} holds fewer samples than it did when the run started (sample {last} is missing): "
                       "the cache changed during the run")


def _decode_png(data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class CacheStream(IterableDataset):
    """One rank's batches of the cache from batch `start_batch` on, as (image, label, key) samples for a DataLoader.

    Batch t holds positions (t·world + rank)·B + [0, B) of the shared `CacheOrder`, so ranks read disjoint samples
    and together read every sample once per pass. Loader worker w of W makes batches start + w, start + w + W, ...:
    a DataLoader reads its workers round-robin, so batches arrive in order and are the same for any number of
    workers. A worker reads (with webdataset) the shards that hold its batch, up to the last member it needs, and
    decodes only that batch's images; each is augmented under a seed derived from its position. The key is
    "{shard name}/{__key__}", unique in the cache.
    """

    def __init__(self, shards: Sequence[str], order: CacheOrder, transform: Callable[[torch.Tensor], torch.Tensor],
                 batch_size: int, rank: int, world: int, start_batch: int):
        self.shards = list(shards)
        self.order = order
        self.transform = transform
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in count(self.start_batch + worker, workers):
            first = (batch * self.world + self.rank) * self.batch_size
            yield from self._samples(range(first, first + self.batch_size))

    def _samples(self, positions: range) -> Iterator[tuple[torch.Tensor, int, str]]:
        places = [self.order.locate(p) for p in positions]
        members_of: dict[int, list[int]] = {}
        for shard, member in places:
            members_of.setdefault(shard, []).append(member)
        raw = {(shard, member): sample for shard, members in members_of.items()
               for member, sample in read_members(self.shards[shard], members).items()}
        for position, (shard, member) in zip(positions, places):
            sample = raw[shard, member]
            image = seeded(derive_seed(self.order.seed, "cache augment", position), self.transform,
                           _decode_png(sample["png"]))
            yield image, int(sample["cls"]), f"{Path(self.shards[shard]).stem}/{sample['__key__']}"


def _labelled_classes(cache: str | os.PathLike, class_ids: Sequence[str] | None) -> list[str]:
    """The classes a cache's labels index: those it recorded, which `class_ids` (if given) must equal."""
    recorded = cache_classes(cache)
    if recorded is None and class_ids is None:
        raise ValueError(f"the cache folder {cache} does not record its classes (it predates {CLASSES_FILE}): give "
                         "the caption store it was made from with --captions")
    if recorded is not None and class_ids is not None and list(class_ids) != recorded:
        raise ValueError(f"the cache folder {cache} holds images of other classes than the caption store "
                         f"({len(recorded)} classes starting {recorded[:3]}, against {len(class_ids)} starting "
                         f"{list(class_ids)[:3]}): give the caption store it was made from")
    return list(recorded if recorded is not None else class_ids)


def _check_labels(shard: str, class_ids: Sequence[str]) -> None:
    """For a cache that records no classes: its first shard's labels must name the classes given for it."""
    for record in read_metadata(shard):
        label, class_id = record.get("label"), record.get("class_id")
        expected = class_ids[label] if isinstance(label, int) and 0 <= label < len(class_ids) else None
        if class_id is not None and expected != class_id:
            raise ValueError(f"{shard} labels sample {record.get('sample_id')} as {label} = {class_id!r}, but label "
                             f"{label} of the given caption store is {expected!r}: give the caption store the cache "
                             "was made from")


class CachedBatches(ResumableBatches):
    """The cache as an endless, exactly resumable source of (images, labels, keys) batches for one rank.

    The order is `CacheOrder`'s (seeded, every sample once per pass, ranks disjoint); the state is the number of
    batches delivered, with the shard names and sample counts as the fingerprint of the data. Counting reads only
    tar headers, so opening a large cache costs no decoding.
    """

    data_name = "cache folder"

    def __init__(self, cache: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                 *, seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 0, shuffle_window: int = 1000,
                 class_ids: Sequence[str] | None = None):
        self.folder = cache
        self.transform = transform
        self.class_ids = _labelled_classes(cache, class_ids)
        if cache_classes(cache) is None:
            _check_labels(cache_shards(cache)[0], self.class_ids)
        self.batch_size, self.rank, self.world, self.num_workers = batch_size, rank, world, num_workers
        super().__init__(
            layout={"seed": seed, "batch_size": batch_size, "world_size": world, "rank": rank,
                    "shuffle_window": shuffle_window},
            fingerprint={},
        )
        self._read_shards(cache_shards(cache))

    def _read_shards(self, shards: list[str]) -> None:
        self.shards = shards
        counts = [shard_sample_count(s) for s in shards]
        self.order = CacheOrder(counts, self.layout["seed"], self.layout["shuffle_window"])
        self.fingerprint = {"shards": [Path(s).name for s in shards], "counts": counts}

    def load_state_dict(self, state: dict) -> None:
        """As `ResumableBatches.load_state_dict`; a cache that has only grown since (a job still filling it) resumes
        exactly over the shards the checkpoint knew, and leaves the new ones to the next run."""
        known, now = state["fingerprint"]["shards"], self.fingerprint["shards"]
        if len(known) < len(now) and set(known) <= set(now):
            log.warning("the cache folder %s has %d shards more than when the checkpoint was written; this run goes on "
                        "over the %d it knew, so that it resumes exactly (a new run reads them all)", self.folder,
                        len(now) - len(known), len(known))
            self._read_shards([os.path.join(str(self.folder), name) for name in known])
        super().load_state_dict(state)

    def _loader_from(self, batch: int) -> DataLoader:
        stream = CacheStream(self.shards, self.order, self.transform, self.batch_size, self.rank, self.world, batch)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)

    def _data_change(self, saved: dict) -> str | None:
        names, counts = self.fingerprint["shards"], self.fingerprint["counts"]
        if saved["shards"] != names:  # a shard is gone or renamed (a cache that only grew is handled on loading)
            gone = sorted(set(saved["shards"]) - set(names))
            return (f"the cache folder {self.folder} has lost {len(gone)} of the shards the checkpoint was written "
                    f"with (e.g. {gone[0]})")
        for name, was, now in zip(names, saved["counts"], counts):
            if was != now:
                return f"cache shard {name} now holds {now} samples, the checkpoint was written when it held {was}"
        return None


def read_metadata(shard: str | os.PathLike) -> list[dict]:
    """The json records of one shard, in order (for audits and tests)."""
    import webdataset as wds

    return [json.loads(sample["json"]) for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]
