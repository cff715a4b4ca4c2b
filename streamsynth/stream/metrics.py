"""Counters that loader workers share with the trainer's process: images made, busy time, CPU time, peak memory,
heartbeat, and what steering cost them (images generated in all, the learner's forward passes, reading the learner's
hand-overs)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from contextlib import contextmanager
from typing import Iterator

_FIELDS = ("images", "busy_s", "peak_memory_bytes", "heartbeat", "cpu_s", "generated", "learner_s", "handover_s")


class WorkerStats:
    """A flat shared array, one row per loader worker; written by workers, read by `StreamLoader.metrics()`.

    Made before the workers start and handed to them with the dataset, so it works with fork and spawn alike.
    Each row has one writer, so no lock is needed.
    """

    def __init__(self, num_workers: int, context: str | None = None):
        ctx = mp.get_context(context)
        self.num_workers = num_workers
        self._values = ctx.Array("d", num_workers * len(_FIELDS), lock=False)

    def record(self, worker: int, images: int, busy_s: float, peak_memory_bytes: int, generated: int,
               learner_s: float = 0.0, handover_s: float = 0.0) -> None:
        """Worker `worker` made `images` in `busy_s` seconds, generating `generated`, with
        `learner_s` of the learner's forward passes and `handover_s` reading its weights; its process's CPU time so
        far is recorded with it."""
        row = worker * len(_FIELDS)
        self._values[row] += images
        self._values[row + 1] += busy_s
        self._values[row + 2] = max(self._values[row + 2], peak_memory_bytes)
        self._values[row + 4] = time.process_time()
        self._values[row + 5] += generated
        self._values[row + 6] += learner_s
        self._values[row + 7] += handover_s

    def beat(self, worker: int) -> None:
        """Worker `worker` made progress (started, loaded its model, finished a group)."""
        self._values[worker * len(_FIELDS) + 3] = time.monotonic()

    @contextmanager
    def beating(self, worker: int, every_s: float = 1.0) -> Iterator[None]:
        """Beat for `worker` every `every_s` seconds while the block runs: for one long library call (a model load)
        that makes progress the worker cannot report. A stopped process stops beating too."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(every_s):
                self.beat(worker)

        thread = threading.Thread(target=beat, daemon=True)
        self.beat(worker)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.beat(worker)

    def last_beat(self, worker: int) -> float:
        return self._values[worker * len(_FIELDS) + 3]

    def rows(self) -> list[dict[str, float]]:
        n = len(_FIELDS)
        return [dict(zip(_FIELDS, self._values[w * n:(w + 1) * n])) for w in range(self.num_workers)]

    def images_made(self) -> int:
        return int(sum(row["images"] for row in self.rows()))
