"""The Triton kernel of `guided_step.py` (reference, checks, scheduler logic there), imported only when it runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import on_device

BLOCK = 1024


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    # PyTorch rounds each elementwise op's result to the tensor dtype; doing the same keeps equality with diffusers.
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _guided_step_kernel(
    NOISE, SAMPLE, E1, E2, E3, PREV, EPS, n, scale,
    c0, c1, c2, c3, clip_range,
    GUIDED: tl.constexpr, RULE: tl.constexpr, STORE_EPS: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    DTYPE: tl.constexpr = PREV.dtype.element_ty
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    if GUIDED:  # torch.cat([uncond, cond]) puts the unconditional half first
        uncond = tl.load(NOISE + offsets, mask=mask, other=0.0).to(tl.float32)
        cond = tl.load(NOISE + n + offsets, mask=mask, other=0.0).to(tl.float32)
        eps = _rounded(uncond + _rounded(scale * _rounded(cond - uncond, DTYPE), DTYPE), DTYPE)
    else:
        eps = tl.load(NOISE + offsets, mask=mask, other=0.0).to(tl.float32)
    if STORE_EPS:
        tl.store(EPS + offsets, eps.to(DTYPE), mask=mask)
    x = tl.load(SAMPLE + offsets, mask=mask, other=0.0).to(tl.float32)

    if RULE == 0:  # DDIM, eta=0: c0 = sqrt(1 - a_t), c1 = sqrt(a_t), c2 = sqrt(a_prev), c3 = sqrt(1 - a_prev)
        x0 = _rounded(_rounded(x - _rounded(c0 * eps, DTYPE), DTYPE) / c1, DTYPE)
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
        prev = _rounded(c2 * x0, DTYPE) + _rounded(c3 * eps, DTYPE)
    else:  # PLMS: c0 = sqrt(a_prev / a_t), c1 = a_prev - a_t, c2 = the denominator of PNDM's formula (9)
        if RULE == 1:
            combined = eps
        elif RULE == 2:
            e1 = tl.load(E1 + offsets, mask=mask, other=0.0).to(tl.float32)
            combined = _rounded(_rounded(eps + e1, DTYPE) / 2, DTYPE)
        elif RULE == 3:
            e1 = tl.load(E1 + offsets, mask=mask, other=0.0).to(tl.float32)
            combined = _rounded(_rounded(_rounded(3 * eps, DTYPE) - e1, DTYPE) / 2, DTYPE)
        elif RULE == 4:
            e1 = tl.load(E1 + offsets, mask=mask, other=0.0).to(tl.float32)
            e2 = tl.load(E2 + offsets, mask=mask, other=0.0).to(tl.float32)
            combined = _rounded(_rounded(23 * eps, DTYPE) - _rounded(16 * e1, DTYPE), DTYPE)
            combined = _rounded(_rounded(combined + _rounded(5 * e2, DTYPE), DTYPE) / 12, DTYPE)
        else:
            e1 = tl.load(E1 + offsets, mask=mask, other=0.0).to(tl.float32)
            e2 = tl.load(E2 + offsets, mask=mask, other=0.0).to(tl.float32)
            e3 = tl.load(E3 + offsets, mask=mask, other=0.0).to(tl.float32)
            combined = _rounded(_rounded(55 * eps, DTYPE) - _rounded(59 * e1, DTYPE), DTYPE)
            combined = _rounded(combined + _rounded(37 * e2, DTYPE), DTYPE)
            combined = _rounded(combined - _rounded(9 * e3, DTYPE), DTYPE)
            combined = _rounded((1 / 24) * combined, DTYPE)
        prev = _rounded(c0 * x, DTYPE) - _rounded(_rounded(c1 * combined, DTYPE) / c2, DTYPE)
    tl.store(PREV + offsets, prev.to(DTYPE), mask=mask)


def launch(noise: torch.Tensor, sample: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor, e3: torch.Tensor,
           prev: torch.Tensor, eps: torch.Tensor, scale: float, coefficients: tuple[float, float, float, float],
           clip_range: float, *, guided: bool, rule: int, store_eps: bool, clip: bool) -> None:
    """Runs the kernel on inputs `fused_update` has checked; writes `prev` (and `eps` when `store_eps`)."""
    n = sample.numel()
    with on_device(sample):
        _guided_step_kernel[(triton.cdiv(n, BLOCK),)](
            noise, sample, e1, e2, e3, prev, eps, n, scale, *coefficients, clip_range,
            GUIDED=guided, RULE=rule, STORE_EPS=store_eps, CLIP=clip, BLOCK=BLOCK,
        )
