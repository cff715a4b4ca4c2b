"""The Triton kernel of `group_norm.py` (reference, checks and module there), imported only when it runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import on_device

# Elements of one (channels x positions) tile; a group is visited in tiles of this size.
TILE_ELEMENTS = 4096


@triton.jit
def _merge(mean, m2, count, tile_mean, tile_m2, tile_count):
    """Running statistics (mean, sum of squared deviations, count) merged with one tile's by Chan's parallel formula:
    stable where a sum of squares would cancel."""
    total = count + tile_count
    delta = tile_mean - mean
    return mean + delta * (tile_count / total), m2 + tile_m2 + delta * delta * (count * tile_count / total), total


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

    # Statistics tile by tile, merged by `_merge`.
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
        mean, m2, count = _merge(mean, m2, count, tile_mean, tl.sum(tl.sum(centred * centred, axis=1), axis=0),
                                 tile_count)
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


@triton.jit
def _group_norm_flat_kernel(
    X, Y, W, B, stride_b, out_stride_b, num_channels, num_positions, channels_per_group, eps,
    HAS_AFFINE: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    # NCHW with every group's channels one contiguous run: one program walks its (sample, group) as a flat array,
    # every lane busy, where the tiled kernel's channel axis, padded to a power of two, idles the rest (10 channels a
    # group in SD1.5's 320-channel layers: 6 of 16 lanes; measured 0.79-0.94x PyTorch there on an H200).
    pid = tl.program_id(0)
    num_groups = num_channels // channels_per_group
    batch = pid // num_groups
    group = pid % num_groups
    group_size = channels_per_group * num_positions
    base = batch.to(tl.int64) * stride_b + group.to(tl.int64) * group_size
    out_base = batch.to(tl.int64) * out_stride_b + group.to(tl.int64) * group_size

    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(0, group_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < group_size
        x = tl.load(X + base + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count = tl.sum(mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tile_count
        centred = tl.where(mask, x - tile_mean, 0.0)
        mean, m2, count = _merge(mean, m2, count, tile_mean, tl.sum(centred * centred, axis=0), tile_count)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    for start in range(0, group_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < group_size
        x = tl.load(X + base + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_AFFINE:
            channels = group * channels_per_group + offsets // num_positions
            scale = tl.load(W + channels, mask=mask, other=0.0).to(tl.float32) * rstd
            shift = tl.load(B + channels, mask=mask, other=0.0).to(tl.float32) - mean * scale
            y = x * scale + shift
        else:
            y = (x - mean) * rstd
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + out_base + offsets, y.to(Y.dtype.element_ty), mask=mask)


def _groups_are_contiguous(t: torch.Tensor, position_stride: int, num_positions: int) -> bool:
    """Whether each (sample, group) of `t` is one contiguous run of memory: NCHW, positions then channels."""
    return position_stride == 1 and (t.shape[1] == 1 or t.stride(1) == num_positions)


def launch(x: torch.Tensor, y: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
           eps: float, silu: bool, x_position_stride: int, y_position_stride: int) -> None:
    """Writes the normalised `x` into `y`, for inputs `group_norm` has checked; the flattened spatial positions of
    `x` and `y` have one stride each."""
    channels_per_group = x.shape[1] // num_groups
    num_positions = x[0, 0].numel()
    block_c = triton.next_power_of_2(channels_per_group)
    block_s = min(triton.next_power_of_2(num_positions), max(1, TILE_ELEMENTS // block_c))
    has_affine = weight is not None
    if (channels_per_group & (channels_per_group - 1) and _groups_are_contiguous(x, x_position_stride, num_positions)
            and _groups_are_contiguous(y, y_position_stride, num_positions)):
        with on_device(x):
            _group_norm_flat_kernel[(x.shape[0] * num_groups,)](
                x, y, weight if has_affine else x, bias if has_affine else x, x.stride(0), y.stride(0),
                x.shape[1], num_positions, channels_per_group, eps,
                HAS_AFFINE=has_affine, SILU=silu, BLOCK=TILE_ELEMENTS,
            )
        return
    with on_device(x):
        _group_norm_kernel[(x.shape[0] * num_groups,)](
            x, y, weight if has_affine else x, bias if has_affine else x,
            x.stride(0), x.stride(1), x_position_stride, y.stride(0), y.stride(1), y_position_stride,
            x.shape[1], num_positions, channels_per_group, eps,
            HAS_AFFINE=has_affine, SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
        )


