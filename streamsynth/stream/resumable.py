"""Endless batch sources that resume exactly from a counter: the cache (`cache.py`) and real images (`real.py`).

Batch t of such a source, on rank r, is a pure function of (run seed, r, t): which samples it holds, in which order,
and how each is augmented. Its whole state is therefore t, the number of batches the trainer has taken, plus the
settings and the data the order was computed from. Resuming builds a fresh `DataLoader` that starts at batch t by
index arithmetic: nothing before it is read or decoded, and the number of loader workers does not matter.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from typing import Iterable, Iterator


def leave_interrupts_to_the_trainer(worker_id: int | None = None) -> None:
    """A loader worker's `worker_init_fn`: Ctrl-C reaches every process of the terminal's group, and the trainer
    decides what it means (stop at the next step boundary and save), so a worker ignores it instead of dying."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ResumeError(ValueError):
    """A checkpoint's source state does not fit this run; the message names the difference and the fix."""


class ResumableBatches(ABC):
    """An endless iterator of batches whose state is the number of batches it delivered.

    Subclasses build the `DataLoader` that starts at a given batch (`_loader_from`) and say how the data the order
    was computed from differs from a checkpoint's (`_data_change`). `layout` holds the settings the order depends
    on; `fingerprint` describes the data (file names, counts), small enough for every checkpoint.
    """

    #: what the data is called in messages, e.g. "cache folder"
    data_name = "data"

    def __init__(self, layout: dict, fingerprint: dict):
        self.layout = layout
        self.fingerprint = fingerprint
        self.batch = 0  # batches delivered to the trainer
        self._batches: Iterator | None = None

    @abstractmethod
    def _loader_from(self, batch: int) -> Iterable:
        """Batches `batch`, `batch + 1`, ... (a `DataLoader`)."""

    @abstractmethod
    def _data_change(self, saved: dict) -> str | None:
        """How the data differs from `saved` (a fingerprint), in words; None when it is the same."""

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = iter(self._loader_from(self.batch))
        batch = next(self._batches)
        self.batch += 1
        return batch

    def state_dict(self) -> dict:
        return {"batch": self.batch, "layout": self.layout, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the checkpoint's next batch; a different layout or different data is a `ResumeError`."""
        fix = "or start a new run without --resume"
        changed = [f"{key} was {state['layout'].get(key)}, now {value}"
                   for key, value in self.layout.items() if state["layout"].get(key) != value]
        if changed:
            raise ResumeError(f"the {self.data_name} cannot resume exactly: {', '.join(changed)}. "
                              f"Resume with the saved settings, {fix}")
        change = self._data_change(state["fingerprint"])
        if change:
            raise ResumeError(f"{change}: resume with the same {self.data_name}, {fix}")
        self.batch = state["batch"]
        self._batches = None  # dropping the DataLoader shuts its workers down
