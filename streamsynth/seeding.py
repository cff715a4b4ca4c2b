"""Seeds and keyed shuffles that are pure functions of their inputs: the bottom layer every other module uses.

Everything random in streamsynth (a sample's class and caption, its noise, its augmentation, the order of cached and
real images) is derived here from the run seed and integers, so any process on any machine computes the same value
without coordination. Seeds come from `hashlib.blake2b` rather than Python's `hash`, which differs between processes;
shuffles are keyed bijections rather than `torch.randperm` tables, so that no N-sized table is built or kept.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of `parts`, the same in every process and on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded(seed: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` under torch's, Python's and NumPy's global RNGs seeded from `seed` (and restored after): a random
    augmentation becomes a pure function of the seed, whichever process or worker runs it and whatever ran there
    before, whether it draws from torch (torchvision) or from Python's `random` (timm's transforms)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return fn(*args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _round_hash(key: int, round_: int, value: int, bits: int) -> int:
    digest = hashlib.blake2b(f"{key}:{round_}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def keyed_permutation(index: int, n: int, key: int, rounds: int = 4) -> int:
    """The image of `index` under a pseudo-random bijection of [0, n) chosen by `key`.

    A balanced Feistel network permutes [0, 4^k) ⊇ [0, n); cycle-walking (re-applying it until the value lands
    below n) restricts it to a bijection of [0, n). Each call costs O(rounds) hashes and no memory.
    """
    return _feistel_cycle_walk("index", index, n, key, rounds, inverse=False)


def keyed_permutation_inverse(value: int, n: int, key: int, rounds: int = 4) -> int:
    """The index that `keyed_permutation` maps to `value`: its inverse, at the same cost.

    Each Feistel round is undone in reverse order; cycle-walking backwards from `value` meets the first point below n,
    which is the index (the forward walk left [0, n) only through points at or above n).
    """
    return _feistel_cycle_walk("value", value, n, key, rounds, inverse=True)


def _feistel_cycle_walk(name: str, start: int, n: int, key: int, rounds: int, inverse: bool) -> int:
    if not 0 <= start < n:
        raise IndexError(f"{name} {start} outside [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = start
    while True:
        left, right = x >> half, x & mask
        if inverse:
            for r in reversed(range(rounds)):
                left, right = right ^ _round_hash(key, r, left, half), left
        else:
            for r in range(rounds):
                left, right = right, left ^ _round_hash(key, r, right, half)
        x = (left << half) | right
        if x < n:
            return x
