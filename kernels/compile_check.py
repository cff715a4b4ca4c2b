"""Compiles every Triton kernel for a GPU on a machine without one: the check Triton's interpreter cannot make.

`TRITON_INTERPRET=1` runs kernels as NumPy, which accepts code the real compiler rejects (a loop variable whose type
changes, an op with no GPU lowering) and says nothing about registers or spills. This module runs each kernel's own
Python wrapper on CPU tensors of Stable Diffusion 1.5's shapes, in each dtype, lets Triton bind and specialise the
arguments exactly as for a launch, and compiles them for the target GPU through PTX to a cubin with the `ptxas`
Triton ships; only the launch itself is skipped. For every compiled variant it reports registers, local memory (spills)
and shared memory, read from the cubin with Triton's `cuobjdump`.

    python -m streamsynth.benchmarks.kernel_compile_check                 # SD1.5's launches for sm_90: H100, H200
    python -m streamsynth.benchmarks.kernel_compile_check --cuda-arch 80,90    # and sm_80: A100

`check(archs, dtypes, workloads)` takes the workloads to compile (`kernels.workloads.model_workloads` of a model's
configurations); the command above passes SD1.5's. `TRITON_INTERPRET` must be unset: Triton decides when a kernel is
decorated whether it will be interpreted.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from . import dispatch
from .workloads import DTYPES, Workload


@dataclass
class CompiledVariant:
    """One specialisation of one kernel as Triton compiled it for `arch`, with the cubin's resource usage."""

    kernel: str
    arch: int
    launch: str  # which workload launched it
    constexprs: dict
    num_warps: int
    registers: int | None = None
    local_bytes: int | None = None  # local memory per thread: register spills and stack arrays
    shared_bytes: int | None = None


@dataclass
class CheckReport:
    variants: list[CompiledVariant] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"arch", "launch", "error"}


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target GPU; there is no device to launch on."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        # Triton keeps its compiled kernels per device; one "device" per architecture keeps the targets apart.
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextmanager
def compile_only(arch: int, on_compiled: Callable[[object, object, dict], None]) -> Iterator[None]:
    """Within the block, kernel launches compile for `arch` and return; `on_compiled(jit_fn, compiled, kwargs)`."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    for name, kernel in _kernel_functions().items():
        if dispatch.is_interpreted(kernel):
            raise RuntimeError(
                f"kernel {name} was decorated under TRITON_INTERPRET=1, so it cannot be compiled: run the check in "
                "a process without TRITON_INTERPRET"
            )
    launch = JITFunction.run

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        compiled = launch(self, *args, grid=grid, warmup=True, **kwargs)
        on_compiled(self, compiled, kwargs)
        return compiled

    previous = getattr(driver, "_active", None)  # restored exactly: older Triton does not rebuild a None driver
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = compile_instead_of_launch
    dispatch._compile_only = True
    try:
        yield
    finally:
        dispatch._compile_only = False
        JITFunction.run = launch
        driver.set_active(previous)


def _kernel_functions() -> dict:
    return {name: dispatch.triton_kernel(name) for name in dispatch.KERNEL_NAMES}


_RESOURCES = re.compile(r"REG:(\d+) STACK:\d+ SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> tuple[int, int, int] | None:
    """(registers, shared bytes, local bytes) of the one function in `cubin`, from `cuobjdump -res-usage`."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", file.name], capture_output=True,
                                 text=True).stdout
    match = _RESOURCES.search(listing)
    return tuple(int(v) for v in match.groups()) if match else None


def check(archs: list[int], dtypes: list[str],
          workloads: Callable[[torch.dtype], Iterable[Workload]]) -> CheckReport:
    """Compiles every launch of `workloads(dtype)` (uninitialised CPU tensors will do) for each architecture and
    dtype name of `DTYPES`; never launches anything."""
    report = CheckReport()
    for arch in archs:
        seen: set[int] = set()
        current = ""

        def record(jit_fn, compiled, kwargs: dict) -> None:
            if id(compiled) in seen:  # Triton's cache hit: a variant compiled by an earlier launch
                return
            seen.add(id(compiled))
            variant = CompiledVariant(
                kernel=jit_fn.fn.__name__.strip("_").removesuffix("_kernel"), arch=arch, launch=current,
                constexprs={k: v for k, v in kwargs.items() if not k.startswith("num_")},
                num_warps=compiled.metadata.num_warps,
            )
            resources = cubin_resources(compiled.asm["cubin"])
            if resources:
                variant.registers, variant.shared_bytes, variant.local_bytes = resources
            report.variants.append(variant)

        with compile_only(arch, record):
            for dtype_name in dtypes:
                for workload in workloads(DTYPES[dtype_name]):
                    current = f"{dtype_name} {workload.kernel} {workload.description}"
                    try:
                        workload.run()
                    except Exception as err:  # noqa: BLE001 - every failure is reported, the check goes on
                        report.failures.append({"arch": arch, "launch": current,
                                                "error": f"{type(err).__name__}: {err}"})
    return report


def format_report(report: CheckReport) -> str:
    lines = [f"{'arch':>4}  {'kernel':<16} {'regs':>4} {'local B':>7} {'shared B':>8} {'warps':>5}  first launch"]
    for v in report.variants:
        lines.append(f"sm{v.arch:<2}  {v.kernel:<16} {v.registers or '?':>4} {v.local_bytes or 0:>7} "
                     f"{v.shared_bytes or 0:>8} {v.num_warps:>5}  {v.launch}")
    spilled = [v for v in report.variants if v.local_bytes]
    lines.append(f"{len(report.variants)} variants compiled, {len(spilled)} with local memory (spills), "
                 f"{len(report.failures)} failures")
    for failure in report.failures:
        lines.append(f"FAILED sm{failure['arch']} {failure['launch']}: {failure['error']}")
    return "\n".join(lines)
