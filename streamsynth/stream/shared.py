"""Small values that the trainer's process shares with loader workers through shared memory.

Each is created before the workers start and travels to them with the dataset, so it works with fork and spawn
alike. None takes a lock (a lock is tied to one start method, and the start method is the `DataLoader`'s choice):
every value has one writer, or its writers write the same thing.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time


def _shared_array(typecode: str, size: int):
    return mp.get_context().Array(typecode, size, lock=False)


class PassClock:
    """Which epoch a pass over the stream is, for loaders that know nothing of epochs (a plain `DataLoader`).

    `set_epoch(e)` makes the next pass epoch e; each later pass is one more. A pass is recognised by a key that all
    its workers share and that differs between passes: the loader's base seed (drawn anew for every iterator) with
    the number of passes this copy of the dataset has begun (which grows in persistent workers). The first worker
    of a new pass moves the clock on and the others, finding its key, follow; the value is one 64-bit word (key
    in the high half, epoch in the low half), so a reader never sees half a write.
    """

    _EPOCH_BITS = 31

    def __init__(self, epoch: int = 0):
        self._value = _shared_array("q", 1)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < 2**self._EPOCH_BITS:
            raise ValueError(f"epoch must be in [0, 2^31), got {epoch}")
        self._value[0] = epoch  # key 0: no pass has claimed it yet

    def epoch_of_pass(self, base_seed: int | None, passes_begun: int) -> int:
        """The epoch of the pass identified by (base seed, passes this dataset copy has begun)."""
        digest = hashlib.blake2b(f"{base_seed}:{passes_begun}".encode(), digest_size=4).digest()
        key = (int.from_bytes(digest, "little") & 0x7FFFFFFF) | 1  # never 0; 31 bits keep the word positive
        value = self._value[0]
        owner, epoch = value >> 32, value & ((1 << self._EPOCH_BITS) - 1)
        if owner == key:
            return epoch
        if owner != 0:
            epoch += 1
        self._value[0] = (key << 32) | epoch
        return epoch

    def claim(self, epoch: int) -> None:
        """After a restored pass in `epoch`: the next new pass is epoch + 1."""
        self._value[0] = (1 << 32) | epoch


class SharedClassWeights:
    """Class weights written by the trainer's process and read by loader workers when a pass begins."""

    def __init__(self, num_classes: int):
        self._values = _shared_array("d", num_classes + 1)  # last slot: 1.0 when weights are set

    def write(self, weights: list[float] | None) -> None:
        if weights is not None:
            self._values[:-1] = weights
        self._values[-1] = 0.0 if weights is None else 1.0

    def read(self) -> list[float] | None:
        return list(self._values[:-1]) if self._values[-1] else None


class EpochWeights:
    """The class weights of each epoch, published by the trainer when the epoch begins and awaited by workers.

    Weights may change only at an epoch boundary (feedback sampling computes them from the losses of the epoch
    before), so a worker that reaches the first group of an epoch waits until the trainer has published that epoch.
    The weights are written before the epoch number, and the trainer publishes epoch e + 1 only after every group
    of epoch e was delivered, so a worker that sees its epoch reads that epoch's weights.
    """

    def __init__(self, num_classes: int):
        self._values = _shared_array("d", num_classes + 2)  # [epoch, weights set?, w_0 .. w_{K-1}]
        self._values[0] = -1

    def publish(self, epoch: int, weights: list[float] | None) -> None:
        if weights is not None:
            self._values[2:] = weights
        self._values[1] = 0.0 if weights is None else 1.0
        self._values[0] = epoch

    def wait(self, epoch: int, poll_s: float = 0.02) -> list[float] | None:
        while (published := int(self._values[0])) < epoch:
            time.sleep(poll_s)
        if published != epoch:
            raise RuntimeError(f"a worker needs the class weights of epoch {epoch} but epoch {published} is published")
        return list(self._values[2:]) if self._values[1] else None
