"""VAE output to classifier input in one pass: [-1, 1] to [0, 1], antialiased resize, clamp, uint8 or normalised.

The unfused path runs five full-resolution passes (scale, clamp, float copy, resize, clamp and cast) before the
small images leave the GPU. Here each output pixel gathers its antialiasing window straight from the decoded
image, so the full-resolution image is read once and only the classifier-sized result is written.

The resize follows `F.interpolate(mode="bilinear", antialias=True, align_corners=False)`: a triangle filter
stretched by the scale factor when shrinking (plain bilinear when enlarging), with weights normalised per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import check_float_dtype, check_same_device, runs_triton

BLOCK = 256


def postprocess_reference(decoded: torch.Tensor, size: int | None, mean: torch.Tensor | None = None,
                          std: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused path in fp32: `(x / 2 + 0.5).clamp(0, 1)`, resize, clamp, then uint8 or `(x - mean) / std`."""
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    if size is not None and images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = images.clamp(0, 1)
    if mean is None:
        return images.mul(255).round().to(torch.uint8)
    return (images - mean.float().view(1, -1, 1, 1)) / std.float().view(1, -1, 1, 1)


def resize_weights(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output index, the first input index of its window and the window's normalised weights (padded).

    Returns (first: int32 (out_size,), weights: fp32 (out_size, taps)).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # the bilinear (triangle) filter has radius 1, stretched when shrinking
    stretch = max(scale, 1.0)
    centre = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)
    first = (centre - support + 0.5).trunc().clamp(min=0)
    last = (centre + support + 0.5).trunc().clamp(max=in_size)
    taps = int((last - first).max())
    offsets = first[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    weights = (1.0 - ((offsets - centre[:, None] + 0.5) / stretch).abs()).clamp(min=0)
    weights = torch.where(offsets < last[:, None], weights, torch.zeros_like(weights))
    weights = weights / weights.sum(dim=1, keepdim=True)
    return first.to(torch.int32).to(device), weights.to(torch.float32).to(device)


@triton.jit
def _postprocess_kernel(
    X, Y, FIRST_Y, WEIGHTS_Y, FIRST_X, WEIGHTS_X, MEAN, STD,
    stride_b, stride_c, stride_h, stride_w,
    channels, in_h, in_w, out_h, out_w,
    TAPS_Y: tl.constexpr, TAPS_X: tl.constexpr, TO_UINT8: tl.constexpr, BLOCK: tl.constexpr,
):
    plane = tl.program_id(0)  # (image, channel)
    channel = plane % channels
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pixels < out_h * out_w
    oy = pixels // out_w
    ox = pixels % out_w
    first_y = tl.load(FIRST_Y + oy, mask=mask, other=0)
    first_x = tl.load(FIRST_X + ox, mask=mask, other=0)
    base = (plane // channels).to(tl.int64) * stride_b + channel.to(tl.int64) * stride_c

    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(TAPS_Y):
        wy = tl.load(WEIGHTS_Y + oy * TAPS_Y + i, mask=mask, other=0.0)
        y = tl.minimum(first_y + i, in_h - 1)  # padded taps have weight 0; keep their address inside the image
        row = tl.zeros((BLOCK,), tl.float32)
        for j in tl.static_range(TAPS_X):
            wx = tl.load(WEIGHTS_X + ox * TAPS_X + j, mask=mask, other=0.0)
            x = tl.minimum(first_x + j, in_w - 1)
            v = tl.load(X + base + y.to(tl.int64) * stride_h + x.to(tl.int64) * stride_w, mask=mask, other=0.0)
            row += wx * tl.minimum(tl.maximum(v.to(tl.float32) / 2 + 0.5, 0.0), 1.0)
        acc += wy * row
    acc = tl.minimum(tl.maximum(acc, 0.0), 1.0)
    if TO_UINT8:
        scaled = acc * 255
        rounded = tl.floor(scaled + 0.5)
        # torch.round rounds halves to even
        tie_to_odd = ((rounded - scaled) == 0.5) & ((rounded - 2 * tl.floor(rounded / 2)) == 1.0)
        out = tl.where(tie_to_odd, rounded - 1, rounded).to(tl.uint8)
    else:
        out = (acc - tl.load(MEAN + channel)) / tl.load(STD + channel)
    tl.store(Y + plane.to(tl.int64) * out_h * out_w + pixels, out, mask=mask)


def _check_inputs(decoded: torch.Tensor, size: int | None, mean, std) -> None:
    if decoded.dim() != 4:
        raise ValueError(f"postprocess expects decoded images (batch, channels, H, W), got shape {tuple(decoded.shape)}")
    check_float_dtype("decoded", decoded)
    if size is not None and size < 1:
        raise ValueError(f"postprocess: size must be positive, got {size}")
    if (mean is None) != (std is None):
        raise ValueError("postprocess: give both mean and std (normalised float output) or neither (uint8 output)")
    if mean is not None:
        channels = decoded.shape[1]
        for name, stats in (("mean", mean), ("std", std)):
            if stats.shape != (channels,):
                raise ValueError(f"postprocess: {name} has shape {tuple(stats.shape)}, expected ({channels},)")
        if bool((std == 0).any()):
            raise ValueError("postprocess: std has a zero entry")
    check_same_device(decoded=decoded, mean=mean, std=std)


def postprocess(decoded: torch.Tensor, size: int | None, mean: torch.Tensor | None = None,
                std: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded images in [-1, 1] to (batch, channels, size, size): uint8, or fp32 `(x - mean) / std` if given.

    `size=None` keeps the decoded size. Any memory layout of `decoded` is read; the output is contiguous NCHW.
    """
    _check_inputs(decoded, size, mean, std)
    if not runs_triton("postprocess", _postprocess_kernel, decoded):
        return postprocess_reference(decoded, size, mean, std)
    batch, channels, in_h, in_w = decoded.shape
    out_h, out_w = (in_h, in_w) if size is None else (size, size)
    first_y, weights_y = resize_weights(in_h, out_h, decoded.device)
    first_x, weights_x = resize_weights(in_w, out_w, decoded.device)
    to_uint8 = mean is None
    out = decoded.new_empty((batch, channels, out_h, out_w), dtype=torch.uint8 if to_uint8 else torch.float32)
    mean_arg = mean.float().contiguous() if mean is not None else weights_y
    std_arg = std.float().contiguous() if std is not None else weights_y
    grid = (batch * channels, triton.cdiv(out_h * out_w, BLOCK))
    _postprocess_kernel[grid](
        decoded, out, first_y, weights_y, first_x, weights_x, mean_arg, std_arg,
        *decoded.stride(), channels, in_h, in_w, out_h, out_w,
        TAPS_Y=weights_y.shape[1], TAPS_X=weights_x.shape[1], TO_UINT8=to_uint8, BLOCK=BLOCK,
    )
    return out
