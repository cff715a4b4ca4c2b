"""Reading the cache as an endless, exactly resumable source of augmented batches for one rank (`CachedBatches`),
with damaged shards and samples named and left out (see docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...imagefiles import decode_image, image_to_uint8_tensor
from ...seeding import derive_seed, seeded
from ...shards import ShardIndex, index_shard
from ..resumable import ResumableBatches, leave_interrupts_to_the_trainer
from .folder import CLASSES_FILE, CacheReadError, cache_classes, cache_shards
from .order import CacheOrder, shard_index

log = logging.getLogger(__name__)


_index_cache: dict[tuple[str, int, int], ShardIndex] = {}
_INDEX_CACHE_SHARDS = 256


def _cached_index(shard: str) -> ShardIndex:
    """A worker's shard indexes, kept for the shards of the current shuffle windows (positions arrive in order)."""
    st = os.stat(shard)
    key = (shard, st.st_size, st.st_mtime_ns)
    index = _index_cache.pop(key, None) or shard_index(shard)
    _index_cache[key] = index  # most recently used last
    while len(_index_cache) > _INDEX_CACHE_SHARDS:
        del _index_cache[next(iter(_index_cache))]
    return index


def read_members(shard: str, members: Collection[int]) -> dict[int, dict | str]:
    """The raw samples (undecoded bytes of each field, `__key__`) at these member indices of a shard, each read
    directly from its byte range; a sample that cannot be read is, instead, the reason why (the shard changed or
    vanished during the run)."""
    try:
        index = _cached_index(shard)
    except OSError as err:
        return dict.fromkeys(members, f"cannot read the shard ({err.strerror or err}): the cache changed during the run")
    found: dict[int, dict | str] = {}
    for member in members:
        if member >= len(index.samples):
            found[member] = (f"the shard holds {len(index.samples)} samples, fewer than when the run started: the "
                             "cache changed during the run")
            continue
        sample = index.samples[member]
        try:
            found[member] = {"__key__": sample.key, **{name: index.read(sample, name) for name in sample.fields}}
        except OSError as err:
            found[member] = f"cannot read the sample ({err})"
    return found


def _decode_png(data: bytes) -> torch.Tensor | str:
    """A cached image as a (3, H, W) uint8 tensor, or why it cannot be used (the shared decoding policy)."""
    image = decode_image(data)
    return image if isinstance(image, str) else image_to_uint8_tensor(image)


@dataclass
class _Unreadable:
    """A batch none of whose samples could be used: the main process raises it as a `CacheReadError`."""

    message: str


class CacheStream(IterableDataset):
    """One rank's batches of the cache from batch `start_batch` on, as whole (images, labels, keys) batches for a
    DataLoader with `batch_size=None`.

    Batch t holds positions (t·world + rank)·B + [0, B) of the shared `CacheOrder`, so ranks read disjoint samples
    and together read every sample once per pass. Loader worker w of W makes batches start + w, start + w + W, ...:
    a DataLoader reads its workers round-robin, so batches arrive in order and are the same for any number of
    workers. A worker indexes the shards that hold its batch by their tar headers, reads only that batch's samples
    and decodes their images; each is augmented under a seed derived from its position. The key is
    "{shard name}/{__key__}", unique in the cache. A sample that cannot be read or decoded is left out of its batch
    (named in a warning), so batch t stays batch t; a batch left with no sample is an error.
    """

    def __init__(self, shards: Sequence[str], order: CacheOrder, transform: Callable[[torch.Tensor], torch.Tensor],
                 batch_size: int, rank: int, world: int, start_batch: int):
        self.shards = list(shards)
        self.order = order
        self.transform = transform
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list | _Unreadable]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in count(self.start_batch + worker, workers):
            first = (batch * self.world + self.rank) * self.batch_size
            yield self._batch(batch, range(first, first + self.batch_size))

    def _batch(self, batch: int, positions: range) -> list | _Unreadable:
        images, labels, keys, bad = [], [], [], []
        for image, label, key, problem in self._samples(positions):
            if problem is not None:
                bad.append((key, problem))
                continue
            images.append(image)
            labels.append(label)
            keys.append(key)
        if bad:
            for key, problem in bad:
                log.warning("cache sample %s skipped: %s", key, problem)
            if not images:
                return _Unreadable(
                    f"no sample of cache batch {batch} could be used ({len(bad)} unreadable, e.g. {bad[0][0]}: "
                    f"{bad[0][1]}); the cache folder is damaged: remove the damaged shards, or refill it"
                )
        return [torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys]

    def _samples(self, positions: range) -> Iterator[tuple[torch.Tensor | None, int, str, str | None]]:
        """(augmented image, label, key, None) per position, or (None, -1, key, why it is unusable)."""
        places = [self.order.locate(p) for p in positions]
        members_of: dict[int, list[int]] = {}
        for shard, member in places:
            members_of.setdefault(shard, []).append(member)
        raw = {(shard, member): sample for shard, members in members_of.items()
               for member, sample in read_members(self.shards[shard], members).items()}
        for position, (shard, member) in zip(positions, places):
            sample, name = raw[shard, member], Path(self.shards[shard]).stem
            if isinstance(sample, str):
                yield None, -1, f"{name}/#{member}", sample
                continue
            key = f"{name}/{sample['__key__']}"
            try:
                label = int(sample["cls"])
            except ValueError:
                yield None, -1, key, f"its label {sample['cls'][:20]!r} is not an integer"
                continue
            pixels = _decode_png(sample["png"])
            if isinstance(pixels, str):
                yield None, -1, key, pixels
                continue
            image = seeded(derive_seed(self.order.seed, "cache augment", position), self.transform, pixels)
            yield image, label, key, None


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
        shards = cache_shards(cache)  # an unreadable or empty folder is said first
        self.class_ids = _labelled_classes(cache, class_ids)
        if cache_classes(cache) is None:
            _check_labels(shards[0], self.class_ids)
        self.batch_size, self.rank, self.world, self.num_workers = batch_size, rank, world, num_workers
        super().__init__(
            layout={"seed": seed, "batch_size": batch_size, "world_size": world, "rank": rank,
                    "shuffle_window": shuffle_window},
            fingerprint={},
        )
        self._read_shards(cache_shards(cache))

    def _read_shards(self, shards: list[str]) -> None:
        indexes = [shard_index(s) for s in shards]
        self.damaged = {}  # shard name → what is wrong with it
        for index in indexes:
            if index.problem or index.incomplete:
                what = ", ".join(filter(None, [index.problem, index.incomplete and
                                               f"{len(index.incomplete)} samples lack a png or cls field"]))
                self.damaged[Path(index.path).name] = what
                log.warning("cache shard %s is damaged (%s): %s", index.path, what,
                            f"training uses its {len(index.samples)} whole samples" if index.samples
                            else "it is not used")
        usable = [i for i in indexes if i.samples]
        if not usable:
            example = next(iter(self.damaged.items()), None)
            raise CacheReadError(
                f"no usable sample in the {len(shards)} shards of cache folder {self.folder}"
                + (f" (e.g. {example[0]}: {example[1]})" if example else "")
                + "; refill it with `train.py --online-synthesis --cache DIR`"
            )
        self.shards = [i.path for i in usable]
        counts = [len(i.samples) for i in usable]
        self.order = CacheOrder(counts, self.layout["seed"], self.layout["shuffle_window"])
        self.fingerprint = {"shards": [Path(s).name for s in self.shards], "counts": counts}

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
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          worker_init_fn=leave_interrupts_to_the_trainer)

    def __next__(self):
        batch = super().__next__()
        if isinstance(batch, _Unreadable):
            self.batch -= 1  # not delivered: a resume after the fix starts at this batch
            raise CacheReadError(batch.message)
        return batch

    def _data_change(self, saved: dict) -> str | None:
        names, counts = self.fingerprint["shards"], self.fingerprint["counts"]
        if saved["shards"] != names:  # a shard is gone or renamed (a cache that only grew is handled on loading)
            gone = sorted(set(saved["shards"]) - set(names))
            if not gone:
                return f"the shards of cache folder {self.folder} are not those the checkpoint was written with"
            damaged = [name for name in gone if name in self.damaged]
            why = f" ({damaged[0]} is damaged now: {self.damaged[damaged[0]]})" if damaged else ""
            return (f"the cache folder {self.folder} has lost {len(gone)} of the shards the checkpoint was written "
                    f"with (e.g. {gone[0]}){why}")
        for name, was, now in zip(names, saved["counts"], counts):
            if was != now:
                return f"cache shard {name} now holds {now} samples, the checkpoint was written when it held {was}"
        return None


def read_metadata(shard: str | os.PathLike) -> list[dict]:
    """The json records of one shard, in order (for audits and tests); of a damaged shard, those of its whole
    samples."""
    index = index_shard(shard, ("json",))
    return [json.loads(index.read(sample, "json")) for sample in index.samples]
