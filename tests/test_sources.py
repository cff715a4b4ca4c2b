"""The cache and real-image sources: a seeded order, every sample once per pass, exact resume from a batch count."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from streamsynth.stream import CachedBatches, CacheOrder, RealBatches, ResumeError
from streamsynth.stream.cache import read_metadata, shard_sample_count


def _random_crop_and_flip(from_pil: bool = False):
    """Random, so batches match only if each image's augmentation is seeded the same way."""
    from torchvision.transforms import v2

    return v2.Compose([*([v2.ToImage()] if from_pil else []), v2.RandomResizedCrop(8, scale=(0.3, 1.0)),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])


def _take(source, n: int) -> list:
    return list(islice(source, n))


def _same_batches(a: list, b: list) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and list(x[2]) == list(y[2]) for x, y in zip(a, b))


def test_cache_order_visits_every_sample_once_per_pass():
    counts = [5, 3, 0, 7, 1, 4]
    order = CacheOrder(counts, seed=1, shuffle_window=6)
    everything = sorted((shard, member) for shard, n in enumerate(counts) for member in range(n))
    passes = [[order.locate(p) for p in range(k * 20, (k + 1) * 20)] for k in range(3)]
    assert all(sorted(one_pass) == everything for one_pass in passes)
    assert len({tuple(one_pass) for one_pass in passes}) == 3  # each pass has its own order
    assert [CacheOrder(counts, seed=1, shuffle_window=6).locate(p) for p in range(60)] == sum(passes, [])
    assert [CacheOrder(counts, seed=2, shuffle_window=6).locate(p) for p in range(20)] != passes[0]
    # A window of one sample is one shard: shards are read whole, one after another (in a shuffled order).
    by_shard = [shard for shard, _ in (CacheOrder(counts, seed=1, shuffle_window=1).locate(p) for p in range(20))]
    assert [s for i, s in enumerate(by_shard) if i == 0 or s != by_shard[i - 1]] == list(dict.fromkeys(by_shard))


def test_each_pass_reads_the_shards_in_an_order_of_its_own():
    """Shards are read whole here (a window of one sample is one shard): the order of the shards themselves, not only
    of the samples, changes from pass to pass."""
    order = CacheOrder([2] * 8, seed=3, shuffle_window=1)
    shard_orders = [list(dict.fromkeys(order.locate(p)[0] for p in range(16 * k, 16 * (k + 1)))) for k in range(3)]
    assert all(sorted(shards) == list(range(8)) for shards in shard_orders)
    assert len({tuple(shards) for shards in shard_orders}) == 3


def test_each_pass_shuffles_a_window_afresh():
    order = CacheOrder([12], seed=3, shuffle_window=100)  # one shard, one window: only the window's shuffle varies
    passes = [[order.locate(p)[1] for p in range(12 * k, 12 * (k + 1))] for k in range(3)]
    assert all(sorted(members) == list(range(12)) for members in passes)
    assert len({tuple(members) for members in passes}) == 3


def test_shard_sample_count_is_what_webdataset_reads(tmp_path, write_cache):
    cache = write_cache(tmp_path / "cache", [3, 1, 4])
    assert [shard_sample_count(s) for s in sorted(cache.glob("*.tar"))] == [3, 1, 4]
    assert [len(read_metadata(s)) for s in sorted(cache.glob("*.tar"))] == [3, 1, 4]


def test_cache_batches_resume_exactly_whatever_the_worker_count(tmp_path, write_cache):
    cache = write_cache(tmp_path / "cache", [3, 5, 4, 2, 6])  # 20 samples
    source = CachedBatches(cache, _random_crop_and_flip(), 4, seed=7, shuffle_window=5)
    head = _take(source, 5)
    every_key = [f"{shard.stem}/{m['sample_id']:012d}" for shard in cache.glob("*.tar") for m in read_metadata(shard)]
    assert sorted(key for batch in head for key in batch[2]) == sorted(every_key)  # one pass: every sample once
    state = source.state_dict()
    tail = _take(source, 7)  # into the second and third pass
    assert all(batch[0].shape == (4, 3, 8, 8) and batch[1].tolist() == [int(k[-12:]) % 3 for k in batch[2]]
               for batch in head + tail)

    resumed = CachedBatches(cache, _random_crop_and_flip(), 4, seed=7, shuffle_window=5, num_workers=2)
    resumed.load_state_dict(state)
    assert _same_batches(_take(resumed, 7), tail)  # keys, labels and augmented pixels
    two_workers = CachedBatches(cache, _random_crop_and_flip(), 4, seed=7, shuffle_window=5, num_workers=2)
    assert _same_batches(_take(two_workers, 12), head + tail)


def test_cache_ranks_read_disjoint_shares_of_each_pass(tmp_path, write_cache):
    cache = write_cache(tmp_path / "cache", [3, 5, 4, 2, 6])
    keys = [key for rank in (0, 1) for batch in _take(CachedBatches(cache, _random_crop_and_flip(), 2, seed=7,
                                                                    rank=rank, world=2), 5) for key in batch[2]]
    assert len(keys) == len(set(keys)) == 20


def test_a_changed_cache_or_setting_is_a_clear_resume_error(tmp_path, write_cache):
    cache = write_cache(tmp_path / "cache", [3, 5])
    source = CachedBatches(cache, _random_crop_and_flip(), 4)
    _take(source, 1)
    state = source.state_dict()
    with pytest.raises(ResumeError, match="batch_size was 4, now 2. Resume with the saved settings"):
        CachedBatches(cache, _random_crop_and_flip(), 2).load_state_dict(state)
    sorted(cache.glob("*.tar"))[0].unlink()
    with pytest.raises(ResumeError, match="has lost 1 of the shards the checkpoint was written with .*: resume with "
                                          "the same cache folder, or start a new run without --resume"):
        CachedBatches(cache, _random_crop_and_flip(), 4).load_state_dict(state)


def test_a_cache_that_grew_resumes_exactly_over_the_shards_it_had(tmp_path, write_cache):
    cache = write_cache(tmp_path / "cache", [3, 5])
    uninterrupted = _take(CachedBatches(cache, _random_crop_and_flip(), 2, seed=1), 10)
    source = CachedBatches(cache, _random_crop_and_flip(), 2, seed=1)
    _take(source, 4)
    state = source.state_dict()
    write_cache(cache, [4], first_id=100)  # a job still filling the cache added a shard
    resumed = CachedBatches(cache, _random_crop_and_flip(), 2, seed=1)
    assert len(resumed.shards) == 3
    resumed.load_state_dict(state)
    assert len(resumed.shards) == 2 and _same_batches(_take(resumed, 6), uninterrupted[4:])


@pytest.fixture
def image_folder(tmp_path, write_image_folder):
    """(Re)writes tmp_path/train with `images_per_class[c]` images in class folder c; returns it as an ImageFolder."""
    def write(images_per_class: list[int]) -> ImageFolder:
        root = write_image_folder(tmp_path / "train", {f"class{c}": n for c, n in enumerate(images_per_class)})
        return ImageFolder(root, transform=_random_crop_and_flip(from_pil=True))

    return write


def test_real_batches_follow_distributed_sampler_epochs(image_folder):
    folder = image_folder([4, 4, 3])  # 11 images: 6 per rank (DistributedSampler pads), 3 batches of 2
    for rank in (0, 1):
        indices = [i for batch in _take(RealBatches(folder, 2, seed=5, rank=rank, world=2), 9)
                   for i in batch[2].tolist()]
        for epoch in range(3):
            sampler = DistributedSampler(folder, num_replicas=2, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            assert indices[epoch * 6:(epoch + 1) * 6] == list(sampler)


def _augmented_by_key(batches: list) -> dict:
    seen: dict = {}
    for images, _, keys in batches:
        for image, key in zip(images, list(keys.tolist() if isinstance(keys, torch.Tensor) else keys)):
            seen.setdefault(key, []).append(image)
    return seen


def test_a_real_image_is_augmented_afresh_in_every_epoch(image_folder):
    folder = image_folder([2, 2])  # 4 images, 2 batches of 2 per epoch
    seen = _augmented_by_key(_take(RealBatches(folder, 2, seed=5), 6))  # three epochs
    assert sorted(seen) == [0, 1, 2, 3] and all(len(uses) == 3 for uses in seen.values())
    assert all(not torch.equal(uses[0], uses[1]) and not torch.equal(uses[1], uses[2]) for uses in seen.values())


def test_a_cached_sample_is_augmented_afresh_in_every_pass(tmp_path, write_cache):
    cache = write_cache(tmp_path / "cache", [3, 3])
    seen = _augmented_by_key(_take(CachedBatches(cache, _random_crop_and_flip(), 3, seed=7), 6))  # three passes
    assert len(seen) == 6 and all(len(uses) == 3 for uses in seen.values())
    assert all(not torch.equal(uses[0], uses[1]) and not torch.equal(uses[1], uses[2]) for uses in seen.values())


def test_real_batches_resume_exactly_whatever_the_worker_count(image_folder):
    folder = image_folder([4, 3])  # 7 images: 2 batches of 3 per epoch, one image left out (drop_last)
    source = RealBatches(folder, 3, seed=5)
    _take(source, 3)  # into the second epoch
    state = source.state_dict()
    tail = _take(source, 4)
    resumed = RealBatches(folder, 3, seed=5, num_workers=2)
    resumed.load_state_dict(state)
    assert _same_batches(_take(resumed, 4), tail)
    assert [b[1].tolist() for b in tail] == [[folder.targets[i] for i in b[2].tolist()] for b in tail]

    grown = image_folder([4, 4])
    with pytest.raises(ResumeError, match="now holds 8 images, the checkpoint was written with 7: resume with the "
                                          "same --train-dir folder"):
        RealBatches(grown, 3, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="less than one batch of 9"):
        RealBatches(folder, 9)
