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

from .dispatch import check_float_dtype, check_same_device, runs_triton


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
    if not runs_triton("postprocess", decoded):
        return postprocess_reference(decoded, size, mean, std)
    from .postprocess_triton import launch

    batch, channels, in_h, in_w = decoded.shape
    out_h, out_w = (in_h, in_w) if size is None else (size, size)
    out = decoded.new_empty((batch, channels, out_h, out_w), dtype=torch.uint8 if mean is None else torch.float32)
    launch(decoded, out, *resize_weights(in_h, out_h, decoded.device), *resize_weights(in_w, out_w, decoded.device),
           mean, std)
    return out
