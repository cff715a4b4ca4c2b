"""The ranks of an offline job (`streamsynth caption`, `streamsynth generate`) under torchrun.

torchrun (torch.distributed's elastic launcher) starts one process per GPU, on one node or several, and tells each
its rank through the environment. The offline commands split their work by rank with no coordination while they
work; they talk only at a few sync points, exchanging small Python objects (a digest of the input, each rank's
outcome, a summary). For that they open a gloo process group of their own, on GPUs too: no NCCL, no device
synchronisation, and a peer that dies is noticed at once (its sockets close), not after a timeout.

Failures are agreed on: at a sync point every rank says whether it failed and why, and then every rank raises the
same `RankError` naming the rank(s) at fault and their messages, while what each rank finished stays on disk for
`--resume`. A rank that fails early waits at the next sync point for the others to finish their own shares (hence
the long collective timeout), so one bad rank never costs the others their work.

`--devices cuda:0,cuda:1` (one process tree on one node) is torchrun's standalone mode run for the user:
`launch_local_ranks` calls torch.distributed.run itself, and the children are ranks like any others.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

from .errors import StreamsynthError, one_line

# How long a rank waits at a sync point for the others (e.g. a rank that failed early, for those still working).
# A rank that dies is noticed at once by its peers; this bounds only a rank that hangs.
SYNC_TIMEOUT = timedelta(days=7)

_current_label = ""


class RankError(StreamsynthError, RuntimeError):
    """A rank of the job failed (or vanished); the message names it, its error, and what the others kept."""


def rank_label() -> str:
    """"rank R of W" once this process joined a distributed job, else "": how it names itself in its errors."""
    return _current_label


def under_launcher() -> bool:
    """Whether torchrun (or another launcher following its conventions) started this process as one rank of a job."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_rank_and_world() -> tuple[int, int]:
    """This process's rank on its node and the number of ranks there, from the launcher's environment."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; a single process is rank 0 of 1 and its collectives are no-ops."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def _collective(self, fn, *args) -> None:
        import torch.distributed as dist

        try:
            getattr(dist, fn)(*args)
        except (RuntimeError, ConnectionError) as err:  # gloo: "Connection reset by peer", a timeout
            raise RankError(
                f"{self.label}: lost contact with the other ranks ({one_line(err)[:160]}): another rank died; its own "
                "error says why (torchrun names it); what every rank finished is kept, so rerun with --resume"
            ) from None

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        self._collective("all_gather_object", values, value)
        return values

    def broadcast(self, value: Any = None) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        self._collective("broadcast_object_list", box, 0)
        return box[0]

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 alone and return its value on every rank. If it raises, rank 0 raises its own error
        (a full disk stays a `DiskFullError`) and every other rank a `RankError` with its message."""
        if not self.distributed:
            return fn()
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as err:
                error = err
        result = self.broadcast({"value": value} if error is None else
                                {"error": one_line(error), "names_rank": isinstance(error, RankError)})
        if error is not None:
            raise error
        if "error" in result:
            raise RankError(result["error"] if result["names_rank"] else f"rank 0 of {self.world}: {result['error']}")
        return result["value"]

    def outcomes(self, error: BaseException | None = None, **summary) -> list[dict]:
        """Gather every rank's outcome: its summary and its error (one line, naming the rank), or None."""
        mine = {"rank": self.rank, "host": socket.gethostname(), "error": None, **summary}
        if error is not None:
            mine["error"] = f"{self.label}: {one_line(error)}" if self.distributed else one_line(error)
        return self.gather(mine)

    def agree(self, error: BaseException | None = None, kept: str = "") -> None:
        """A sync point: if any rank failed, every rank raises the same `RankError` (a single process re-raises)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        raise_failures(self.outcomes(error), kept)


def raise_failures(outcomes: list[dict], kept: str = "") -> None:
    """Raise one `RankError` naming every rank whose outcome holds an error (and what is kept), if any."""
    failed = [o for o in outcomes if o.get("error")]
    if not failed:
        return
    others = f" ({len(failed) - 1} other rank(s) failed too: {', '.join(str(o['rank']) for o in failed[1:])})" \
        if len(failed) > 1 else ""
    raise RankError(f"{failed[0]['error']}{others}" + (f"; {kept}" if kept else ""))


@contextmanager
def ranks_from_environment(timeout: timedelta = SYNC_TIMEOUT) -> Iterator[Ranks]:
    """This process's `Ranks`: from torchrun's environment (opening a gloo group, closed on exit), else rank 0 of 1.

    SIGTERM, which torchrun sends to the surviving ranks when one fails, is raised as KeyboardInterrupt meanwhile,
    so that a rank stopped that way keeps its work as it does on Ctrl-C."""
    global _current_label
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks()
        return
    import torch.distributed as dist

    opened = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timeout)
        opened = True
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), *local_rank_and_world())
    _current_label = ranks.label
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield ranks
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if opened:
            dist.destroy_process_group()


def launch_local_ranks(count: int, argv: list[str]) -> int:
    """Run `streamsynth ARGV` as `count` ranks on this node, as `torchrun --standalone --nproc_per_node=COUNT`
    would; returns 0, or raises a `RankError` naming the first rank that failed (its own error is printed above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={count}", "--module", "streamsynth.cli",
                                         *argv])
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"was ended by signal {-code}" if code < 0 else f"ended with exit status {code}"
        raise RankError(f"rank {rank} of {count} {how}; its own error is printed above; what every rank finished is "
                        "kept, so rerun the same command with --resume") from None
    except SignalException as err:  # Ctrl-C or a kill of this launcher: the ranks were stopped and kept their work
        print(f"stopped by {signal.Signals(err.sigval).name}", file=sys.stderr)
        raise KeyboardInterrupt from None
    return 0
