"""Real images (an ImageFolder) as an endless, exactly resumable source of batches for one rank.

Epoch e visits this rank's share of the images in the order `DistributedSampler(seed=seed).set_epoch(e)` gives, in
whole batches (drop_last). Batch t is batch t mod E of epoch t div E (E batches per epoch), so resuming at batch t
computes that epoch's permutation and starts inside it: no skipped image is loaded. Each image is augmented under a
seed derived from its position in the rank's stream, so a resumed run's batches equal the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import math
import os
from itertools import count
from typing import TYPE_CHECKING, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..seeding import derive_seed, seeded
from .resumable import ResumableBatches, leave_interrupts_to_the_trainer

if TYPE_CHECKING:  # importing torchvision costs about 2 s (it loads torch._dynamo); only the annotations need it
    from torchvision.datasets import ImageFolder


def epoch_indices(num_images: int, seed: int, rank: int, world: int, epoch: int) -> list[int]:
    """This rank's image indices in epoch `epoch`: exactly those of `DistributedSampler(seed=seed).set_epoch(epoch)`."""
    sampler = DistributedSampler(range(num_images), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def batches_per_epoch(num_images: int, batch_size: int, world: int) -> int:
    """Whole batches in a rank's share of an epoch (`DistributedSampler` pads the share to ceil(n / world))."""
    batches = math.ceil(num_images / world) // batch_size
    if batches == 0:
        raise ValueError(f"{num_images} images over {world} rank(s) make less than one batch of {batch_size} per "
                         "rank: use a smaller batch size or more images")
    return batches


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (image index, position in the rank's stream), from batch `start_batch` on.

    The position travels with the index so that the dataset can seed the image's augmentation with it.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int, world: int, start_batch: int = 0):
        self.num_images, self.batch_size = num_images, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.start_batch = start_batch
        self.batches_per_epoch = batches_per_epoch(num_images, batch_size, world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first_epoch, first_batch = divmod(self.start_batch, self.batches_per_epoch)
        for epoch in count(first_epoch):
            indices = epoch_indices(self.num_images, self.seed, self.rank, self.world, epoch)
            for batch in range(first_batch if epoch == first_epoch else 0, self.batches_per_epoch):
                position = (epoch * self.batches_per_epoch + batch) * self.batch_size
                yield [(indices[batch * self.batch_size + i], position + i) for i in range(self.batch_size)]


class PositionSeeded(Dataset):
    """`dataset[index]` under a seed derived from (seed, rank, position), returned with its index as the key."""

    def __init__(self, dataset: Dataset, seed: int, rank: int):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, position = key
        image, label = seeded(derive_seed(self.seed, "real augment", self.rank, position), self.dataset.__getitem__,
                              index)
        return image, label, index


def folder_fingerprint(dataset: ImageFolder) -> dict:
    """The number of images and a digest of their paths (relative to the folder) and labels."""
    digest = hashlib.blake2b(digest_size=16)
    for path, label in dataset.samples:
        digest.update(f"{os.path.relpath(path, dataset.root)}\t{label}\n".encode())
    return {"images": len(dataset.samples), "digest": digest.hexdigest()}


class RealBatches(ResumableBatches):
    """An ImageFolder as endless (images, labels, indices) batches for one rank; the state is the batch count."""

    data_name = "--train-dir folder"

    def __init__(self, dataset: ImageFolder, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0):
        batches_per_epoch(len(dataset), batch_size, world)  # too few images fail now, not at the first real batch
        self.dataset = dataset
        self.batch_size, self.seed, self.rank, self.world, self.num_workers = batch_size, seed, rank, world, num_workers
        super().__init__(layout={"seed": seed, "batch_size": batch_size, "world_size": world, "rank": rank},
                         fingerprint=folder_fingerprint(dataset))

    def _loader_from(self, batch: int) -> DataLoader:
        sampler = EpochBatchSampler(len(self.dataset), self.batch_size, self.seed, self.rank, self.world, batch)
        return DataLoader(PositionSeeded(self.dataset, self.seed, self.rank), batch_sampler=sampler,
                          num_workers=self.num_workers, worker_init_fn=leave_interrupts_to_the_trainer)

    def _data_change(self, saved: dict) -> str | None:
        now = self.fingerprint
        if saved["images"] != now["images"]:
            return (f"the --train-dir folder {self.dataset.root} now holds {now['images']} images, the checkpoint "
                    f"was written with {saved['images']}")
        if saved["digest"] != now["digest"]:
            return (f"the --train-dir folder {self.dataset.root} holds other images than when the checkpoint was "
                    "written (the same number, other files or labels)")
        return None
