"""`StreamLoader`: a `DataLoader` over a `SyntheticStream` that survives worker faults and resumes exactly.

Because every trainer batch is a pure function of (seed, epoch, batch index, layout), the loader's whole state is
two integers. That makes three things simple:
- resume: `state_dict()` → checkpoint → `load_state_dict()` restarts at the next undelivered batch;
- faults: if a worker raises or dies, the DataLoader is rebuilt at the next undelivered batch, so nothing already
  delivered is repeated and nothing is skipped; a batch that keeps failing ends the run with its cause;
- epochs: each pass ends by moving the stream to the next epoch, so a caller that never calls `set_epoch` still
  gets fresh samples; with `feedback`, each epoch starts with class weights from the losses the trainer reported.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Iterator

from torch.utils.data import DataLoader

from ..captions.store import CaptionStoreError
from ..synth.loading import ModelLoadError
from .dataset import SyntheticStream
from .feedback import ClassFeedback, SharedClassWeights
from .metrics import WorkerStats, peak_memory_kind

log = logging.getLogger(__name__)


class StreamLoader:
    """Iterates batches of a `SyntheticStream` through a `DataLoader` with `num_workers` synthesis workers.

    Workers use the spawn start method when any synthesis device is CUDA (CUDA cannot be used after fork), keep
    their model between epochs (`persistent_workers`), and each prefetch at most `prefetch_factor` batches, which
    bounds memory. `max_restarts` is how often in a row the same batch may fail before the error is raised.
    A worker that delivers nothing for `timeout` seconds (hung, not dead: PyTorch notices dead workers by itself)
    counts as failed; the default leaves room for a slow first model load or compilation.
    """

    def __init__(
        self,
        stream: SyntheticStream,
        batch_size: int,
        num_workers: int = 0,
        *,
        prefetch_factor: int | None = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        max_restarts: int = 3,
        timeout: float = 1800,
        multiprocessing_context: str | None = None,
        feedback: ClassFeedback | None = None,
    ):
        stream.configure(batch_size, num_workers)
        if multiprocessing_context is None and num_workers > 0 and any(str(d).startswith("cuda") for d in stream.devices):
            multiprocessing_context = "spawn"
        self.dataset = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_restarts = max_restarts
        self._loader_kwargs = {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "timeout": timeout if num_workers > 0 else 0,
            "multiprocessing_context": multiprocessing_context if num_workers > 0 else None,
            "prefetch_factor": prefetch_factor if num_workers > 0 else None,
            "persistent_workers": persistent_workers and num_workers > 0,
        }
        self.stats = WorkerStats(max(1, num_workers), multiprocessing_context)
        stream.stats = self.stats
        self.feedback = feedback
        if feedback is not None:
            stream.shared_class_weights = SharedClassWeights(stream.num_classes, multiprocessing_context)
        stream.loader_ref = weakref.ref(self)
        self._loader: DataLoader | None = None
        self._workers_next_epoch: int | None = None  # where persistent workers will start without a rebuild
        self.batch = 0  # batches of the current epoch already delivered
        self.restarts = 0
        self._wait_s = 0.0
        self._started = time.perf_counter()
        self._batches_at_build = 0
        self._delivered_since_build = 0

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.dataset.epoch:
            self.dataset.set_epoch(epoch)
            self.batch = 0

    def state_dict(self) -> dict:
        state = {"epoch": self.dataset.epoch, "batch": self.batch, "layout": self.dataset.layout(),
                 "class_weights": self.dataset.class_weights}
        if self.feedback is not None:
            state["feedback"] = self.feedback.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.dataset._check_layout(state["layout"])
        self.dataset.set_epoch(state["epoch"])
        self.dataset.set_class_weights(state["class_weights"])
        if self.feedback is not None and "feedback" in state:
            self.feedback.load_state_dict(state["feedback"])
        self.batch = state["batch"]
        self._discard()

    def _iterator(self) -> Iterator:
        reusable = (self._loader is not None and self.batch == 0 and self._workers_next_epoch == self.dataset.epoch)
        if not reusable:
            self._discard()
            self.dataset.resume_at(self.dataset.epoch, self.batch)
            self._loader = DataLoader(self.dataset, **self._loader_kwargs)
        self._batches_at_build = self.stats.batches_made()
        self._delivered_since_build = 0
        return iter(self._loader)

    def _discard(self) -> None:
        # Dropping the DataLoader shuts its workers down.
        self._loader, self._workers_next_epoch = None, None

    def __iter__(self) -> Iterator:
        epoch, failures = self.dataset.epoch, 0
        if self.feedback is not None and self.batch == 0:
            self.dataset.set_class_weights(self.feedback.next_weights())
        while self.batch < len(self):
            batches = self._iterator()
            try:
                while self.batch < len(self):
                    waited = time.perf_counter()
                    batch = next(batches)
                    self._wait_s += time.perf_counter() - waited
                    self.batch += 1
                    self._delivered_since_build += 1
                    failures = 0
                    yield batch
            except StopIteration:
                raise RuntimeError(
                    f"the stream ended after {self.batch} of {len(self)} batches: its worker layout changed "
                    "under the loader (configure it through stream.loader())"
                ) from None
            except (ModelLoadError, CaptionStoreError):
                self._discard()
                raise  # a wrong path or model stays wrong: restarting cannot help
            except Exception as err:
                failures += 1
                self._discard()
                # A worker's exception arrives wrapped with its traceback; its last line says what went wrong.
                cause = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                if failures > self.max_restarts:
                    raise RuntimeError(
                        f"batch {self.batch} of epoch {epoch} failed {failures} times in a row; last error: {cause}"
                    ) from err
                self.restarts += 1
                log.warning("synthesis worker failed at batch %d of epoch %d (%s); restarting the workers there "
                            "(restart %d)", self.batch, epoch, cause, self.restarts)
        # Workers that ran their share to the end have moved to the next epoch on their own.
        self._workers_next_epoch = epoch + 1 if self._loader_kwargs["persistent_workers"] else None
        self.dataset.set_epoch(epoch + 1)
        self.batch = 0

    def metrics(self) -> dict:
        """Images/s and peak memory per worker, batches waiting in the queue, the share of time the trainer waited."""
        wall = time.perf_counter() - self._started
        workers = []
        for i, row in enumerate(self.stats.rows()):
            device = self.dataset.devices[i % len(self.dataset.devices)]
            rate = row["images"] / row["busy_s"] if row["busy_s"] else 0.0
            workers.append({"worker": i, "device": device, "images": int(row["images"]), "images_per_s": rate,
                            "peak_memory_bytes": int(row["peak_memory_bytes"]),
                            "peak_memory_kind": peak_memory_kind(device)})
        queued = self.stats.batches_made() - self._batches_at_build - self._delivered_since_build
        return {
            "epoch": self.dataset.epoch,
            "batch": self.batch,
            "restarts": self.restarts,
            "queue_depth": max(0, queued),
            "data_wait_share": self._wait_s / wall if wall else 0.0,
            "workers": workers,
        }
