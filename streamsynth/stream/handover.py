"""`HandOver`: numbered versions of a value (the learner's weights, caption weights) from the trainer to the workers.

The trainer must never wait for a worker or for the disk while it trains, and a worker must never see half a version.
So the trainer's part, `publish`, only puts the value (already a copy the trainer no longer changes) on a queue; one
background thread writes each version to a file under a hidden name and renames it into place, and a worker that
needs version k reads the file once it exists, polling until then. A version is written once and never changed, so
it is a value, like the sample ids it steers: which version a group is made under is decided by the group's index,
never by timing (`steering.SteeringSchedule`).

The folder is a temporary one of the process that created the hand-over, removed when that object is collected or
the process exits; workers (forked or spawned) find it by its path.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from typing import Any, Callable

import torch

from ..errors import StreamsynthError
from ..safeio import atomic_write


class HandOverError(StreamsynthError, RuntimeError):
    """A version could not be written for the workers (a full or read-only disk); the message names the folder."""


def _remove_folder(folder: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked worker that drops its copy must not remove the trainer's folder
        shutil.rmtree(folder, ignore_errors=True)


class HandOver:
    """Versions 1, 2, ... of a payload (a tensor, or a dict of tensors and numbers), written by one trainer process and
    read by any number of worker processes."""

    def __init__(self, parent: str | os.PathLike | None = None):
        self.folder = tempfile.mkdtemp(prefix="streamsynth-handover-", dir=parent)
        self.owner = os.getpid()
        self._finalizer = weakref.finalize(self, _remove_folder, self.folder, self.owner)
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._written = threading.Condition()
        self._last_queued = self._last_written = 0
        self._error: str | None = None

    def __getstate__(self) -> dict:
        # Workers only read: they get the folder, not the trainer's queue, thread or clean-up.
        return {"folder": self.folder, "owner": self.owner}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _finalizer=None, _queue=None, _writer=None, _written=threading.Condition(),
                             _last_queued=0, _last_written=0, _error=None)

    def path(self, version: int) -> str:
        return os.path.join(self.folder, f"v{version:08d}.pt")

    def _error_path(self, version: int) -> str:
        return self.path(version) + ".error"

    # ----- the trainer's side ---------------------------------------------------------------------------------------

    def publish(self, version: int, payload: Any) -> None:
        """Queue version `version` for writing and return at once. `payload` must not be changed afterwards."""
        if self._error is not None:
            raise HandOverError(self._error)
        if self._writer is None:
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_forever, name="streamsynth-handover", daemon=True)
            self._writer.start()
        self._queue.put((version, payload))
        self._last_queued = version

    def _write_forever(self) -> None:
        while True:
            version, payload = self._queue.get()
            try:
                self._write(version, payload)
            except Exception as err:  # told to the workers that wait for it and to the trainer's next publish
                self._error = (f"could not hand version {version} of the learner's state to the workers through "
                               f"{self.folder}: {type(err).__name__}: {err} (free space there, or point TMPDIR at a "
                               "folder with room)")
                try:
                    with open(self._error_path(version), "w") as handle:
                        handle.write(self._error)
                except OSError:
                    pass  # the disk took nothing: the trainer's next publish still says why
            with self._written:
                self._last_written = version
                self._written.notify_all()

    def _write(self, version: int, payload: Any) -> None:
        """All or nothing (`atomic_write`): a reader never sees part of a version."""
        atomic_write(self.path(version), lambda f: torch.save(payload, f), what="steering hand-over")

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every published version is written (for tests and a clean shutdown; training never calls it)."""
        with self._written:
            return self._written.wait_for(lambda: self._last_written >= self._last_queued, timeout_s)

    def published_versions(self) -> list[int]:
        """The versions written so far."""
        return [int(name[1:9]) for name in sorted(os.listdir(self.folder)) if name.endswith(".pt")
                and name.startswith("v")]

    def forget_before(self, version: int) -> None:
        """Remove the files of versions below `version` (no group needs them any more; a reader that opened one
        still reads it whole)."""
        for kept in self.published_versions():
            if kept < version:
                try:
                    os.remove(self.path(kept))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    # ----- a worker's side ------------------------------------------------------------------------------------------

    def read(self, version: int, beat: Callable[[], None] | None = None, poll_s: float = 0.01) -> Any:
        """Version `version`, waiting until it is written; `beat` is called while waiting (the worker's heartbeat).

        A worker whose trainer is gone (killed) stops waiting: it would wait forever, and hold on to whatever the
        trainer shared with it."""
        path = self.path(version)
        while not os.path.exists(path):
            if os.path.exists(self._error_path(version)):
                with open(self._error_path(version)) as handle:
                    raise HandOverError(handle.read())
            if os.getpid() != self.owner and os.getppid() != self.owner:
                raise HandOverError(f"the trainer (process {self.owner}) that hands over the learner's state is "
                                    "gone: this worker stops")
            if beat is not None:
                beat()
            time.sleep(poll_s)
        return torch.load(path, weights_only=True)
