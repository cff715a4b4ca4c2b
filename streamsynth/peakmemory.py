"""Peak memory, one definition for the stream's worker metrics and every benchmark report.

On a GPU it is the most the CUDA caching allocator held reserved (`torch.cuda.max_memory_reserved`: what the process
took from the GPU for tensors, cached blocks included; the CUDA context, about 0.5 GiB a process, comes on top); on
the CPU the process's peak resident set (VmHWM), which `reset_peak_memory` brings down to the current resident set.
`peak_memory_kind` says which, and since when. A bottom-layer module: it imports nothing of streamsynth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def as_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device with its index filled in for CUDA ("cuda" is the current GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


CUDA_PEAK_KIND = ("cuda max_memory_reserved: the most the caching allocator held (the CUDA context, about 0.5 GiB a "
                  "process, comes on top)")
_cpu_reset_pid: int | None = None  # the process that last reset its own VmHWM (a forked child inherits this value)


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    kind: str  # what `bytes` measures, and since when

    def as_dict(self) -> dict:
        """The two keys every report uses: peak_memory_bytes and peak_memory_kind."""
        return {"peak_memory_bytes": self.bytes, "peak_memory_kind": self.kind}


def reset_peak_memory(device: str | torch.device) -> None:
    """Starts a new peak for `device`: the CUDA allocator's peak statistics, or this process's VmHWM on the CPU."""
    global _cpu_reset_pid
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(as_device(device))
        torch.cuda.reset_peak_memory_stats(as_device(device))
        return
    try:  # Linux: writing 5 to clear_refs sets the peak resident set to the current resident set
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _cpu_reset_pid = os.getpid()
    except OSError:
        pass  # the peak then counts from the process's start, and peak_memory_kind says so


def peak_memory_bytes(device: str | torch.device) -> int:
    """Peak memory of this process on `device` since the last reset (see the module's docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(as_device(device))
    try:  # VmHWM belongs to this process's address space; ru_maxrss would carry a spawning parent's peak over
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; never reset


def peak_memory_kind(device: str | torch.device) -> str:
    """What `peak_memory_bytes` measures on `device` (without touching the device)."""
    if torch.device(device).type == "cuda":
        return CUDA_PEAK_KIND
    since = "since the last reset" if _cpu_reset_pid == os.getpid() else "since the process started"
    return (f"peak resident set (VmHWM) of the process {since} (a forked process also counts the pages it shares "
            "with its parent)")


def peak_memory(device: str | torch.device) -> PeakMemory:
    return PeakMemory(peak_memory_bytes(device), peak_memory_kind(device))
