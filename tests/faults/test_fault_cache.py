"""Training from a damaged cache (`--from-cache`): bad shards are named and left out, bad samples are left out of
their batch, and only a cache with nothing usable (or a batch with nothing usable) stops the run, in one line."""

from __future__ import annotations

import io
import logging
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch

from faultkit import random_bytes, truncate, unreadable
from streamsynth.stream import CachedBatches, ResumeError
from streamsynth.stream.cache import CacheReadError


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch[2]]


@pytest.fixture
def cache(tmp_path, write_cache) -> Path:
    """Four shards of 3 samples (ids 0..11)."""
    return write_cache(tmp_path / "cache", [3, 3, 3, 3])


def _shard(cache: Path, i: int) -> Path:
    return sorted(cache.glob("*.tar"))[i]


def _cut_in_member(shard: Path, member: int) -> Path:
    """Cut a shard in the middle of the data of its member `member` (of 9: 3 samples of cls, json, png)."""
    with tarfile.open(shard) as tar:
        info = [m for m in tar if m.isreg()][member]
    return truncate(shard, info.offset_data + info.size // 2)


def _cut_after_member(shard: Path, member: int) -> Path:
    """Cut a shard exactly at a header boundary: tarfile reads it as a shorter, valid archive."""
    with tarfile.open(shard) as tar:
        info = [m for m in tar if m.isreg()][member]
    return truncate(shard, info.offset_data + -(-info.size // 512) * 512)


DAMAGE = {
    "random-bytes": lambda p: random_bytes(p, 9000),
    "zero-bytes": lambda p: truncate(p, 0),
    "cut-in-first-header": lambda p: truncate(p, 300),
    "cut-in-second-sample": lambda p: _cut_in_member(p, 4),
    "cut-in-last-member": lambda p: _cut_in_member(p, 8),
    "cut-at-a-header": lambda p: _cut_after_member(p, 4),
}
WHOLE = {"random-bytes": 0, "zero-bytes": 0, "cut-in-first-header": 0, "cut-in-second-sample": 1,
         "cut-in-last-member": 2, "cut-at-a-header": 1}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_shard_is_named_and_its_whole_samples_used(cache, caplog, damage):
    DAMAGE[damage](_shard(cache, 1))
    with caplog.at_level(logging.WARNING):
        source = CachedBatches(cache, _plain, 3, seed=1)
    assert f"cache shard {_shard(cache, 1)} is damaged" in caplog.text
    expected = 9 + WHOLE[damage]
    assert source.order.samples_per_pass == expected
    keys = _keys(islice(source, 4))[:expected]  # a pass: every usable sample once
    assert len(set(keys)) == expected


def _rewrite_png(shard: Path, member: int, data: bytes) -> None:
    """Replace the png of sample `member` of a shard by `data` (a corrupt image inside a whole tar)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isreg()]
    with tarfile.open(shard, "w") as tar:
        pngs = 0
        for info, content in members:
            if info.name.endswith(".png"):
                if pngs == member:
                    content = data
                pngs += 1
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


@pytest.mark.parametrize("png", [b"", b"\x89PNG\r\n\x1a\n garbage", "truncated"])
def test_a_corrupt_image_is_left_out_of_its_batch(cache, caplog, png):
    shard = _shard(cache, 0)
    if png == "truncated":
        with tarfile.open(shard) as tar:
            good = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".png"))
        png = good[: len(good) // 2]
    _rewrite_png(shard, 1, png)
    source = CachedBatches(cache, _plain, 4, seed=1)
    with caplog.at_level(logging.WARNING):
        batches = list(islice(source, 3))  # one pass of 12 samples
    assert sum(len(b[2]) for b in batches) == 11 and all(len(b[0]) == len(b[1]) == len(b[2]) for b in batches)
    assert f"cache sample {shard.stem}/000000000001 skipped" in caplog.text
    assert "000000000001" not in " ".join(_keys(batches))


def test_a_batch_with_no_usable_sample_stops_in_one_line(cache):
    for i in range(3):
        _rewrite_png(_shard(cache, 0), i, b"not a png")
    source = CachedBatches(cache, _plain, 3, seed=0, shuffle_window=1)  # shards read whole: a batch is a shard
    with pytest.raises(CacheReadError, match="no sample of cache batch .* could be used .*damaged"):
        for _ in range(4):
            next(source)
    assert source.batch < 4  # the failed batch is not counted: a resume after the fix starts at it


def test_a_cache_with_nothing_usable(cache):
    for shard in cache.glob("*.tar"):
        random_bytes(shard, 2000)
    with pytest.raises(CacheReadError, match="no usable sample in the 4 shards of cache folder .*not an uncompressed"):
        CachedBatches(cache, _plain, 3)


def test_an_unreadable_shard_is_left_out(cache, caplog):
    with unreadable(_shard(cache, 2)), caplog.at_level(logging.WARNING):
        source = CachedBatches(cache, _plain, 3)
    assert source.order.samples_per_pass == 9 and "Permission denied" in caplog.text


def test_an_unreadable_cache_folder(cache):
    with unreadable(cache), pytest.raises(CacheReadError, match="cannot list cache folder .*Permission denied"):
        CachedBatches(cache, _plain, 3)


def test_a_shard_lost_during_the_run_costs_its_samples_not_the_run(cache, caplog):
    source = CachedBatches(cache, _plain, 4, seed=3)
    first = next(source)
    _shard(cache, 3).unlink()
    with caplog.at_level(logging.WARNING):
        rest = list(islice(source, 5))
    assert len(rest) == 5 and "the cache changed during the run" in caplog.text
    state = {**source.state_dict()}
    with pytest.raises(ResumeError, match="has lost 1 of the shards"):
        CachedBatches(cache, _plain, 4, seed=3).load_state_dict(state)
    assert first is not None


def test_resuming_over_a_shard_that_became_damaged_says_so(cache):
    source = CachedBatches(cache, _plain, 3, seed=3)
    next(source)
    state = source.state_dict()
    truncate(_shard(cache, 0), 0.2)
    with pytest.raises(ResumeError, match="is damaged now"):
        CachedBatches(cache, _plain, 3, seed=3).load_state_dict(state)
