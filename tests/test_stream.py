"""SyntheticStream: a sample is a pure function of (run seed, sample id); the order ignores the loader and its workers."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import DataLoader

from streamsynth import StreamLoader, SyntheticStream
from streamsynth.prompts import prompt_template
from streamsynth.seeding import keyed_permutation
from streamsynth.stream import CaptionSampler, StreamLayout, SynthesisError, TransformError


def _stream(caption_store, generator, **kwargs) -> SyntheticStream:
    return SyntheticStream(caption_store, generator, **{"batch_size": 4, "return_sample_ids": True, **kwargs})


def _ids(batches) -> list[list[int]]:
    return [batch[2].tolist() for batch in batches]


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


def test_layout_ids_are_unique_gap_free_and_the_same_for_any_rank_count():
    def global_sequence(world: int, epochs: int = 3) -> list[list[tuple[int, int]]]:
        """Every global batch: the ranks' slices side by side, as (sample id, use)."""
        layouts = [StreamLayout(seed=0, epoch_size=48, batch_size=8 // world, replay=2, world_size=world, rank=r)
                   for r in range(world)]
        assert len({layout.batches_per_epoch for layout in layouts}) == 1
        batches = []
        for epoch in range(epochs):
            for t in range(layouts[0].batches_per_epoch):
                batches.append([(i, use) for layout in layouts for ids, use in [layout.batch_sample_ids(epoch, t)]
                                for i in ids])
        return batches

    one, two, four = global_sequence(1), global_sequence(2), global_sequence(4)
    assert one == two == four
    assert len(one) == 18 and sorted({i for batch in one for i, _ in batch}) == list(range(72))
    for batch in one:  # every image once per batch, each use in the batch the same
        assert len({i for i, _ in batch}) == 8 and len({use for _, use in batch}) == 1


def test_loader_batches_do_not_depend_on_the_worker_count_or_the_loader(caption_store, small_generator):
    stream = _stream(caption_store, small_generator, epoch_size=24)
    inline = list(StreamLoader(stream, num_workers=0))
    two = list(StreamLoader(_stream(caption_store, small_generator, epoch_size=24), num_workers=2))
    plain = list(DataLoader(_stream(caption_store, small_generator, epoch_size=24), batch_size=4, num_workers=2))
    assert _ids(inline) == _ids(two) == _ids(plain) == [list(range(i, i + 4)) for i in range(0, 24, 4)]
    images = torch.cat([b[0] for b in inline])
    assert images.shape == (24, 3, 16, 16) and images.dtype == torch.float32
    for other in (two, plain):
        assert torch.equal(torch.cat([b[1] for b in other]), torch.cat([b[1] for b in inline]))
        # uint8 images, normalised: a rounding flip of one level is 1/255/std ≈ 0.017
        assert (torch.cat([b[0] for b in other]) - images).abs().max().item() < 0.05
    assert torch.cat([b[1] for b in inline]).tolist() == [stream.spec(i).label for i in range(24)]


def test_a_plain_dataloader_needs_no_extra_call_and_moves_on_each_pass(caption_store, small_generator):
    stream = _stream(caption_store, small_generator, epoch_size=16)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=2)
    assert len(loader) == 4
    first, second = _ids(loader), _ids(loader)
    assert sorted(i for b in first for i in b) == list(range(16))
    assert sorted(i for b in second for i in b) == list(range(16, 32))  # the next epoch, without set_epoch
    partial = next(iter(loader))  # a pass broken off early still counts as a pass
    assert partial[2].tolist() == list(range(32, 36))
    stream.set_epoch(0)
    assert _ids(loader) == first
    persistent = DataLoader(_stream(caption_store, small_generator, epoch_size=16), batch_size=4, num_workers=2,
                            persistent_workers=True)
    assert _ids(persistent) == first and sorted(i for b in _ids(persistent) for i in b) == list(range(16, 32))


def test_each_epoch_brings_fresh_samples(caption_store, small_generator):
    loader = StreamLoader(_stream(caption_store, small_generator, epoch_size=8))
    epoch_a, epoch_b = list(loader), list(loader)
    loader.set_epoch(0)
    again = list(loader)
    assert (torch.cat([b[0] for b in epoch_a]) - torch.cat([b[0] for b in epoch_b])).abs().max() > 0.5
    assert _ids(again) == _ids(epoch_a) and _ids(epoch_b) == [[8, 9, 10, 11], [12, 13, 14, 15]]


def test_epoch_smaller_than_a_global_batch_is_refused(caption_store, small_generator):
    with pytest.raises(ValueError, match="smaller than one global batch"):
        _stream(caption_store, small_generator, epoch_size=3)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        _stream(caption_store, small_generator, epoch_size=6, rank=0, world_size=2)


def test_the_constructor_keeps_only_what_the_stream_owns():
    assert len(inspect.signature(SyntheticStream.__init__).parameters) - 1 <= 12  # self excluded


def test_describe_says_when_weights_are_random(caption_store, small_generator):
    info = _stream(caption_store, small_generator).describe()
    assert info["random_weights"] is True and info["num_classes"] == 10 and info["layout"]["epoch_size"] == 60


def test_a_transform_written_for_pil_images_works_and_a_broken_one_is_one_line(caption_store, small_generator):
    from torchvision import transforms

    pil = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    batch = next(iter(StreamLoader(_stream(caption_store, small_generator, epoch_size=4, transform=pil))))
    assert batch[0].shape == (4, 3, 16, 16) and 0 <= batch[0].min() and batch[0].max() <= 1

    def broken(image):
        raise TypeError("expected a float image")

    with pytest.raises(TransformError, match="fails on its uint8 .* and on PIL images too"):
        next(iter(DataLoader(_stream(caption_store, small_generator, epoch_size=4, transform=broken), batch_size=4)))
    with pytest.raises(SynthesisError, match="^TransformError: the stream's transform returned a Image, not a tensor"):
        next(iter(StreamLoader(_stream(caption_store, small_generator, epoch_size=4,
                                       transform=transforms.ToPILImage()))))


def test_fast_path_stream_matches_the_plain_one(caption_store, small_generator):
    from dataclasses import replace

    from streamsynth import FastPathOptions

    # One batch, and the fused step and post-processing but not the GroupNorm/GEGLU kernels: the options need only
    # reach the workers here (the kernels are checked against the plain path in test_fast), and under the test
    # session's Triton interpreter each of their many calls in a UNet is slow (minutes for this batch).
    options = FastPathOptions(triton_kernels=False)
    plain = list(StreamLoader(_stream(caption_store, small_generator, epoch_size=4)))
    fast = list(StreamLoader(_stream(caption_store, replace(small_generator, fast=options), epoch_size=4)))
    assert torch.equal(plain[0][1], fast[0][1])
    assert (plain[0][0] - fast[0][0]).abs().max().item() < 0.05
