"""The Triton kernel of `geglu.py` (reference, checks and module there), imported only when it runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import on_device

BLOCK_COLUMNS = 1024


@triton.jit
def _geglu_kernel(P, B, Y, row_stride, width, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < width
    h = tl.load(P + row * row_stride + columns, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(P + row * row_stride + width + columns, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + columns, mask=mask, other=0.0).to(tl.float32)
        gate += tl.load(B + width + columns, mask=mask, other=0.0).to(tl.float32)
    # Exact (erf) GELU, as F.gelu's default.
    y = h * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    tl.store(Y + row * width + columns, y.to(Y.dtype.element_ty), mask=mask)


def launch(projected: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Runs the kernel on inputs `geglu` has checked."""
    width = projected.shape[-1] // 2
    y = projected.new_empty(*projected.shape[:-1], width)
    rows = projected.numel() // projected.shape[-1]
    block = min(BLOCK_COLUMNS, triton.next_power_of_2(width))
    with on_device(projected):
        _geglu_kernel[(rows, triton.cdiv(width, block))](
            projected, bias if bias is not None else projected, y, projected.shape[-1], width,
            HAS_BIAS=bias is not None, BLOCK=block,
        )
    return y
