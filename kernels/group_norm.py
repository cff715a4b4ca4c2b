"""GroupNorm with an optional fused SiLU, for NCHW and channels_last tensors, with fp32 statistics.

In Stable Diffusion's ResNet blocks every GroupNorm is followed by a SiLU, and under channels_last PyTorch's
GroupNorm converts layouts around itself. This kernel reads the input once for the statistics and once more to
write the normalised, activated output in the input's own layout: no layout copies and no separate SiLU pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_float_dtype, check_same_device, is_enabled, runs_triton


def group_norm_reference(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, silu: bool
) -> torch.Tensor:
    """PyTorch's GroupNorm (and SiLU) computed in fp32 and rounded once to the input's dtype."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _position_stride(x: torch.Tensor) -> int | None:
    """The stride of the flattened spatial positions, or None when they cannot be flattened to one stride."""
    sizes, strides = x.shape[2:], x.stride()[2:]
    step = strides[-1]
    expected = step
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return step


def _check_inputs(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if x.dim() < 3:
        raise ValueError(
            f"group_norm expects (batch, channels, *spatial) with at least one spatial dimension, got shape "
            f"{tuple(x.shape)}: add a spatial dimension with x.unsqueeze(-1)"
        )
    check_float_dtype("x", x)
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"group_norm: {channels} channels are not divisible into {num_groups} groups: pick num_groups dividing "
            f"{channels}"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != (channels,):
            raise ValueError(f"group_norm: {name} has shape {tuple(param.shape)}, expected ({channels},)")
    if (weight is None) != (bias is None):
        raise ValueError("group_norm: give both weight and bias, or neither")
    check_same_device(x=x, weight=weight, bias=bias)
    if _position_stride(x) is None:
        raise ValueError(
            f"group_norm: the spatial positions of x (shape {tuple(x.shape)}, strides {x.stride()}) do not have one "
            "common stride: call x.contiguous() or x.contiguous(memory_format=torch.channels_last)"
        )


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """`F.group_norm` (then `F.silu` when `silu`) with fp32 statistics; the output keeps x's dtype and layout."""
    _check_inputs(x, num_groups, weight, bias)
    if not runs_triton("group_norm", x):
        return group_norm_reference(x, num_groups, weight, bias, eps, silu)
    from .group_norm_triton import launch

    y = torch.empty_like(x)  # x's strides where x is dense, else contiguous
    launch(x, y, num_groups, weight, bias, eps, silu, _position_stride(x), _position_stride(y))
    return y


# The kernel as a PyTorch operator: torch.compile (fullgraph included) and CUDA graphs see one opaque call with known
# output shape, instead of tracing into Triton's launcher, which Dynamo cannot trace and would break the graph at.
# The schema is written out: inferring it from string annotations depends on the PyTorch version.
@torch.library.custom_op("streamsynth::group_norm", mutates_args=(),
                         schema="(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu) "
                                "-> Tensor")
def group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float, silu: bool) -> torch.Tensor:
    return group_norm(x, num_groups, weight, bias, eps, silu)


@group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    return torch.empty_like(x)


class FusedGroupNorm(torch.nn.GroupNorm):
    """An `nn.GroupNorm` that runs the kernel, optionally with the SiLU that follows it in the model fused in.

    Switched off (see `kernels.dispatch`), it runs exactly the modules it replaced: GroupNorm, then SiLU if fused.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 silu: bool = False, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.silu = silu

    @classmethod
    def from_module(cls, norm: torch.nn.GroupNorm, silu: bool) -> "FusedGroupNorm":
        """A fused module sharing `norm`'s parameters, so the model's state dict and `.to()` calls still reach them."""
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, affine=False, silu=silu)
        fused.affine = norm.affine
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_enabled("group_norm"):
            y = super().forward(x)
            return F.silu(y) if self.silu else y
        return group_norm_op(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, silu={self.silu}"
