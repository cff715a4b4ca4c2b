"""Imports streamsynth's Triton kernels under Triton's CPU interpreter, for the test modules that run them.

Triton decides at decoration time, i.e. when `kernels.*` is imported, whether a kernel is interpreted, from
TRITON_INTERPRET. The variable is set only around that import, so other test files see the environment they had;
modules imported earlier without it are reloaded.
"""

from __future__ import annotations

import importlib
import os
import sys

KERNEL_MODULES = ("kernels.group_norm", "kernels.geglu", "kernels.guided_step", "kernels.postprocess", "kernels.patch")


def import_kernels_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from kernels.dispatch import is_interpreted

        stale = "kernels.group_norm" in sys.modules and not is_interpreted(
            sys.modules["kernels.group_norm"]._group_norm_kernel
        )
        for name in KERNEL_MODULES:
            module = importlib.import_module(name)
            if stale:
                importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
