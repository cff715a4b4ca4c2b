"""GroupNorm with an optional fused SiLU, for NCHW and channels_last tensors, with fp32 statistics.

In Stable Diffusion's ResNet blocks every GroupNorm is followed by a SiLU, and under channels_last PyTorch's
GroupNorm converts layouts around itself. This kernel reads the input once for the statistics and once more to
write the normalised, activated output in the input's own layout: no layout copies and no separate SiLU pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import check_float_dtype, check_same_device, is_enabled, runs_triton

# Elements of one (channels x positions) tile; a group is visited in tiles of this size.
TILE_ELEMENTS = 4096


def group_norm_reference(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, silu: bool
) -> torch.Tensor:
    """PyTorch's GroupNorm (and SiLU) computed in fp32 and rounded once to the input's dtype."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


@triton.jit
def _group_norm_kernel(
    X, Y, W, B,
    stride_b, stride_c, stride_s, out_stride_b, out_stride_c, out_stride_s,
    num_channels, num_positions, channels_per_group, eps,
    HAS_AFFINE: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program normalises one (sample, group). The tile is positions x channels, so the same code reads NCHW
    # (stride_s == 1) and channels_last (stride_c == 1) memory; Triton specialises unit strides.
    pid = tl.program_id(0)
    num_groups = num_channels // channels_per_group
    batch = pid // num_groups
    group = pid % num_groups
    channels = group * channels_per_group + tl.arange(0, BLOCK_C)
    channel_mask = tl.arange(0, BLOCK_C) < channels_per_group
    base = batch.to(tl.int64) * stride_b
    out_base = batch.to(tl.int64) * out_stride_b

    # Statistics tile by tile, merged with Chan's parallel formula: stable where sum-of-squares would cancel.
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(0, num_positions, BLOCK_S):
        positions = start + tl.arange(0, BLOCK_S)
        mask = (positions < num_positions)[:, None] & channel_mask[None, :]
        offsets = base + positions.to(tl.int64)[:, None] * stride_s + channels.to(tl.int64)[None, :] * stride_c
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tile_count
        centred = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / total)
        m2 += tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    if HAS_AFFINE:
        scale = tl.load(W + channels, mask=channel_mask, other=0.0).to(tl.float32) * rstd
        shift = tl.load(B + channels, mask=channel_mask, other=0.0).to(tl.float32) - mean * scale
    else:
        scale = tl.zeros((BLOCK_C,), tl.float32) + rstd
        shift = tl.zeros((BLOCK_C,), tl.float32) - mean * rstd
    for start in range(0, num_positions, BLOCK_S):
        positions = start + tl.arange(0, BLOCK_S)
        mask = (positions < num_positions)[:, None] & channel_mask[None, :]
        offsets = base + positions.to(tl.int64)[:, None] * stride_s + channels.to(tl.int64)[None, :] * stride_c
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        out_offsets = (out_base + positions.to(tl.int64)[:, None] * out_stride_s
                       + channels.to(tl.int64)[None, :] * out_stride_c)
        tl.store(Y + out_offsets, y.to(Y.dtype.element_ty), mask=mask)


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
    if not runs_triton("group_norm", _group_norm_kernel, x):
        return group_norm_reference(x, num_groups, weight, bias, eps, silu)
    y = torch.empty_like(x)  # x's strides where x is dense, else contiguous
    channels_per_group = x.shape[1] // num_groups
    num_positions = x[0, 0].numel()
    block_c = triton.next_power_of_2(channels_per_group)
    block_s = min(triton.next_power_of_2(num_positions), max(1, TILE_ELEMENTS // block_c))
    has_affine = weight is not None
    _group_norm_kernel[(x.shape[0] * num_groups,)](
        x, y, weight if has_affine else x, bias if has_affine else x,
        x.stride(0), x.stride(1), _position_stride(x), y.stride(0), y.stride(1), _position_stride(y),
        x.shape[1], num_positions, channels_per_group, eps,
        HAS_AFFINE=has_affine, SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
    )
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
