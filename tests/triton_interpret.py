"""Runs streamsynth's Triton kernels under Triton's CPU interpreter in the test modules that import this.

Triton reads TRITON_INTERPRET when a kernel is decorated (when `kernels.*` is imported) and again inside its first
interpreted launch, so the variable is set around the import and, through the module-scoped autouse fixture
`triton_interpreter`, around the importing module's tests; other test files see the environment they had.
Kernel modules imported earlier without it are reloaded.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager

import pytest

KERNEL_MODULES = ("kernels.group_norm", "kernels.geglu", "kernels.guided_step", "kernels.postprocess", "kernels.patch")


@contextmanager
def interpreter_env():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def import_kernels_interpreted() -> None:
    with interpreter_env():
        from kernels.dispatch import is_interpreted

        loaded = sys.modules.get("kernels.group_norm")
        stale = loaded is not None and not is_interpreted(loaded._group_norm_kernel)
        for name in KERNEL_MODULES:
            module = importlib.import_module(name)
            if stale:
                importlib.reload(module)


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    with interpreter_env():
        yield
