"""Compiles every Triton kernel for a GPU on a machine without one: the check Triton's interpreter cannot make.

`TRITON_INTERPRET=1` runs kernels as NumPy, which accepts code the real compiler rejects (a loop variable whose type
changes, an op with no GPU lowering) and says nothing about registers or spills. This module runs each kernel's own
Python wrapper on CPU tensors of Stable Diffusion 1.5's shapes, in each dtype, lets Triton bind and specialise the
arguments exactly as for a launch, and compiles them for the target GPU through PTX to a cubin with the `ptxas`
Triton ships; only the launch itself is skipped. For every compiled variant it reports registers, local memory (spills)
and shared memory, read from the cubin with Triton's `cuobjdump`.

    python -m kernels.compile_check                 # sm_90: H100, H200
    python -m kernels.compile_check --arch 80 90    # and sm_80: A100

`TRITON_INTERPRET` must be unset: Triton decides when a kernel is decorated whether it will be interpreted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from . import dispatch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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

    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = compile_instead_of_launch
    dispatch._compile_only = True
    try:
        yield
    finally:
        dispatch._compile_only = False
        JITFunction.run = launch
        driver.set_active(None)  # the real driver is found again on next use (reset_active would demand one now)


def _kernel_functions() -> dict:
    from .geglu import _geglu_kernel
    from .group_norm import _group_norm_kernel
    from .guided_step import _guided_step_kernel
    from .postprocess import _postprocess_kernel

    return {"group_norm": _group_norm_kernel, "geglu": _geglu_kernel, "guided_step": _guided_step_kernel,
            "postprocess": _postprocess_kernel}


def sd15_launches(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    """(description, launch) for every way the fast path calls a kernel on SD1.5 at 512², batch 1.

    Shapes come from SD1.5's configuration: they decide the block sizes, so these are the variants a real run compiles.
    """
    from streamsynth.synth.sd15 import UNET, VAE

    from .geglu import geglu
    from .group_norm import group_norm
    from .guided_step import DDIM, PLMS_2, PLMS_3, PLMS_4, PLMS_FIRST, PLMS_SECOND, fused_update
    from .postprocess import postprocess

    def tensor(*shape: int, channels_last: bool = False) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    latent = UNET["sample_size"]
    unet_levels = [(c, latent >> i) for i, c in enumerate(UNET["block_out_channels"])]
    vae_levels = [(c, VAE["sample_size"] >> i) for i, c in enumerate(VAE["block_out_channels"])]
    for where, groups, levels in (("unet", UNET["norm_num_groups"], unet_levels),
                                  ("vae", VAE["norm_num_groups"], vae_levels)):
        for channels, side in levels:
            affine = (tensor(channels), tensor(channels))
            for layout in ("nchw", "channels_last"):
                x = tensor(1, channels, side, side, channels_last=layout == "channels_last")
                for silu in (True, False):
                    yield (f"group_norm {where} {channels}x{side}² {layout} silu={silu}",
                           lambda x=x, g=groups, a=affine, s=silu: group_norm(x, g, *a, silu=s))
            # the attention blocks' GroupNorm on a (batch, channels, tokens) transposed view
            tokens = tensor(1, side * side, channels).transpose(1, 2)
            yield (f"group_norm {where} {channels}x{side}² tokens-view",
                   lambda x=tokens, g=groups, a=affine: group_norm(x, g, *a))
    yield "group_norm without affine", lambda: group_norm(tensor(1, 320, 64, 64), 32)

    for channels, side in unet_levels[:3]:  # the levels with transformer blocks; GEGLU's inner width is 4x
        yield (f"geglu {channels}x{side}²",
               lambda c=channels, s=side: geglu(tensor(1, s * s, 8 * c), tensor(8 * c)))
    yield "geglu without bias", lambda: geglu(tensor(1, 64 * 64, 8 * 320))

    sample = tensor(1, UNET["in_channels"], latent, latent)
    history = [tensor(*sample.shape) for _ in range(3)]
    for guided in (True, False):
        noise = tensor(2 * sample.shape[0], *sample.shape[1:]) if guided else tensor(*sample.shape)
        scale = 1.5 if guided else None
        for clip in (None, 1.0):
            yield (f"guided_step ddim guided={guided} clip={clip is not None}",
                   lambda n=noise, s=scale, c=clip: fused_update(n, sample, [], DDIM, (0.5, 0.9, 0.8, 0.6), s,
                                                                 store_eps=False, clip_range=c))
        for rule, previous in ((PLMS_FIRST, 0), (PLMS_SECOND, 1), (PLMS_2, 1), (PLMS_3, 2), (PLMS_4, 3)):
            yield (f"guided_step plms rule={rule} guided={guided}",
                   lambda n=noise, s=scale, r=rule, p=previous: fused_update(
                       n, sample, history[:p], r, (1.1, 0.01, 0.5), s, store_eps=r != PLMS_SECOND))

    decoded = tensor(1, VAE["out_channels"], VAE["sample_size"], VAE["sample_size"])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for size in (224, 128, None):
        yield f"postprocess 512²->{size} uint8", lambda s=size: postprocess(decoded, s)
        yield f"postprocess 512²->{size} normalised", lambda s=size: postprocess(decoded, s, mean, std)


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


def check(archs: list[int], dtypes: list[str]) -> CheckReport:
    """Compiles every SD1.5 launch of every kernel for each architecture and dtype; never launches anything."""
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
                for description, launch in sd15_launches(DTYPES[dtype_name]):
                    current = f"{dtype_name} {description}"
                    try:
                        launch()
                    except Exception as err:  # noqa: BLE001 - every failure is reported, the check goes on
                        report.failures.append({"arch": arch, "launch": current,
                                                "error": f"{type(err).__name__}: {err}"})
    return report


def format_report(report: CheckReport) -> str:
    lines = [f"{'arch':>4}  {'kernel':<12} {'regs':>4} {'local B':>7} {'shared B':>8} {'warps':>5}  first launch"]
    for v in report.variants:
        lines.append(f"sm{v.arch:<2}  {v.kernel:<12} {v.registers or '?':>4} {v.local_bytes or 0:>7} "
                     f"{v.shared_bytes or 0:>8} {v.num_warps:>5}  {v.launch}")
    spilled = [v for v in report.variants if v.local_bytes]
    lines.append(f"{len(report.variants)} variants compiled, {len(spilled)} with local memory (spills), "
                 f"{len(report.failures)} failures")
    for failure in report.failures:
        lines.append(f"FAILED sm{failure['arch']} {failure['launch']}: {failure['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    report = check(args.arch, args.dtype)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(asdict(report), file, indent=2)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
