"""Each kernel against its PyTorch reference on a device, for every SD1.5 workload: agreement, time and bandwidth.

The end-to-end ablation of `streamsynth profile` says what switching a kernel off costs a whole image; this says,
per call and shape, how far the kernel's output is from its reference and how their times compare, so that a
numerical problem or a slow variant is found in seconds on the first GPU run.

    python -m kernels.bench --device cuda --dtype fp16 --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .dispatch import disabled, runs_triton
from .workloads import DTYPES, sd15_workloads

# Kernel output against reference output, both on the device (as in tests/test_kernels.py): atol = rtol per dtype.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# uint8 images: every pixel within one level (a value one rounding from .5) and at least 99% of them equal.
UINT8_MIN_EQUAL = 0.99


def within_tolerance(output: torch.Tensor, reference: torch.Tensor) -> bool:
    error = (output.float() - reference.float()).abs()
    if output.dtype == torch.uint8:
        return bool(error.max() <= 1) and (error == 0).float().mean().item() >= UINT8_MIN_EQUAL
    tolerance = TOLERANCES[output.dtype]
    return bool((error <= tolerance + tolerance * reference.float().abs()).all())


@dataclass
class KernelTiming:
    kernel: str
    workload: str
    reference_ms: float
    kernel_ms: float
    speedup: float
    kernel_gb_per_s: float  # the minimum bytes the call must move, over the kernel's time
    max_abs_error: float
    within_tolerance: bool


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in milliseconds; on CUDA measured with events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def bench(device: str, dtype: torch.dtype, batch: int = 1, warmup: int = 3, repeats: int = 20,
          only: str | None = None) -> list[KernelTiming]:
    """Runs every workload (whose kernel is `only`, if given) with the kernel and with its reference."""
    device = torch.device(device)
    results = []
    for workload in sd15_workloads(dtype, device, batch):
        if only and workload.kernel != only:
            continue
        fast = workload.run()
        with disabled(workload.kernel):
            reference = workload.run()
            reference_ms = median_ms(workload.run, device, warmup, repeats)
        kernel_ms = median_ms(workload.run, device, warmup, repeats)
        results.append(KernelTiming(
            kernel=workload.kernel, workload=workload.description, reference_ms=reference_ms, kernel_ms=kernel_ms,
            speedup=reference_ms / kernel_ms, kernel_gb_per_s=workload.bytes_moved / kernel_ms / 1e6,
            max_abs_error=(fast.float() - reference.float()).abs().max().item(),
            within_tolerance=within_tolerance(fast, reference),
        ))
    return results


def format_results(results: list[KernelTiming]) -> str:
    lines = [f"{'kernel':<12} {'workload':<36} {'ref ms':>8} {'kernel ms':>9} {'speedup':>7} {'GB/s':>7} "
             f"{'max err':>9}  ok"]
    for r in results:
        lines.append(f"{r.kernel:<12} {r.workload:<36} {r.reference_ms:>8.3f} {r.kernel_ms:>9.3f} {r.speedup:>7.2f} "
                     f"{r.kernel_gb_per_s:>7.0f} {r.max_abs_error:>9.2e}  {'yes' if r.within_tolerance else 'NO'}")
    for kernel in dict.fromkeys(r.kernel for r in results):
        rows = [r for r in results if r.kernel == kernel]
        total_ref, total_kernel = sum(r.reference_ms for r in rows), sum(r.kernel_ms for r in rows)
        outside = sum(not r.within_tolerance for r in rows)
        lines.append(f"{kernel}: {len(rows)} workloads, {total_ref:.3f} ms -> {total_kernel:.3f} ms summed "
                     f"({total_ref / total_kernel:.2f}x), {outside} outside tolerance")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--batch", type=int, default=1, help="images (the UNet workloads see twice as many)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", help="one kernel's workloads, e.g. group_norm")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    probe = torch.empty(0, device=args.device)
    from .group_norm import _group_norm_kernel

    ran_triton = runs_triton("group_norm", _group_norm_kernel, probe)
    results = bench(args.device, dtype, args.batch, args.warmup, args.repeats, args.only)
    print(format_results(results))
    device_name = torch.cuda.get_device_name(probe.device) if probe.is_cuda else "cpu"
    if not ran_triton:
        print(f"note: no Triton kernel ran on {device_name} (it needs CUDA, or TRITON_INTERPRET=1 on the CPU): "
              "both columns timed the reference")
    if args.json:
        import triton

        with open(args.json, "w") as file:
            json.dump({"device": device_name, "dtype": args.dtype, "batch": args.batch, "torch": torch.__version__,
                       "triton": triton.__version__, "kernels_ran_triton": ran_triton,
                       "results": [asdict(r) for r in results]}, file, indent=2)
    return 0 if all(r.within_tolerance for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
