"""Where each synthesis worker of each rank generates, decided in the worker when iteration starts.

A generator's `devices`:
- None (the default): the rank's own GPU, or the CPU when there is none. The rank's GPU is the current CUDA device of
  the process that iterates the stream, where it has chosen one (`torch.cuda.set_device`, as pytorch/examples,
  Lightning and torchrun scripts do before they build their loaders; a spawned loader worker is told it), else
  `cuda:LOCAL_RANK` (the launcher's local rank: torchrun, Lightning and accelerate set it), else cuda:0. Every worker
  of the rank shares it.
- a list: split among the node's ranks when it has at least one device per local rank (local rank i takes every
  LOCAL_WORLD_SIZE-th device, as torchrun numbers them), else shared by all of them; a rank's worker w then uses
  its share's device w mod n.
So the ranks of a node never all land on `cuda:0`, and a list like `cuda:4,...,cuda:7` for four ranks gives each
rank one GPU of its own for synthesis.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import StreamsynthError
from ..ranks import local_rank_and_world


class CUDAAfterForkError(StreamsynthError, RuntimeError):
    """A loader worker forked from a process that already uses CUDA cannot use CUDA itself."""

    HINT = ("a DataLoader worker forked from a process that already uses CUDA cannot run the stream's generator on "
            "{device}: pass multiprocessing_context=\"spawn\" to the DataLoader (or use StreamLoader, which does), "
            "or, where the loader is built for you (timm's create_loader), call "
            "torch.multiprocessing.set_start_method(\"spawn\", force=True) first")

    def __init__(self, message: str):
        # A DataLoader re-raises a worker's exception in the trainer as this class with the worker's traceback in
        # the message: keep only the last line, the explanation, so the trainer's error is one line.
        super().__init__(message.strip().splitlines()[-1].removeprefix(f"{type(self).__module__}.")
                         .removeprefix(f"{type(self).__name__}: "))


def rank_devices(devices: Sequence[str], local_rank: int, local_world: int) -> list[str]:
    """This local rank's share of a node's device list (see the module docstring)."""
    devices = list(devices)
    if len(devices) >= local_world > 1:
        return devices[local_rank::local_world]
    return devices


def current_cuda_device() -> int | None:
    """The CUDA device this process chose, if it has initialised CUDA (never initialises it itself)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and not _in_bad_fork():
        return torch.cuda.current_device()
    return None


def own_device(trainer_cuda_device: int | None = None) -> str:
    """The rank's own GPU (see the module docstring), or the CPU without one. `trainer_cuda_device`: the current
    CUDA device of the process that started this loader worker, when it had chosen one."""
    if not torch.cuda.is_available():
        return "cpu"
    index = current_cuda_device()
    if index is None:
        index = trainer_cuda_device
    if index is None:
        index = local_rank_and_world()[0] % torch.cuda.device_count()
    return f"cuda:{index}"


def rank_share(devices: Sequence[str] | None, trainer_cuda_device: int | None = None) -> list[str]:
    """This rank's devices: its share of a node's list, or its own GPU (or the CPU) for None."""
    return rank_devices(devices, *local_rank_and_world()) if devices else [own_device(trainer_cuda_device)]


def worker_device(devices: Sequence[str] | None, worker: int, trainer_cuda_device: int | None = None) -> str:
    """The device of this rank's loader worker `worker`."""
    share = rank_share(devices, trainer_cuda_device)
    return share[worker % len(share)]


def _in_bad_fork() -> bool:
    return torch.cuda._is_in_bad_fork()


def check_usable_here(device: str) -> None:
    """Raise `CUDAAfterForkError` (one line) when `device` is CUDA and this process cannot use CUDA because it was
    forked from one that had initialised it: the case of a default DataLoader in a script that moved its model to
    the GPU first."""
    if torch.device(device).type == "cuda" and _in_bad_fork():
        raise CUDAAfterForkError(CUDAAfterForkError.HINT.format(device=device))


def synthesis_devices(spec: str | None, trainer_device: str, local_world_size: int = 1) -> list[str] | None:
    """The node's synthesis devices for train.py's `--synth-devices` (each rank takes its share, see above):

    - None: None, each rank's own device (synthesis and training share it; the CPU trainer's CPU);
    - "auto": every local GPU that no rank trains on, or None when there is none to spare (one GPU, or the CPU);
    - "cuda:1,cuda:2,...": that list.
    """
    if spec is None:
        return None if trainer_device.startswith("cuda") else [trainer_device]
    if spec == "auto":
        count = torch.cuda.device_count() if trainer_device.startswith("cuda") else 0
        spare = [f"cuda:{i}" for i in range(local_world_size, count)]
        return spare or (None if trainer_device.startswith("cuda") else [trainer_device])
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"--synth-devices {spec!r} names no device")
    for device in devices:
        torch.device(device)  # raises a clear error for a malformed name
    return devices
