"""`MixedBatches`: the trainer's data as one object: fresh synthetic, cached and real batches, mixed by weight.

Each draw takes its batch from one source, chosen by a coin seeded with (seed, draw index), so the mix is a pure
function of the draw count and a resumed run replays it. The state is the draw count and each source's own state
(`state_dict()` / `load_state_dict()`), so a training loop needs nothing but `next(data)` and the state dicts.
"""

from __future__ import annotations

import bisect
from typing import Iterator, Protocol

from ..seeding import derive_seed


class BatchSource(Protocol):
    """An endless iterator of (images, labels, keys) batches that can save and restore its position."""

    def __next__(self) -> tuple: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EpochsInARow:
    """A loader iterated one epoch per pass (e.g. `StreamLoader`) as one endless source with the loader's state."""

    def __init__(self, loader):
        self.loader = loader
        self._batches: Iterator | None = None

    def __iter__(self) -> "EpochsInARow":
        return self

    def __next__(self) -> tuple:
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._batches = None


def mix_weights(spec: str | None, names: list[str]) -> dict[str, float]:
    """Per-source weights from 'name=weight,...' (default: equal), normalised to sum to one."""
    weights = dict.fromkeys(names, 1.0)
    for part in (spec.split(",") if spec else []):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in weights:
            raise ValueError(f"--mix names {name!r}, but the enabled sources are {names}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--mix {spec!r}: the weight of {name} is not a number") from None
        if weights[name] < 0:
            raise ValueError(f"--mix {spec!r}: the weight of {name} is negative")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"--mix {spec!r} gives every source weight zero")
    return {name: weight / total for name, weight in weights.items()}


class MixedBatches:
    """Draws `(source name, (images, labels, keys))` from `sources` with probabilities `weights`.

    `class_ids` are the classes the labels of every source index; the caller checks the sources agree on them.
    """

    def __init__(self, sources: dict[str, BatchSource], weights: dict[str, float], seed: int, class_ids: list[str]):
        if not sources:
            raise ValueError("no data source: enable at least one")
        self.sources, self.seed, self.class_ids = sources, seed, list(class_ids)
        self.names = list(sources)
        self.weights = [weights[name] for name in self.names]
        self._cumulative = [sum(self.weights[:i + 1]) for i in range(len(self.names))]
        self.draws = 0

    def __iter__(self) -> "MixedBatches":
        return self

    def __next__(self) -> tuple[str, tuple]:
        u = derive_seed(self.seed, "mix", self.draws) / 2**63
        name = self.names[min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)]
        batch = next(self.sources[name])
        self.draws += 1
        return name, batch

    def state_dict(self) -> dict:
        return {"draws": self.draws, "sources": {name: source.state_dict() for name, source in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the saved draw; a source the checkpoint does not know is a `ValueError`."""
        missing = [name for name in self.names if name not in state["sources"]]
        if missing:
            raise ValueError(f"the checkpoint holds no position of the {', '.join(missing)} source(s): resume with "
                             f"the sources it was written with ({', '.join(state['sources'])})")
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
        self.draws = state["draws"]
