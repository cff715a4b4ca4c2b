"""diffusers' GEGLU gate: bias, split, exact GELU and product in one pass over the projection's output.

diffusers computes `h, gate = proj(x).chunk(2, -1); h * gelu(gate)`, which writes and re-reads the gate and the
GELU output as separate full-size tensors (the feed-forward of every transformer block, 8 x 320..1280 wide in
SD1.5). Here the projection runs as a bias-free matmul and one kernel adds the bias, splits, gates and writes the
half-width result once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU

from .dispatch import check_float_dtype, check_same_device, is_enabled, runs_triton


def geglu_reference(projected: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' arithmetic in the input's dtype: add the bias, split the last dimension, `h * gelu(gate)`."""
    if bias is not None:
        projected = projected + bias
    h, gate = projected.chunk(2, dim=-1)
    return h * F.gelu(gate)


def _check_inputs(projected: torch.Tensor, bias: torch.Tensor | None) -> None:
    if projected.dim() < 1 or projected.shape[-1] % 2:
        raise ValueError(
            f"geglu expects (..., 2 * width) with an even last dimension, got shape {tuple(projected.shape)}"
        )
    check_float_dtype("projected", projected)
    if not projected.is_contiguous():
        raise ValueError(f"geglu: projected (strides {projected.stride()}) must be contiguous: call .contiguous()")
    if bias is not None and bias.shape != (projected.shape[-1],):
        raise ValueError(f"geglu: bias has shape {tuple(bias.shape)}, expected ({projected.shape[-1]},)")
    check_same_device(projected=projected, bias=bias)


def geglu(projected: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`h * gelu(gate)` for `h, gate = (projected + bias).chunk(2, -1)`, computed in fp32, rounded once."""
    _check_inputs(projected, bias)
    if not runs_triton("geglu", projected):
        return geglu_reference(projected, bias)
    from .geglu_triton import launch

    return launch(projected, bias)


# As `streamsynth::group_norm`: an opaque operator for torch.compile and CUDA graphs.
@torch.library.custom_op("streamsynth::geglu", mutates_args=(), schema="(Tensor projected, Tensor? bias) -> Tensor")
def geglu_op(projected: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return geglu(projected, bias)


@geglu_op.register_fake
def _(projected, bias):
    return projected.new_empty(*projected.shape[:-1], projected.shape[-1] // 2)


class FusedGEGLU(GEGLU):
    """diffusers' `GEGLU` with the gate fused; the class of a patched module, so its `proj` and weights stay put.

    Switched off (see `kernels.dispatch`), it runs diffusers' own forward.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not is_enabled("geglu"):
            return super().forward(hidden_states, *args, **kwargs)
        return geglu_op(F.linear(hidden_states, self.proj.weight), self.proj.bias)
