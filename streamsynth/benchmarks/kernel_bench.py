"""Each Triton kernel against its PyTorch reference on a device, at every shape streamsynth's models call it with:
agreement, time, bandwidth.

The end-to-end ablation of `streamsynth profile` says what switching a kernel off costs a whole image; this says,
per call and shape, how far the kernel's output is from its reference and how their times compare, so that a
numerical problem or a slow variant is found in seconds on the first GPU run.

    python -m streamsynth.benchmarks.kernel_bench --device cuda --dtype fp16 --batch-size 8 --out runs/kernel-bench
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import benchtools
from ..commands.args import ArgumentParser, add_device, add_version, nonnegative_int, positive_int, resolve_device
from ..captions.architectures import BLIP2_ARCHITECTURES
from ..captions.captioners import REFERENCE_MAX_NEW_TOKENS
from ..kernels.dispatch import KERNEL_NAMES, disabled, runs_triton
from ..kernels.workloads import DTYPES, TOLERANCES, Workload, decode_attention_workloads, within_tolerance
from ..synth.sd15 import kernel_workloads

CAPTIONER_ARCH = "blip2-opt-2.7b"  # whose decoding attention the workloads hold
CAPTION_BATCHES = (65, 512)  # the reference loop's batch and streamsynth's on a large GPU


def workloads(dtype: torch.dtype, device: str | torch.device = "cpu", batch: int = 1, kernel: str | None = None,
              random: bool = True, upcast: torch.dtype | None = None) -> Iterator[Workload]:
    """Every kernel call of streamsynth's models (or of `kernel` only): SD1.5's fast path for `batch` images
    (`synth.sd15.kernel_workloads`), then BLIP-2 OPT-2.7b's decoding attention for `CAPTION_BATCHES` captions over
    graphed decoding's cache (the query tokens, BOS and every new token). `random` and `upcast` as in
    `kernels.workloads.model_workloads`."""
    yield from kernel_workloads(dtype, device, batch, random=random, kernel=kernel, upcast=upcast)
    if kernel in (None, "decode_attention"):
        spec = BLIP2_ARCHITECTURES[CAPTIONER_ARCH]
        cache_length = spec["num_query_tokens"] + 1 + REFERENCE_MAX_NEW_TOKENS
        yield from decode_attention_workloads(spec["text_config"], cache_length, dtype, device, CAPTION_BATCHES,
                                              random=random, upcast=upcast)


@dataclass
class KernelTiming:
    kernel: str
    workload: str
    reference_ms: float
    kernel_ms: float
    speedup: float
    kernel_gb_per_s: float  # the minimum bytes the call must move, over the kernel's time
    max_abs_error: float  # kernel against reference, both in the workload's dtype
    # Each against the exact result (the reference on the same inputs in float32), in fp16/bf16 only: kernel and
    # reference can differ by more than the tolerance while both are as far from the exact result (`agrees`).
    kernel_error_vs_exact: float | None
    reference_error_vs_exact: float | None
    within_tolerance: bool  # of the reference, or as close to the exact result as the reference (`agrees`)


def bench(device: str, dtype: torch.dtype, batch: int = 1, warmup: int = 3, repeats: int = 20,
          only: str | None = None) -> list[KernelTiming]:
    """Runs every workload (whose kernel is `only`, if given) with the kernel and with its reference: the median of
    `repeats` timed calls each, after `warmup` untimed ones (`benchtools.measure`: CUDA events on a GPU)."""
    device = benchtools.as_device(device)
    calls = workloads(dtype, device, batch, kernel=only)
    # The same inputs in float32, workload by workload: only for reduced precision, where rounding differs.
    exact_calls = (workloads(dtype, device, batch, kernel=only, upcast=torch.float32)
                   if dtype in (torch.float16, torch.bfloat16) else itertools.repeat(None))
    results = []
    with benchtools.on_device(device):
        for workload, exact_workload in zip(calls, exact_calls):
            fast = workload.run()
            with disabled(workload.kernel):
                reference = workload.run()
                reference_ms = 1000 * benchtools.measure(workload.run, device, warmup, repeats).median_s
                exact = exact_workload.run() if exact_workload is not None else None
            kernel_ms = 1000 * benchtools.measure(workload.run, device, warmup, repeats).median_s
            kernel_error, reference_error = (None, None) if exact is None else (_max_error(fast, exact),
                                                                               _max_error(reference, exact))
            results.append(KernelTiming(
                kernel=workload.kernel, workload=workload.description, reference_ms=reference_ms,
                kernel_ms=kernel_ms, speedup=reference_ms / kernel_ms,
                kernel_gb_per_s=workload.bytes_moved / kernel_ms / 1e6,
                max_abs_error=_max_error(fast, reference),
                kernel_error_vs_exact=kernel_error, reference_error_vs_exact=reference_error,
                within_tolerance=agrees(fast, reference, exact, dtype),
            ))
    return results


def agrees(output: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> bool:
    """Whether a kernel's output is within its reference's tolerance or, given the `exact` result of a workload run
    in `dtype`, no farther from it than the reference is, give or take `dtype`'s absolute tolerance.

    The second test is for reduced precision: the fused step rounds its intermediates as diffusers' fp16 ops do, and
    one intermediate rounded the other way (CUDA's scalar arithmetic) moves an output by more than the tolerance
    from the reference while both stay equally far from the exact result; a kernel reading fp16 and writing fp32
    (post-processing) is held to its inputs' precision, not to fp32's.
    """
    if within_tolerance(output, reference):
        return True
    if exact is None or dtype is None:
        return False
    return _max_error(output, exact) <= _max_error(reference, exact) + TOLERANCES[dtype]


def _max_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return (output.double() - target.double()).abs().max().item()


def format_results(results: list[KernelTiming]) -> str:
    lines = [f"{'kernel':<16} {'workload':<36} {'ref ms':>8} {'kernel ms':>9} {'speedup':>7} {'GB/s':>7} "
             f"{'max err':>9} {'exact: kernel':>13} {'ref':>9}  ok"]
    for r in results:
        exact = ("" if r.kernel_error_vs_exact is None
                 else f"{r.kernel_error_vs_exact:>13.2e} {r.reference_error_vs_exact:>9.2e}")
        lines.append(f"{r.kernel:<16} {r.workload:<36} {r.reference_ms:>8.3f} {r.kernel_ms:>9.3f} {r.speedup:>7.2f} "
                     f"{r.kernel_gb_per_s:>7.0f} {r.max_abs_error:>9.2e} {exact:>23}  "
                     f"{'yes' if r.within_tolerance else 'NO'}")
    for kernel, rows in _by_kernel(results).items():
        total_ref, total_kernel = sum(r.reference_ms for r in rows), sum(r.kernel_ms for r in rows)
        outside = sum(not r.within_tolerance for r in rows)
        lines.append(f"{kernel}: {len(rows)} workloads, {total_ref:.3f} ms -> {total_kernel:.3f} ms summed "
                     f"({total_ref / total_kernel:.2f}x), {outside} outside tolerance")
    return "\n".join(lines)


def _by_kernel(results: list[KernelTiming]) -> dict[str, list[KernelTiming]]:
    grouped: dict[str, list[KernelTiming]] = {}
    for r in results:
        grouped.setdefault(r.kernel, []).append(r)
    return grouped


REPORT_FILE, CHART_FILE = "kernel-bench.json", "kernel-bench.png"  # written inside --out


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m streamsynth.benchmarks.kernel_bench", description=__doc__.split("\n\n")[0])
    add_version(parser)
    add_device(parser)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="the workloads' dtype")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=1, help="images (the UNet workloads see twice as many; "
                        f"the decoding attention's are at {' and '.join(map(str, CAPTION_BATCHES))} captions)")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed calls before the timed ones, per workload")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed calls per workload, median reported")
    parser.add_argument("--only", choices=KERNEL_NAMES, help="one kernel's workloads")
    parser.add_argument("--out", metavar="DIR", help=f"also write the results to OUT/{REPORT_FILE} and a chart of each "
                        f"kernel's summed time, OUT/{CHART_FILE}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    device = benchtools.as_device(args.device)
    ran_triton = runs_triton("group_norm", torch.empty(0, device=device))
    results = bench(args.device, DTYPES[args.dtype], args.batch_size, args.warmup, args.repeats, args.only)
    print(format_results(results))
    name = benchtools.device_name(device)
    if not ran_triton:
        print(f"note: no Triton kernel ran on {name} (it needs CUDA, or TRITON_INTERPRET=1 on the CPU): "
              "both columns timed the reference")
    if args.out:
        path = benchtools.write_json(Path(args.out) / REPORT_FILE, {
            "benchmark": "kernel-bench", "device": name, "dtype": args.dtype, "batch": args.batch_size,
            "warmup": args.warmup, "repeats": args.repeats, "kernels_ran_triton": ran_triton,
            "environment": benchtools.environment(device), "results": [asdict(r) for r in results],
        })
        grouped = _by_kernel(results)
        labels = [f"{k} {side}" for k in grouped for side in ("reference", "kernel")]
        values = [sum(getattr(r, f"{side}_ms") for r in rows) for rows in grouped.values()
                  for side in ("reference", "kernel")]
        chart = benchtools.bar_chart(Path(args.out) / CHART_FILE, labels, values,
                                     "ms, summed over the workloads", f"kernels against references on {name}, "
                                     f"{args.dtype}, batch {args.batch_size}",
                                     colors=["tab:gray", "tab:blue"] * len(grouped))
        print(f"wrote {path} and {chart}")
    return 0 if all(r.within_tolerance for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
