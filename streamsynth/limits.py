"""The machine's limits that break DataLoader workers, checked before work starts: the shared memory the workers hand
their batches over in (`/dev/shm`) and the process's file-size limit (`ulimit -f`), which applies to those files too.

Docker gives a container 64 MiB of /dev/shm unless told otherwise (`docker run --shm-size`). A DataLoader worker
hands each batch to the main process as a file in /dev/shm; when that file cannot be made, the failure used to happen
in the thread of multiprocessing's queue that pickles the batch, which prints a traceback and drops the batch, and
the main process waited for it forever. Two things prevent that:

- `plan_workers`, before the DataLoader starts, keeps the workers asked for when the batches they hold at once fit in
  three quarters of the free shared memory (split among this machine's ranks) and each under the file-size limit;
  else it prefetches one batch per worker instead of two, then uses fewer workers, then none (the main process decodes:
  slower, but it needs no shared memory), saying so in one warning that names the fix. A caller that cannot do
  without workers gets a one-line `SharedMemoryError` instead. Workers and prefetching change the speed, never a
  result.
- `SharedCollate` wraps a collate function: in a worker it moves the batch into shared memory itself, in the worker's
  own thread, so that a failure is an exception the DataLoader hands to the main process (a one-line
  `SharedMemoryError`), never a batch dropped in silence.

torch's `file_system` sharing strategy is no way out: it keeps batches in /dev/shm too (it differs from the default
`file_descriptor` strategy in how the files are passed, which matters for the open-file limit, not for room).

Use, for any DataLoader whose workers hand over tensors:

    plan = plan_workers(workers, lambda w: batch_bytes, what="decoding val", fewer="a smaller --batch-size")
    loader = DataLoader(dataset, batch_size=..., collate_fn=SharedCollate(collate), **plan.loader_options())

(`in_process_ok=False` where the workers cannot be done without; `SharedCollate()` for a loader that does not batch,
`batch_size=None`.)

A bottom-layer module: it imports nothing of streamsynth but `errors` and `safeio`, and torch only inside functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Callable

from .errors import StreamsynthError, one_line
from .safeio import file_size_limit, human_bytes

log = logging.getLogger(__name__)

SHM_PATH = "/dev/shm"
# Of the free shared memory, what one process's workers may plan to hold: other processes (the training loop's own
# workers, another job) use it too.
SHARE = 0.75


class SharedMemoryError(StreamsynthError, RuntimeError):
    """DataLoader workers cannot hand over their batches: /dev/shm is too small, or the file-size limit too low."""


@dataclass(frozen=True)
class SharedMemory:
    """The shared memory DataLoader workers hand batches over in."""

    path: str
    total: int
    free: int


def shared_memory() -> SharedMemory | None:
    """Size and free space of /dev/shm; None where there is none to measure (not Linux, or not mounted)."""
    try:
        st = os.statvfs(SHM_PATH)
    except OSError:
        return None
    return SharedMemory(SHM_PATH, st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)


def _local_ranks() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE): they share one /dev/shm."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def suggested_shm_size(needed: int) -> str:
    """A `--shm-size` value that leaves `needed` bytes within `SHARE` of it, in whole GiB (or 512m)."""
    wanted = needed / SHARE * _local_ranks()
    return "512m" if wanted <= 512 << 20 else f"{-(-int(wanted) // (1 << 30))}g"


@dataclass(frozen=True)
class WorkerPlan:
    """How many DataLoader workers to start and how many batches each prefetches."""

    workers: int
    prefetch_factor: int | None  # None with no workers (the DataLoader refuses one then)
    reason: str = ""  # why this differs from what was asked; empty when it does not

    def loader_options(self) -> dict:
        """Keyword arguments of `torch.utils.data.DataLoader`."""
        return {"num_workers": self.workers, "prefetch_factor": self.prefetch_factor}


def plan_workers(
    workers: int,
    handover_bytes: Callable[[int], int],
    *,
    held: Callable[[int], int] | int = 2,
    items: int | None = None,
    prefetch_factor: int = 2,
    in_process_ok: bool = True,
    what: str = "DataLoader workers",
    fewer: str = "a smaller --batch-size",
) -> WorkerPlan:
    """The workers that can hand over their batches on this machine, decided before the DataLoader starts.

    `handover_bytes(w)`: the bytes of one item a worker hands over when there are `w` workers (a batch, or a worker's
    share of one); `held(w)`: how many of them the consumer holds at a time besides those in flight (the batch in use,
    one being pinned); `items`, when known: how many the loader hands over in all. With `w` workers prefetching `p`
    items each, `min(w * p + held(w), items) * handover_bytes(w)` bytes sit in /dev/shm at once, and each item is one
    file there, which must stay under the file-size limit.

    Keeps `workers` and `prefetch_factor` when that fits; else tries one item of prefetch, then fewer workers; else
    no workers (`in_process_ok`) or a `SharedMemoryError` saying what to pass. Any change is logged as one warning.
    `what` names the loader in messages; `fewer` says what else would shrink a hand-over.
    """
    if workers <= 0:
        return WorkerPlan(0, None)
    held_by = held if callable(held) else (lambda w: held)
    shm, limit = shared_memory(), file_size_limit()
    budget = None if shm is None else int(shm.free * SHARE) // _local_ranks()

    def need(w: int, p: int) -> int:
        return min(w * p + held_by(w), items or w * p + held_by(w)) * handover_bytes(w)

    def fits(w: int, p: int) -> bool:
        return (budget is None or need(w, p) <= budget) and (limit is None or handover_bytes(w) <= limit)

    options = [(w, p) for w in range(workers, 0, -1) for p in dict.fromkeys((prefetch_factor, 1))]
    found = next((option for option in options if fits(*option)), None)
    if found == (workers, prefetch_factor):
        return WorkerPlan(workers, prefetch_factor)
    asked, item = need(workers, prefetch_factor), handover_bytes(workers)
    causes, fixes = [], []
    if budget is not None and asked > budget:
        ranks = f" (shared by {_local_ranks()} ranks)" if _local_ranks() > 1 else ""
        causes.append(f"{workers} workers would hold {human_bytes(asked)} of batches in {shm.path}, which has "
                      f"{human_bytes(shm.free)} free of {human_bytes(shm.total)}{ranks}")
        fixes.append(f"give the container more shared memory (`docker run --shm-size={suggested_shm_size(asked)}`)")
    if limit is not None and item > limit:
        causes.append(f"a batch handed over through shared memory is {human_bytes(item)}, above this process's "
                      f"file-size limit (`ulimit -f`: {human_bytes(limit)})")
        fixes.append("raise the file-size limit (`ulimit -f unlimited`)")
    cause, fix = "; ".join(causes), " and ".join(fixes) + f", or pass {fewer}"
    if found is not None:
        w, p = found
        plan = WorkerPlan(w, p, f"{what}: {cause}: using {w} workers prefetching {p} batch{'es' if p > 1 else ''} "
                                f"each (slower); {fix}")
    elif in_process_ok:
        plan = WorkerPlan(0, None, f"{what}: {cause}: decoding in the main process instead (slower); {fix}")
    else:
        raise SharedMemoryError(f"{what}: {cause}; {fix}")
    if plan.reason not in _said:  # once per process: evaluation during training plans the same loader again
        _said.add(plan.reason)
        log.warning("%s", plan.reason)
    return plan


_said: set[str] = set()


class SharedCollate:
    """A collate function whose batches a worker moves into shared memory itself (see the module's docstring), so that
    a batch that cannot be handed over is a `SharedMemoryError` in the main process, not a hang. `collate`: the
    function it wraps (none: items go as they are, for a loader with `batch_size=None`); picklable when that is
    (spawned workers). In the main process (no workers) it changes nothing. `fix`: what the error tells the user to
    pass."""

    def __init__(self, collate: Callable | None = None, fix: str = "pass --workers 0"):
        self.collate = collate
        self.fix = fix

    def __call__(self, items):
        from torch.utils.data import get_worker_info

        batch = self.collate(items) if self.collate is not None else items
        if get_worker_info() is not None:
            tensors = list(_tensors(batch))
            try:
                for tensor in tensors:
                    tensor.share_memory_()
            except (RuntimeError, OSError) as err:
                raise SharedMemoryError(self._message(sum(t.nbytes for t in tensors), err)) from None
        return batch

    def _message(self, size: int, err: BaseException) -> str:
        from torch.utils.data import get_worker_info

        shm, limit = shared_memory(), file_size_limit()
        room = f"{shm.path} has {human_bytes(shm.free)} free of {human_bytes(shm.total)}" if shm else ""
        if limit is not None:
            room += f"{'; ' if room else ''}the file-size limit (`ulimit -f`) is {human_bytes(limit)}"
        # Each worker holds two batches, the main process about two more (as `plan_workers` counts).
        held = (2 * get_worker_info().num_workers + 2) * size
        more = f"give the container more shared memory (`docker run --shm-size={suggested_shm_size(held)}`)"
        return (f"a DataLoader worker cannot hand over a batch of {human_bytes(size)} through shared memory "
                f"({one_line(err)}){'; ' + room if room else ''}: {self.fix}, or {more}"
                + (" or raise the file-size limit (`ulimit -f unlimited`)" if limit is not None else ""))


def _tensors(value):
    """Every tensor in a batch: tensors, lists, tuples, dicts and dataclasses of them."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
