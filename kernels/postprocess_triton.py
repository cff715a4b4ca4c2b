"""The Triton kernel of `postprocess.py` (reference, checks and resize windows there), imported only when it runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import on_device

BLOCK = 256


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


def launch(decoded: torch.Tensor, out: torch.Tensor, first_y: torch.Tensor, weights_y: torch.Tensor,
           first_x: torch.Tensor, weights_x: torch.Tensor, mean: torch.Tensor | None,
           std: torch.Tensor | None) -> None:
    """Writes `decoded` resized into `out` (uint8, or normalised fp32 when `mean` and `std` are given), for inputs
    `postprocess` has checked and the resize windows `resize_weights` gives for each axis."""
    batch, channels, in_h, in_w = decoded.shape
    out_h, out_w = out.shape[-2:]
    to_uint8 = mean is None
    mean_arg = mean.float().contiguous() if mean is not None else weights_y
    std_arg = std.float().contiguous() if std is not None else weights_y
    grid = (batch * channels, triton.cdiv(out_h * out_w, BLOCK))
    with on_device(decoded):
        _postprocess_kernel[grid](
            decoded, out, first_y, weights_y, first_x, weights_x, mean_arg, std_arg,
            *decoded.stride(), channels, in_h, in_w, out_h, out_w,
            TAPS_Y=weights_y.shape[1], TAPS_X=weights_x.shape[1], TO_UINT8=to_uint8, BLOCK=BLOCK,
        )
