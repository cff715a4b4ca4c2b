"""Compiles every Triton kernel for a GPU on a machine without one, at its models' shapes: registers, spills,
failures.

Triton's CPU interpreter accepts code the real compiler rejects and says nothing about registers. This runs each
kernel's wrapper on CPU tensors of every workload (`streamsynth.benchmarks.kernel_bench.workloads`: SD1.5's fast path and
BLIP-2's decoding attention), lets Triton bind and specialise the arguments as for a launch and compile them through
PTX to a cubin, and skips the launch (`streamsynth.kernels.compile_check`). Run it without TRITON_INTERPRET:

    python -m streamsynth.benchmarks.kernel_compile_check                 # sm_90: H100, H200
    python -m streamsynth.benchmarks.kernel_compile_check --cuda-arch 80,90    # and sm_80: A100
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..commands.args import ArgumentParser, add_version, comma_list, list_metavar
from ..kernels.compile_check import check, format_report
from ..kernels.workloads import DTYPES
from .kernel_bench import workloads


REPORT_FILE = "kernel-compile-check.json"  # written inside --out


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m streamsynth.benchmarks.kernel_compile_check", description=__doc__.split("\n\n")[0])
    add_version(parser)
    parser.add_argument("--cuda-arch", type=comma_list(int), default="90", metavar=list_metavar("SM"),
                        help="comma-separated CUDA compute capabilities to compile for, e.g. 80,90")
    parser.add_argument("--dtype", type=comma_list(choices=DTYPES), default=",".join(DTYPES),
                        metavar=list_metavar("DTYPE", DTYPES), help="comma-separated dtypes of the workloads")
    parser.add_argument("--out", metavar="DIR", help=f"also write the report to OUT/{REPORT_FILE}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    report = check(args.cuda_arch, args.dtype, lambda dtype: workloads(dtype, random=False))
    print(format_report(report))
    if args.out:
        from .benchtools import write_json

        print(f"wrote {write_json(Path(args.out) / REPORT_FILE, asdict(report))}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
