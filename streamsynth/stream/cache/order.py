"""The order a cache is read in: a pure function of (seed, position), so training from it resumes exactly from a
batch count. Shards are counted from their tar headers alone; no image is read to know the order."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from ...seeding import derive_seed, keyed_permutation
from ...shards import ShardIndex, index_shard

# The fields every cache sample needs; a sample without them is not counted.
REQUIRED_FIELDS = ("png", "cls")


def shard_index(shard: str | os.PathLike) -> ShardIndex:
    """The whole, usable samples of a shard (png and cls present), from its tar headers; damage is in `.problem`."""
    return index_shard(shard, REQUIRED_FIELDS)


def shard_sample_count(shard: str | os.PathLike) -> int:
    """The samples in a shard, counted from its tar headers alone (no image is read or decoded).

    Members are grouped into samples by webdataset's own key function, so the count is what a webdataset read yields
    (for a damaged shard: its whole samples).
    """
    return len(shard_index(shard).samples)


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
