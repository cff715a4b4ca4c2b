"""`StreamLoader`: a `SyntheticStream`'s batches through synthesis workers that may die, hang or stop at any moment.

Its workers hand over whole generation groups (a group's k replayed batches at once), so batch t of an epoch is the
layout's batch t for any number of workers, and the loader's whole state is (epoch, batch): `state_dict()` resumes
exactly on another number of workers, or of ranks with the same global batch size.

Faults are survived where the trainer is, not only while it waits for data:
- PyTorch's DataLoader raises from its SIGCHLD handler the moment a worker dies, wherever the trainer happens to be
  (in `backward()`, in `torch.save`); this loader takes its workers off that handler, notices a dead worker when it
  next waits for a group, and rebuilds its workers at the next undelivered group;
- a worker that makes no progress for `timeout` seconds while the trainer waits for its group (hung, or stopped
  with SIGSTOP, which also blocks the hand-over of a batch already queued) is killed by a watchdog and replaced
  the same way; progress is the worker's heartbeat when it starts, while its model loads and after each group;
- a worker reports its own errors as values: a deterministic one (the model does not load, the transform fails,
  the caption store is damaged) ends the run at once with its one-line cause and no worker traceback; any other
  (a CUDA out-of-memory, an I/O error) is retried, and a group that fails `max_restarts` times in a row ends the run.
Nothing delivered is repeated and nothing is skipped: a group is a pure function of its index.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..captions.store import CaptionStoreError
from ..errors import FileSizeLimitError, StreamsynthError
from ..limits import SharedCollate, SharedMemoryError, plan_workers
from ..synth.loading import ModelLoadError, preload_pipeline_library
from .dataset import SyntheticStream, worker_index_and_count
from .devices import CUDAAfterForkError
from .feedback import ClassFeedback
from .groups import GroupMaker, TransformError
from .handover import HandOverError
from .layout import StreamLayout, worker_groups
from .resumable import leave_interrupts_to_the_trainer
from ..peakmemory import peak_memory_bytes, peak_memory_kind
from .metrics import WorkerStats
from .shared import EpochWeights
from .steering import Steering

log = logging.getLogger(__name__)

# Errors that recur whenever the same group is made again: retrying cannot help.
DETERMINISTIC_ERRORS = (ModelLoadError, CaptionStoreError, TransformError, CUDAAfterForkError, SharedMemoryError,
                        FileSizeLimitError, HandOverError, ValueError, TypeError, KeyError, AttributeError,
                        NotImplementedError, ImportError)


class SynthesisError(StreamsynthError, RuntimeError):
    """Synthesis cannot go on: a deterministic error in a worker, or a group that kept failing."""


@dataclass(frozen=True)
class WorkerFailure:
    """What a worker hands over instead of a group when making it failed."""

    deterministic: bool
    message: str


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class GroupView(IterableDataset):
    """The groups of one rank's layout from group index `first` on, endlessly, one item per group.

    Worker w of W makes groups first + w, first + w + W, ... (see `worker_groups`). Before its first group of an
    epoch it waits for that epoch's class weights (`EpochWeights`), which the trainer publishes when the epoch
    begins; with steering, each group is made under its version of the learner's state (`Steering.group_steer`,
    read from the trainer's hand-over once per version). An item is a dict: `index`, `labels`, `ids`, and either
    `images`, the group's uint8 images, which the trainer augments a batch at a time (a `BatchAugment`), or
    `batches`, the k uses already augmented image by image in the worker (any other transform).
    """

    def __init__(self, maker: GroupMaker, layout: StreamLayout, first: int, stats: WorkerStats,
                 weights: EpochWeights, steering: Steering | None = None):
        self.maker, self.layout, self.first, self.stats, self.weights = maker, layout, first, stats, weights
        self.steering = steering

    def __iter__(self) -> Iterator:
        worker, num_workers = worker_index_and_count()
        maker, layout = self.maker, self.layout
        device = torch.device(maker.device(worker))
        epoch_weights: tuple[int, list[float] | None] | None = None
        self.stats.beat(worker)
        for index in worker_groups(self.first, worker, num_workers):
            epoch, group = layout.group_at(index)
            try:
                with self.stats.beating(worker):  # the model loads once, in one long call
                    maker.synthesizer(worker)
                if epoch_weights is None or epoch_weights[0] != epoch:
                    epoch_weights = epoch, self.weights.wait(epoch)
                started = time.perf_counter()
                steer = None
                if self.steering is not None:
                    steer = self.steering.group_steer(index, maker, worker, lambda: self.stats.beat(worker))
                handover_s = time.perf_counter() - started
                made = maker.make_group(layout, epoch, group, worker, epoch_weights[1], steer=steer)
                item = {"index": index, "labels": made.labels, "ids": made.sample_ids}
                if maker.augments_in_batches:
                    item["images"] = made.images
                else:
                    item["batches"] = [maker.augment_group(made.images, item["ids"].tolist(), use)
                                       for use in range(layout.replay)]
                self.stats.record(worker, len(made.specs), time.perf_counter() - started, peak_memory_bytes(device),
                                  made.generated, made.learner_s, handover_s)
                self.stats.beat(worker)
            except Exception as err:  # handed over as a value, so the trainer sees the cause, not a traceback
                yield WorkerFailure(isinstance(err, DETERMINISTIC_ERRORS), _one_line(err))
                return
            yield item


def _start_method(context) -> str:
    """The start method the DataLoader's workers will have (`context` as the DataLoader takes it)."""
    import multiprocessing

    if context is None:
        return multiprocessing.get_start_method()  # fixes the default, as the DataLoader's first queue does anyway
    return context if isinstance(context, str) else context.get_start_method()


def _group_bytes(stream: SyntheticStream) -> int:
    """The bytes of one group a worker hands over: its uint8 images (a `BatchAugment` augments them in the trainer), or
    its k augmented float batches (any other transform); a model's own size, where none is set, counted as 512."""
    side = stream.generator.image_size or 512
    images = stream.batch_size * 3 * side * side
    return images if stream.maker.augments_in_batches else images * 4 * stream.layout.replay


def _worker_processes(iterator) -> list:
    # A private attribute of PyTorch's multi-process iterator (stable since PyTorch 1.0); tests pin it.
    return list(getattr(iterator, "_workers", []))


def _detach_from_sigchld(iterator) -> None:
    """Stop PyTorch's SIGCHLD handler from raising in the trainer when one of this iterator's workers dies.

    The handler raises wherever the trainer is at that moment (backward, a checkpoint write); unregistered, a dead
    worker is noticed by the iterator itself, inside `next()`, where the loader can replace it.
    """
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False


def _kill(iterator) -> None:
    for process in _worker_processes(iterator):
        if process.is_alive():
            try:
                os.kill(process.pid, signal.SIGKILL)  # SIGKILL also ends a stopped process; SIGTERM would wait
            except ProcessLookupError:
                pass


class StreamLoader:
    """Batches of a `SyntheticStream`, `stream.batch_size` images each, from `num_workers` synthesis workers.

    Workers use the spawn start method when any synthesis device is CUDA (CUDA cannot be used after fork), keep
    their model for the whole run (the worker iterator runs across epochs and is rebuilt only after a fault or a
    jump), and each holds at most `prefetch_factor` groups ready, which bounds memory. With `num_workers=0` the
    trainer's process generates (no fault handling: a failure there is the trainer's own).

    Args:
        timeout: seconds without progress (start-up, model loading, a group) of the worker the trainer waits for,
            after which the workers count as hung and are replaced; the default leaves room for a slow model load
            or compilation.
        max_restarts: how often in a row the same group may fail before the run ends.
        feedback: per-class losses turned into the class weights of each next epoch (class-level steering).
        steering: caption- or sample-level steering (`CaptionFeedback`, `UncertaintySelection`): versions of the
            learner's state taken as the trainer begins groups, handed to the workers without waiting for them, and
            saved in `state_dict()`. Not together with `feedback`.
        augment_device: where a `BatchAugment` transform runs: the workers hand over each group once, as uint8
            images, and its k uses are augmented here a batch at a time (give the classifier's GPU: the batches
            are then already on it). Default: the trainer's CPU. Other transforms run in the workers, image by image.
    """

    def __init__(
        self,
        stream: SyntheticStream,
        num_workers: int = 0,
        *,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        max_restarts: int = 3,
        timeout: float = 1800,
        multiprocessing_context: str | None = None,
        feedback: ClassFeedback | None = None,
        steering: Steering | None = None,
        augment_device: str | torch.device | None = None,
    ):
        if feedback is not None and steering is not None:
            raise ValueError("StreamLoader steers by class (feedback=) or by caption or sample (steering=), not both: "
                             "give one")
        if multiprocessing_context is None and num_workers > 0 and stream.generator.uses_cuda:
            multiprocessing_context = "spawn"
        # Each worker hands over whole groups through shared memory: as many workers as /dev/shm (and the file-size
        # limit) have room for, with one group of prefetch if need be; never none (synthesis in the trainer's own
        # process would be another run's speed), but one line that says what to pass.
        plan = plan_workers(num_workers, lambda w: _group_bytes(stream), held=1, prefetch_factor=prefetch_factor,
                            in_process_ok=False, what="synthesis workers", fewer="a smaller --batch-size")
        num_workers, prefetch_factor = plan.workers, plan.prefetch_factor or prefetch_factor
        self.stream = stream
        self.num_workers = num_workers
        self.max_restarts = max_restarts
        self.timeout = timeout
        self.feedback = feedback
        self.steering = steering
        self._loader_kwargs = {
            "batch_size": None,  # a worker's item is a whole group, already in batches
            "collate_fn": SharedCollate(),  # a group a worker cannot hand over is an error here, never a hang
            "worker_init_fn": leave_interrupts_to_the_trainer,
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "multiprocessing_context": multiprocessing_context if num_workers > 0 else None,
            "prefetch_factor": prefetch_factor if num_workers > 0 else None,
        }
        self.stats = WorkerStats(max(1, num_workers), multiprocessing_context)
        self._weights = EpochWeights(stream.num_classes)
        self.epoch, self.batch, self.restarts = 0, 0, 0
        self._epoch_weights: tuple[int, list[float] | None] | None = None  # the current epoch's, once decided
        self.augment_device = torch.device(augment_device) if augment_device is not None else None
        self._group: dict | None = None  # the group in hand (see GroupView) ...
        self._next_use = 0  # ... and its next use to deliver
        self._iterator: Iterator | None = None
        self._next_index = 0  # the group index the iterator delivers next
        self._hung: str | None = None
        self._wait_s, self._started = 0.0, time.perf_counter()
        self._made_at_start = 0
        self._first_index = 0

    @property
    def layout(self) -> StreamLayout:
        """The stream's layout for this process's rank, read now (a loader built before the process group exists
        still partitions by rank once it does)."""
        return self.stream.layout

    def __len__(self) -> int:
        return self.layout.batches_per_epoch

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Continue with epoch `epoch` from its first batch; the current epoch is kept as it is (so a loop that calls
        `set_epoch` every epoch still resumes mid-epoch exactly)."""
        if epoch != self.epoch:
            self.epoch, self.batch, self._epoch_weights, self._group = epoch, 0, None, None
            self._stop()

    def __iter__(self) -> Iterator:
        """The rest of the current epoch; the next pass is the next epoch."""
        if self.batch >= len(self):  # the last pass took every batch but stopped before it saw the end (Lightning)
            self.epoch, self.batch, self._epoch_weights = self.epoch + 1, 0, None
        while self.batch < len(self):
            batch = self._next_batch()
            self.batch += 1
            yield batch
        self.epoch, self.batch, self._epoch_weights = self.epoch + 1, 0, None

    # ----- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batch": self.batch, "sequence": self.layout.sequence_key()}
        if self._epoch_weights is not None:
            state["epoch_weights"] = self._epoch_weights[1]
        if self.feedback is not None:
            state["feedback"] = self.feedback.state_dict()
        if self.steering is not None:
            state["steering"] = self.steering.state_dict(self.layout.group_index(self.epoch,
                                                                                 self.batch // self.layout.replay))
        return state

    def load_state_dict(self, state: dict) -> None:
        if "sequence" not in state:
            raise ValueError("this loader state was written by an older streamsynth, whose layout depended on the "
                             "number of workers: it cannot be resumed exactly; start a new run")
        self.layout.check_resumable(state["sequence"])
        if (self.steering is None) != ("steering" not in state):
            saved = state["steering"]["settings"]["mode"] if "steering" in state else "no"
            now = self.steering.mode if self.steering is not None else "no"
            raise ValueError(f"cannot resume the stream exactly: it was saved with {saved} steering, this loader has "
                             f"{now}; resume with the saved steering settings, or start afresh")
        if self.steering is not None:
            self.steering.load_state_dict(state["steering"])
        if self.feedback is not None and "feedback" in state:
            self.feedback.load_state_dict(state["feedback"])
        self.epoch, self.batch, self._group = state["epoch"], state["batch"], None
        self._epoch_weights = (self.epoch, state["epoch_weights"]) if "epoch_weights" in state else None
        self._stop()

    # ----- delivering ----------------------------------------------------------------------------------------------

    def _next_batch(self):
        if self._group is None or self._next_use == self.layout.replay:
            self._decide_epoch_weights()
            group, self._next_use = divmod(self.batch, self.layout.replay)  # a use > 0 only right after a resume
            index = self.layout.group_index(self.epoch, group)
            if self.steering is not None:
                self.steering.begin_group(index, self.layout, self.stream.sampler)
            self._group = self._fetch(index)
            if "images" in self._group and self.augment_device is not None:
                self._group["images"] = self._group["images"].to(self.augment_device, non_blocking=True)
        group, use = self._group, self._next_use
        self._next_use += 1
        if "batches" in group:
            images = group["batches"][use]
        else:
            images = self.stream.maker.augment_group(group["images"], group["ids"].tolist(), use)
        return (images, group["labels"], group["ids"]) if self.stream.return_sample_ids else (images, group["labels"])

    def _decide_epoch_weights(self) -> None:
        if self._epoch_weights is None:
            weights = self.feedback.next_weights() if self.feedback is not None else self.stream.class_weights
            self._epoch_weights = (self.epoch, weights)
        self._weights.publish(*self._epoch_weights)

    def _fetch(self, index: int) -> dict:
        """Group `index` (see GroupView), restarting the workers after failures."""
        if self._iterator is not None and self._next_index != index:
            self._stop()
        failures = 0
        while True:
            if self._iterator is None:
                self._start(index)
            try:
                item = self._next_item()
            except Exception as err:  # a worker died, was killed as hung, or the hand-over broke
                cause = self._hung or _one_line(err)
            else:
                if not isinstance(item, WorkerFailure):
                    self._next_index += 1
                    return item
                if item.deterministic:
                    self._stop()
                    raise SynthesisError(item.message)
                cause = item.message
            failures += 1
            self._stop()
            if failures > self.max_restarts:
                raise SynthesisError(f"group {index} (epoch {self.epoch}) failed {failures} times in a row; "
                                     f"last error: {cause}")
            self.restarts += 1
            log.warning("synthesis workers failed at batch %d of epoch %d (%s); restarting them there (restart %d)",
                        self.batch, self.epoch, cause, self.restarts)

    def _start(self, index: int) -> None:
        if self.num_workers > 0 and _start_method(self._loader_kwargs["multiprocessing_context"]) == "fork":
            preload_pipeline_library(self.stream.maker.generator.model)
        view = GroupView(self.stream.maker, self.layout, index, self.stats, self._weights, self.steering)
        self._iterator = iter(DataLoader(view, **self._loader_kwargs))
        _detach_from_sigchld(self._iterator)
        self._next_index = self._first_index = index
        self._made_at_start = self.stats.images_made()

    def _next_item(self):
        iterator, self._hung = self._iterator, None
        waited = time.perf_counter()
        if self.num_workers == 0:
            item = next(iterator)
            self._wait_s += time.perf_counter() - waited
            return item

        owed_by = (self._next_index - self._first_index) % self.num_workers  # the worker whose group is next
        done = threading.Event()

        def watch() -> None:
            # Hung: the trainer has waited `timeout` seconds and the worker it waits for made no progress as long.
            started = time.monotonic()
            while not done.wait(0.5):
                quiet = time.monotonic() - max(started, self.stats.last_beat(owed_by))
                if quiet > self.timeout:
                    self._hung = (f"worker {owed_by} made no progress for {self.timeout:g} s: it hung or was "
                                  "stopped (it was killed)")
                    _kill(iterator)
                    return

        watchdog = threading.Thread(target=watch, daemon=True)
        watchdog.start()
        try:
            return next(iterator)
        finally:
            done.set()
            self._wait_s += time.perf_counter() - waited

    def _stop(self) -> None:
        if self._iterator is not None:
            _kill(self._iterator)  # discarded work is regenerated on demand: a group is a pure function of its index
            self._iterator = None

    # ----- metrics --------------------------------------------------------------------------------------------------

    def metrics(self) -> dict:
        """Images/s and peak memory per worker, batches waiting in the queue, the share of time the trainer waited."""
        wall = time.perf_counter() - self._started
        workers = []
        for i, row in enumerate(self.stats.rows()):
            device = self.stream.maker.device(i)
            workers.append({"worker": i, "device": device, "images": int(row["images"]),
                            "images_per_s": row["images"] / row["busy_s"] if row["busy_s"] else 0.0,
                            "cpu_s": row["cpu_s"], "generated": int(row["generated"]),
                            "learner_s": row["learner_s"], "handover_s": row["handover_s"],
                            "peak_memory_bytes": int(row["peak_memory_bytes"]),
                            "peak_memory_kind": peak_memory_kind(device)})
        made = (self.stats.images_made() - self._made_at_start) // self.layout.batch_size
        queued = max(0, made - (self._next_index - self._first_index))  # groups made and not yet taken
        in_hand = self.layout.replay - self._next_use if self._group is not None else 0
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "restarts": self.restarts,
            "queue_depth": queued * self.layout.replay + in_hand,  # batches ready
            "buffered_groups": queued + (self._group is not None),  # what the loader holds, as generation groups
            "data_wait_share": self._wait_s / wall if wall else 0.0,
            "workers": workers,
            "hand_over_s": self.steering.hand_over_s() if self.steering is not None else [],
        }

    def __del__(self) -> None:
        try:
            self._stop()  # a stopped worker would otherwise outlive the loader
        except Exception:
            pass
