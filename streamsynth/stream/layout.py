"""Which sample goes where: the stream's layout as one frozen value with pure functions on it.

Iteration, resume, restarts and audits all read this one value, so they cannot disagree.

- A *group* is one generation batch: the global batch of `batch_size x world_size` new images. Group g of epoch e
  holds the sample ids
      e * S + g * GB + [0, GB),        GB = batch_size * world_size,   S = groups_per_epoch * GB
  and rank r makes and receives the slice r * batch_size + [0, batch_size) of it. Ids never repeat across ranks,
  groups or epochs, and a sample is a pure function of (seed, sample id).
- With `replay = k`, global batch t of an epoch is use t mod k of group t div k: the k batches of a group hold the
  same images, each batch every one of them once, each use freshly augmented. Only the current group is held in
  memory. (Uses of one image are therefore never in the same batch, which keeps batch statistics honest.)
- The global sequence of batches thus depends on the seed, the epoch size, the replay factor and the *global* batch
  size only: resuming with another number of loader workers, or another number of ranks with the same global batch,
  continues it exactly. Which loader worker makes a group is decided where groups are consumed (`worker_groups`),
  never here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamLayout:
    """The stream's layout; `rank` says which slice of each global batch this process receives."""

    seed: int
    epoch_size: int  # trainer samples per epoch over all ranks, replays included
    batch_size: int  # per rank
    replay: int = 1
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.replay < 1:
            raise ValueError(f"replay must be at least 1 (each image used once), got {self.replay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")
        if self.groups_per_epoch == 0:
            raise ValueError(
                f"epoch_size {self.epoch_size} is smaller than one global batch ({self.batch_size} per rank x "
                f"{self.world_size} rank(s), each image used {self.replay} time(s)): raise epoch_size or lower the "
                "batch size"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def groups_per_epoch(self) -> int:
        return math.ceil(self.epoch_size / self.replay) // self.global_batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on every rank (equal to the global batches per epoch)."""
        return self.groups_per_epoch * self.replay

    @property
    def generated_per_epoch(self) -> int:
        """New images per epoch over all ranks."""
        return self.groups_per_epoch * self.global_batch_size

    def group_sample_ids(self, epoch: int, group: int) -> range:
        """This rank's sample ids of group `group` of epoch `epoch`."""
        first = epoch * self.generated_per_epoch + group * self.global_batch_size + self.rank * self.batch_size
        return range(first, first + self.batch_size)

    def batch_sample_ids(self, epoch: int, batch: int) -> tuple[range, int]:
        """This rank's (sample ids, use) of batch `batch` of epoch `epoch`."""
        group, use = divmod(batch, self.replay)
        return self.group_sample_ids(epoch, group), use

    # Groups counted across epochs: index i is group i mod G of epoch i div G (G groups per epoch).
    def group_index(self, epoch: int, group: int) -> int:
        return epoch * self.groups_per_epoch + group

    def group_at(self, index: int) -> tuple[int, int]:
        """(epoch, group) of a group index."""
        return divmod(index, self.groups_per_epoch)

    def sequence_key(self) -> dict:
        """What the global sequence of samples depends on: a resumed run must match it to continue it exactly."""
        return {"seed": self.seed, "epoch_size": self.epoch_size, "replay": self.replay,
                "global_batch_size": self.global_batch_size}

    def check_resumable(self, saved: dict) -> None:
        """Raise a `ValueError` naming every difference between `saved` (a `sequence_key`) and this layout's."""
        mine = self.sequence_key()
        diff = [f"{key} was {saved.get(key)}, now {value}" for key, value in mine.items() if saved.get(key) != value]
        if diff:
            raise ValueError(
                f"cannot resume the stream exactly: {', '.join(diff)}. Resume with the saved settings (another "
                "number of workers or ranks is fine if the global batch size stays the same), or start afresh"
            )


def worker_groups(first: int, worker: int, num_workers: int, stop: int | None = None) -> range:
    """The group indices loader worker `worker` of `num_workers` makes, from group index `first` on.

    Groups are dealt round-robin, which is the order in which a `DataLoader` reads its workers, so they arrive in
    order whatever the number of workers. `stop=None` makes the range endless for all practical purposes.
    """
    return range(first + worker, stop if stop is not None else 2**62, num_workers)
