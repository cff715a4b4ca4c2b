"""The one toolkit of streamsynth's benchmarks: device names, peak memory, timing, the environment, reports, plots.

`streamsynth profile`, `loader-bench`, `caption-bench` and `python -m streamsynth.benchmarks.kernel_bench` all measure with it,
and the stream's worker metrics take their peak memory from the same place (`streamsynth.peakmemory`), so
their figures mean the same thing:

- `device_name(device)`: "NVIDIA H200", or "cpu (the CPU's model name)"; `on_device(device)` makes a CUDA device the
  current one (events, synchronisation, allocator statistics and Triton launches all follow the current device).
- Peak memory is one measure, `peak_memory(device)` -> `PeakMemory(bytes, kind)`, reset by `reset_peak_memory`:
  on a GPU the most the CUDA caching allocator held reserved (`torch.cuda.max_memory_reserved`: what the process
  took from the GPU for tensors, cached blocks included; the CUDA context, about 0.5 GiB a process, comes on top);
  on the CPU the process's peak resident set (VmHWM), which the reset brings down to the current resident set.
  `kind` says which, and since when.
- `Timer(device)` times a block: CUDA events on the device's stream for a CUDA device (the GPU's time from the
  block's first launch to its last, read after one synchronisation), else wall time; `clock="wall"` gives wall time
  with the device synchronised at both ends, for blocks that wait on other processes. `measure(run, device, warmup,
  repeats)` is the loop: untimed warm-up calls, the peak reset, then timed calls. `StageClock` splits one call into
  stages by marks. `busiest_ops(run, device)` profiles one call: the device's busy time against the wall clock, and
  its busiest kernels (on the CPU, operators); `attention_backends_ms(q, k, v, mask)` times one attention call under
  each `scaled_dot_product_attention` backend.
- `environment(device)`: GPU name, memory, capability and driver, CUDA runtime, CPU, Python and the versions of
  torch, triton, diffusers, transformers and friends (read from package metadata: nothing is imported).
- `write_json(path, report)` writes a report all or nothing; `figure(path)` makes and saves a matplotlib figure.

`python -m streamsynth.benchmarks.benchtools [--device cuda] [--out FILE]` prints the environment as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..peakmemory import (CUDA_PEAK_KIND, PeakMemory, as_device, peak_memory, peak_memory_bytes,  # noqa: F401
                          peak_memory_kind, reset_peak_memory)

# The packages whose versions every report records.
PACKAGES = ("torch", "torchvision", "triton", "diffusers", "transformers", "accelerate", "xformers", "timm",
            "numpy", "streamsynth")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str | torch.device) -> str:
    """The device's product name: "NVIDIA H200", or "cpu (AMD EPYC 7B13)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(as_device(device))
    return f"{device.type} ({cpu_name()})" if device.type == "cpu" else str(device)


def on_device(device: str | torch.device) -> ContextManager:
    """Within the block a CUDA `device` is the current device; a no-op for any other device."""
    device = torch.device(device)
    return torch.cuda.device(as_device(device)) if device.type == "cuda" else nullcontext()


def synchronize(device: str | torch.device | None) -> None:
    """Waits for the work queued on a CUDA `device`; a no-op elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(as_device(device))


# Timing.

class Timer:
    """`with Timer(device) as t: ...` then `t.seconds`: CUDA events on a CUDA device's current stream, else wall time.

    Events time the GPU from the block's first queued launch to its last, read after one synchronisation, without
    stalling the host in between. `clock="wall"` times wall time instead, with the device synchronised at both ends:
    for blocks that wait on other processes or mix host and device work whose total is what counts.
    """

    def __init__(self, device: str | torch.device | None = None, clock: str = "auto"):
        if clock not in ("auto", "events", "wall"):
            raise ValueError(f"unknown clock {clock!r}: use auto, events or wall")
        self.device = None if device is None else torch.device(device)
        cuda = self.device is not None and self.device.type == "cuda"
        if clock == "events" and not cuda:
            raise ValueError(f"CUDA events need a CUDA device, got {self.device}")
        self.events = cuda and clock != "wall"
        self.seconds: float | None = None

    def __enter__(self) -> "Timer":
        if self.events:
            with on_device(self.device):
                self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self._start.record()
        else:
            synchronize(self.device)
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.events:
            with on_device(self.device):
                self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self._started


@dataclass
class Measured:
    """What `measure` found: seconds of each timed call, what each returned, the peak memory over them, and the
    seconds the warm-up calls took together (where a compiled model compiles)."""

    seconds: list[float]
    results: list[Any] = field(repr=False)
    peak_memory: PeakMemory
    warmup_s: float = 0.0

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


def measure(run: Callable[[], Any], device: str | torch.device, warmup: int = 1, repeats: int = 3,
            clock: str = "auto") -> Measured:
    """`warmup` untimed calls of `run`, then the peak memory reset, then `repeats` timed calls (see `Timer`)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    with Timer(device, "wall") as warming:  # compilation is host time, which events would not see
        for _ in range(warmup):
            run()
    reset_peak_memory(device)
    seconds, results = [], []
    for _ in range(repeats):
        with Timer(device, clock) as timer:
            results.append(run())
        seconds.append(timer.seconds)
    return Measured(seconds, results, peak_memory(device), warming.seconds)


class StageClock:
    """Splits one timed call into stages: `mark(stage)` ends a stage; `seconds()` reads them all at once.

    On a CUDA device each mark is an event on the current stream, so marking never waits for the GPU; `seconds()`
    synchronises once. An interval is charged to the stage whose mark ends it, so a stage marked twice sums both.
    """

    def __init__(self, device: str | torch.device, stages: tuple[str, ...]):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stages = stages
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, stage: str) -> None:
        if stage != "start" and stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}: use one of {list(self.stages)}")
        if self.cuda:
            with on_device(self.device):
                event = torch.cuda.Event(enable_timing=True)
                event.record()
            self.marks.append((stage, event))
        else:
            self.marks.append((stage, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        synchronize(self.device if self.cuda else None)
        totals = dict.fromkeys(self.stages, 0.0)
        for (_, begin), (stage, end) in zip(self.marks, self.marks[1:]):
            totals[stage] += begin.elapsed_time(end) / 1000 if self.cuda else end - begin
        return totals


def busiest_ops(run: Callable[[], Any], device: str | torch.device, top: int = 15) -> dict:
    """One call of `run` under torch's profiler: how long the device was busy against the wall clock (a device idle
    for much of the call waits on the host: launches, synchronisations), and the `top` operations by their own time
    on the device (CUDA kernels; on the CPU, operators), with their call counts."""
    from torch.profiler import ProfilerActivity, profile  # imported here: the profiler loads Kineto

    device = as_device(device)
    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        run()
        synchronize(device)
        wall_s = time.perf_counter() - start
    events = profiler.key_averages()
    own_us = [(event.self_device_time_total if on_cuda else event.self_cpu_time_total, event) for event in events]
    own_us.sort(key=lambda pair: pair[0], reverse=True)
    busy_s = sum(us for us, _ in own_us) / 1e6
    return {
        "wall_s": round(wall_s, 4),
        "device_busy_s": round(busy_s, 4),  # on the CPU: the operators' own time, profiler overhead included
        "ops": [{"name": event.key[:120], "calls": event.count, "seconds": round(us / 1e6, 5)}
                for us, event in own_us[:top]],
    }


# `scaled_dot_product_attention`'s backends, by the names the benchmarks' JSON gives them.
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention_backends_ms(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None = None, repeats: int = 5) -> dict[str, float | None]:
    """`scaled_dot_product_attention(query, key, value, attn_mask)` timed under each of its backends (SDPA_BACKENDS;
    median milliseconds, None where a backend refuses the call), to say which one a model's attention should pin."""
    times: dict[str, float | None] = {}
    for name, backend in SDPA_BACKENDS.items():
        def attend(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        try:
            times[name] = round(1000 * measure(attend, query.device, warmup=1, repeats=repeats).median_s, 4)
        except RuntimeError:  # "No available kernel": the backend does not take this call (or out of memory)
            times[name] = None
    return times

# The environment a figure was measured in.

def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata (None where a package is absent); imports nothing."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # the running torch, local build tag included
    return versions


def _nvidia_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def environment(device: str | torch.device | None = None) -> dict:
    """Where a measurement ran: the device, every visible GPU, driver, CUDA runtime, CPU, Python, package versions."""
    env: dict[str, Any] = {}
    if device is not None:
        env["device"] = device_name(device)
    env.update({
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "packages": package_versions(), "cuda_runtime": torch.version.cuda,
    })
    if torch.cuda.is_available():
        env["driver"] = _nvidia_driver()
        env["gpus"] = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            env["gpus"].append({"index": index, "name": props.name, "memory_bytes": props.total_memory,
                                "capability": f"{props.major}.{props.minor}",
                                "multiprocessors": props.multi_processor_count})
    return env


# Reports.

def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value).removeprefix("torch.")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, report: dict) -> Path:
    """Writes `report` as indented JSON, all or nothing (parent folders created); returns the path."""
    from ..safeio import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(report, indent=2, default=_jsonable) + "\n", what="benchmark report")


@contextmanager
def figure(path: str | os.PathLike, ncols: int = 1, figsize: tuple[float, float] = (7.0, 4.5),
           title: str | None = None) -> Iterator[list]:
    """`with figure(path, 2) as (left, right): ...`: a matplotlib figure of `ncols` axes (off-screen), saved to
    `path` as PNG when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    try:
        yield list(axes[0])
        if title:
            fig.suptitle(title, fontsize="medium")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def bar_chart(path: str | os.PathLike, labels: list[str], values: list[float], ylabel: str, title: str,
              colors: list[str] | None = None) -> Path:
    """One bar per label (rotated labels): the plot of a benchmark's configurations; by default the first bar, the
    baseline, grey and the others blue."""
    with figure(path, figsize=(max(6.0, 0.6 * len(labels) + 2), 4.5), title=title) as (axes,):
        axes.bar(labels, values, color=colors or ["tab:gray"] + ["tab:blue"] * (len(values) - 1))
        axes.set_ylabel(ylabel)
        axes.tick_params(axis="x", labelrotation=30)
        for label in axes.get_xticklabels():
            label.set_horizontalalignment("right")
    return Path(path)


ENVIRONMENT_FILE = "environment.json"  # written inside --out


def build_parser() -> argparse.ArgumentParser:
    from ..commands.args import ArgumentParser, add_version

    parser = ArgumentParser(prog="python -m streamsynth.benchmarks.benchtools",
                            description="Prints the environment benchmarks record, as JSON.")
    add_version(parser)
    parser.add_argument("--device", default=None, help="also name this device (e.g. cuda, cuda:1, cpu)")
    parser.add_argument("--out", metavar="DIR", help=f"also write it to OUT/{ENVIRONMENT_FILE}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = environment(args.device)
    print(json.dumps(env, indent=2))
    if args.out:
        print(f"wrote {write_json(Path(args.out) / ENVIRONMENT_FILE, env)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
