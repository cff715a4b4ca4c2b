"""SyntheticStream: a sample is a pure function of (run seed, sample id); the loader order ignores worker count."""

from __future__ import annotations

import pytest
import torch

from streamsynth import SynthesisConfig, SyntheticStream
from streamsynth.stream import CaptionSampler, keyed_permutation
from streamsynth.prompts import prompt_template

FAST = SynthesisConfig(num_inference_steps=2)


def _stream(caption_store, tiny_model, **kwargs) -> SyntheticStream:
    kwargs = {"image_size": 16, "devices": ["cpu"], "synthesis": FAST, "synth_batch_size": 4, **kwargs}
    return SyntheticStream(caption_store, tiny_model, **kwargs)


@pytest.mark.parametrize("n", [1, 2, 7, 60, 1000])
def test_keyed_permutation_is_a_bijection(n):
    for key in (0, 12345):
        assert sorted(keyed_permutation(i, n, key) for i in range(n)) == list(range(n))
    if n > 10:
        assert [keyed_permutation(i, n, 1) for i in range(n)] != [keyed_permutation(i, n, 2) for i in range(n)]


def test_each_pass_visits_every_caption_once(caption_store):
    sampler = CaptionSampler(caption_store, prompt_template("cip"), run_seed=3)
    n = sampler.num_captions
    every = {(c.index, i) for c in caption_store.classes for i in range(c.num_captions)}
    first = [sampler.locate(i) for i in range(n)]
    second = [sampler.locate(i) for i in range(n, 2 * n)]
    assert set(first) == set(second) == every
    assert first != second


def test_a_sample_is_a_pure_function_of_seed_and_id(caption_store):
    a = CaptionSampler(caption_store, prompt_template("cip"), run_seed=7)
    b = CaptionSampler(caption_store, prompt_template("cip"), run_seed=7)
    c = CaptionSampler(caption_store, prompt_template("cip"), run_seed=8)
    assert [a(i) for i in range(200)] == [b(i) for i in range(200)]
    assert [a(i).seed for i in range(20)] != [c(i).seed for i in range(20)]
    assert len({a(i).seed for i in range(200)}) == 200


def test_prompts_follow_the_strategy(caption_store):
    spec = CaptionSampler(caption_store, prompt_template("cip"))(0)
    name = caption_store.classes[spec.label].name
    assert spec.prompt == f"a photo of {name}, {spec.caption}" and spec.caption
    assert CaptionSampler(caption_store, prompt_template("basic"))(0).prompt == f"a photo of {name}"
    assert CaptionSampler(caption_store, prompt_template("a sketch of {name}"))(0).prompt == f"a sketch of {name}"
    with pytest.raises(ValueError, match="unknown prompt strategy"):
        prompt_template("fancy")


def test_sample_ids_are_unique_and_gap_free_across_ranks_and_epochs(caption_store, tiny_model):
    ranks = [_stream(caption_store, tiny_model, epoch_size=40, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == 20 and ranks[0].batches_per_epoch == 5
    seen = [i for epoch in (0, 1, 2) for s in ranks for b in range(s.batches_per_epoch)
            for i, _ in s.batch_items(epoch, b)]
    assert sorted(seen) == list(range(120))


def _collect(loader, epoch: int = 0):
    loader.set_epoch(epoch)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def test_loader_batches_do_not_depend_on_the_worker_count(caption_store, tiny_model):
    single = _stream(caption_store, tiny_model, epoch_size=24).loader(batch_size=4, num_workers=0)
    double = _stream(caption_store, tiny_model, epoch_size=24).loader(batch_size=4, num_workers=2)
    assert len(single) == len(double) == 6
    images_0, labels_0 = _collect(single)
    images_2, labels_2 = _collect(double)
    assert images_0.shape == (24, 3, 16, 16) and images_0.dtype == torch.float32
    assert torch.equal(labels_0, labels_2)
    # uint8 images, normalised: a rounding flip of one level is 1/255/std ≈ 0.017
    assert (images_0 - images_2).abs().max().item() < 0.05
    expected = [single.dataset.spec(i).label for i in range(24)]
    assert labels_0.tolist() == expected


def test_each_epoch_brings_fresh_samples(caption_store, tiny_model):
    loader = _stream(caption_store, tiny_model, epoch_size=8).loader(batch_size=4)
    images_a, _ = _collect(loader, epoch=0)
    images_b, _ = _collect(loader, epoch=1)
    again, _ = _collect(loader, epoch=0)
    assert (images_a - images_b).abs().max() > 0.5
    assert (images_a - again).abs().max() < 0.05


def test_epoch_smaller_than_a_batch_is_refused(caption_store, tiny_model):
    with pytest.raises(ValueError, match="smaller than one batch"):
        _stream(caption_store, tiny_model, epoch_size=3).loader(batch_size=4)
    with pytest.raises(ValueError, match="worker count"):
        _stream(caption_store, tiny_model, epoch_size=8).loader(batch_size=4, num_workers=3)


def test_describe_says_when_weights_are_random(caption_store, tiny_model):
    info = _stream(caption_store, tiny_model).describe()
    assert info["random_weights"] is True and info["num_classes"] == 10 and info["epoch_size"] == 60


def test_fast_path_stream_matches_the_plain_one(caption_store, tiny_model):
    from streamsynth.synth.fast import FastPathOptions

    # One batch: under the test session's Triton interpreter the fused kernels are slow.
    plain = _stream(caption_store, tiny_model, epoch_size=4).loader(batch_size=4)
    fast = _stream(caption_store, tiny_model, epoch_size=4, fast=FastPathOptions()).loader(batch_size=4)
    images_plain, labels_plain = _collect(plain)
    images_fast, labels_fast = _collect(fast)
    assert torch.equal(labels_plain, labels_fast)
    assert (images_plain - images_fast).abs().max().item() < 0.05
