"""Which kernels are switched on, and whether a Triton kernel can run on a given tensor.

Every kernel can be switched off alone (for ablations and for bisecting a numerical difference): with
`set_enabled(name, False)`, with the context manager `disabled(name, ...)`, or for a whole process with
`STREAMSYNTH_DISABLE_KERNELS=group_norm,geglu`. A switched-off kernel runs its plain-PyTorch reference.

Triton is an optional extra: each kernel's Triton code sits in `<name>_triton.py` beside its module and is imported
only when the kernel runs (a CUDA tensor, or a CPU tensor under `TRITON_INTERPRET=1`), so the references run, and
everything here imports, on a machine without Triton.
"""

from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch

log = logging.getLogger(__name__)

# The Stable Diffusion fast path's kernels (what `streamsynth profile` ablates), then the captioner's.
DIFFUSION_KERNELS = ("group_norm", "geglu", "guided_step", "postprocess")
KERNEL_NAMES = (*DIFFUSION_KERNELS, "decode_attention")
DISABLE_ENV = "STREAMSYNTH_DISABLE_KERNELS"


def _disabled_from_env() -> set[str]:
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    unknown = names - set(KERNEL_NAMES)
    if unknown:
        raise ValueError(f"{DISABLE_ENV} names unknown kernels {sorted(unknown)}: use some of {list(KERNEL_NAMES)}")
    return names


_disabled: set[str] = _disabled_from_env()
# Set by `kernels.compile_check`: launches on CPU tensors are compiled for a GPU target and not run.
_compile_only = False
_fallbacks_logged: set[tuple[str, str]] = set()


def _check_name(name: str) -> None:
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}: use one of {list(KERNEL_NAMES)}")


def is_enabled(name: str) -> bool:
    _check_name(name)
    return name not in _disabled


def set_enabled(name: str, enabled: bool) -> None:
    _check_name(name)
    if enabled:
        _disabled.discard(name)
    else:
        _disabled.add(name)


@contextmanager
def disabled(*names: str) -> Iterator[None]:
    """Runs the block with the named kernels switched off (their references run instead)."""
    before = set(_disabled)
    for name in names:
        set_enabled(name, False)
    try:
        yield
    finally:
        _disabled.clear()
        _disabled.update(before)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (Triton reads the variable at decoration time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def triton_kernel(name: str):
    """Kernel `name`'s Triton function (`_<name>_kernel` of `<name>_triton.py`); this imports Triton."""
    _check_name(name)
    module = importlib.import_module(f"{__package__}.{name}_triton")
    return getattr(module, f"_{name}_kernel")


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def runs_triton(name: str, tensor: torch.Tensor) -> bool:
    """Whether kernel `name` runs its Triton version on `tensor`: it is switched on and can run there.

    Triton runs on CUDA tensors, and on CPU tensors only under the interpreter (slow; for tests), which needs
    TRITON_INTERPRET=1 set before the kernel's first run in the process. Anywhere else the reference runs, without
    importing Triton, and that is logged (at debug level) once per kernel and device type.
    """
    if not is_enabled(name):
        return False
    if tensor.is_cuda:
        return True
    if tensor.device.type == "cpu" and (_compile_only or (interpreter_requested()
                                                           and is_interpreted(triton_kernel(name)))):
        return True
    key = (name, tensor.device.type)
    if key not in _fallbacks_logged:
        _fallbacks_logged.add(key)
        log.debug(
            "kernel %s: Triton needs a CUDA tensor (or TRITON_INTERPRET=1 set before the kernel first runs, for CPU "
            "debugging); running the PyTorch reference on %s", name, tensor.device.type,
        )
    return False


def on_device(tensor: torch.Tensor) -> ContextManager:
    """Makes `tensor`'s GPU the current device for a launch: Triton launches on the current device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raises a ValueError naming the tensors when they do not all live on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}: move them with .to(device)")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {tensor.dtype}: use float32, float16 or bfloat16 (convert with .to(dtype))")
