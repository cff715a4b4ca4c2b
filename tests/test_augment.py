"""Batched augmentation: each image's crop box and flip are a pure function of its seed, the batch equals the same
boxes applied one image at a time, and a stream that augments in batches resumes bit-identically in bounded memory."""

from __future__ import annotations

import pytest
import torch

from streamsynth import StreamLoader, SyntheticStream
from streamsynth.transforms import BatchAugment


@pytest.mark.parametrize("size, height, width", [(24, 32, 32), (64, 48, 80), (32, 16, 16)])
def test_a_batch_equals_its_per_image_reference(size, height, width):
    augment = BatchAugment(size)
    images = torch.randint(0, 256, (12, 3, height, width), dtype=torch.uint8)
    seeds = list(range(40, 52))
    reference = torch.stack([augment.reference(image, seed) for image, seed in zip(images, seeds)])
    boxes = torch.tensor([augment.params(seed, height, width) for seed in seeds])
    batched = augment._normalize(augment._crop_batched(images, boxes))  # the GPU path, run here on the CPU
    assert batched.shape == (12, 3, size, size) and batched.is_contiguous()
    assert (batched - reference).abs().max() < 1e-4
    one_level = 1 / 255 / min(augment.std)  # the CPU path resizes in uint8: at most one grey level apart
    assert (augment(images, seeds) - reference).abs().max() <= one_level + 1e-5


def test_boxes_and_flips_are_pure_functions_of_the_seed_and_vary_with_it():
    augment = BatchAugment(32)
    boxes = [augment.params(seed, 100, 60) for seed in range(400)]
    assert boxes == [augment.params(seed, 100, 60) for seed in range(400)]
    assert all(0 <= top and top + h <= 100 and 0 <= left and left + w <= 60 for top, left, h, w, _ in boxes)
    areas = [h * w / 6000 for _, _, h, w, _ in boxes]
    assert 0.3 < min(areas) and max(areas) <= 1.0 and len(set(boxes)) > 390
    assert 150 < sum(flip for *_, flip in boxes) < 250
    assert not any(flip for *_, flip in (BatchAugment(32, flip=False).params(s, 100, 60) for s in range(50)))


def test_replayed_batches_resume_bit_identically_in_bounded_memory(caption_store, small_generator):
    def make(**kwargs):
        stream = SyntheticStream(caption_store, small_generator, epoch_size=32, batch_size=4, replay=4,
                                 transform=BatchAugment(12), return_sample_ids=True)
        return StreamLoader(stream, num_workers=2, prefetch_factor=2, **kwargs)

    reference = list(make())
    loader = make()
    batches = iter(loader)
    first = [next(batches) for _ in range(6)]  # stops inside the second group (uses 0, 1 of group 1)
    metrics = loader.metrics()
    assert metrics["buffered_groups"] <= 2 * 2 + 1  # one group in hand, at most prefetch x workers queued
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(first) + len(rest) == len(reference) == 8
    for mine, theirs in zip(first + rest, reference):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[2], theirs[2])
    assert [b[2].tolist() for b in reference[:4]] == [[0, 1, 2, 3]] * 4  # a group's k uses, in a row
    assert not torch.equal(reference[0][0], reference[1][0])  # each use augmented afresh


def test_the_normalisation_is_imagenets_computed_by_hand():
    """A crop that is the whole square image, unflipped, leaves the pixels as they are: the output must then be
    (x / 255 - mean) / std with ImageNet's published statistics, written out here rather than taken from
    streamsynth."""
    augment = BatchAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
    expected = (images.double() / 255 - mean) / std
    assert (augment(images, [1, 2, 3]).double() - expected).abs().max() < 1e-5
    assert (augment.reference(images[0], 1).double() - expected[0]).abs().max() < 1e-5
    plain = BatchAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, mean=None, std=None)
    assert (plain(images, [1, 2, 3]).double() - images.double() / 255).abs().max() < 1e-6
