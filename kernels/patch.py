"""Swaps the fused kernels into a loaded diffusers `UNet2DConditionModel` or `AutoencoderKL`, and back.

Only modules are swapped; diffusers' forward code runs unchanged:
- a GroupNorm whose output always goes straight into a SiLU becomes a `FusedGroupNorm(silu=True)` and that SiLU an
  `nn.Identity`. In `ResnetBlock2D` the same `nonlinearity` module also activates the time embedding before
  `time_emb_proj`, so that projection becomes a `SiLULinear` (SiLU, then the same Linear) where diffusers applies
  it. Blocks with scale-shift time conditioning (SiLU after the shift, not after the norm) are left unfused.
  `conv_norm_out` + `conv_act` of the UNet and of the VAE's encoder and decoder are fused the same way.
- every other GroupNorm (transformer and VAE attention inputs) becomes a `FusedGroupNorm(silu=False)`.
- every `GEGLU` becomes a `FusedGEGLU`.
Replacements share the originals' parameters, so state dicts, `.to()` and dtype casts keep working. `patch` is
idempotent and `unpatch` puts the original modules back.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .geglu import FusedGEGLU
from .group_norm import FusedGroupNorm

_SWAPS = "_streamsynth_kernel_swaps"


class SiLULinear(nn.Linear):
    """`linear(silu(x))`: the time-embedding activation that a fused ResNet block no longer applies itself."""

    @classmethod
    def from_module(cls, linear: nn.Linear) -> "SiLULinear":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight, fused.bias = linear.weight, linear.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.silu(x))


def _fused_geglu(module) -> FusedGEGLU:
    fused = FusedGEGLU.__new__(FusedGEGLU)
    nn.Module.__init__(fused)
    fused.proj = module.proj
    return fused


def _norm_act_pairs(module: nn.Module) -> list[tuple[str, str, str | None]]:
    """(norm, activation, pre-activated linear) attribute names whose norm output always goes into the activation.

    Read from diffusers 0.42's forwards: ResnetBlock2D applies `nonlinearity` after norm1, after norm2 (with
    "default" or "group" time conditioning) and to temb; the UNet, Encoder and Decoder apply `conv_act` once, after
    `conv_norm_out`.
    """
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    if isinstance(module, ResnetBlock2D):
        if module.time_embedding_norm not in ("default", "group"):  # "group" (VAE decoder) has no temb at all
            return []
        temb = "time_emb_proj" if module.time_emb_proj is not None and not module.skip_time_act else None
        return [("norm1", "nonlinearity", temb), ("norm2", "nonlinearity", None)]
    if isinstance(module, (UNet2DConditionModel, Encoder, Decoder)):
        return [("conv_norm_out", "conv_act", None)]
    return []


def _plan(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, replacement) for every swap, decided before any module changes."""
    from diffusers.models.activations import GEGLU

    swaps, fused_norms = [], set()
    for parent in model.modules():
        pairs = _norm_act_pairs(parent)
        fusable = pairs and all(
            type(getattr(parent, norm, None)) is nn.GroupNorm and type(getattr(parent, act, None)) is nn.SiLU
            for norm, act, _ in pairs
        )
        if not fusable:
            continue
        for norm, act, pre_activated in pairs:
            swaps.append((parent, norm, FusedGroupNorm.from_module(getattr(parent, norm), silu=True)))
            fused_norms.add(id(getattr(parent, norm)))
            if pre_activated:
                swaps.append((parent, pre_activated, SiLULinear.from_module(getattr(parent, pre_activated))))
        for act in {act for _, act, _ in pairs}:
            swaps.append((parent, act, nn.Identity()))
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.GroupNorm and id(child) not in fused_norms:
                swaps.append((parent, name, FusedGroupNorm.from_module(child, silu=False)))
            elif type(child) is GEGLU:
                swaps.append((parent, name, _fused_geglu(child)))
    return swaps


def _kind(module: nn.Module) -> str:
    if isinstance(module, FusedGroupNorm):
        return "group_norm_silu" if module.silu else "group_norm"
    return {FusedGEGLU: "geglu", SiLULinear: "time_embedding_silu", nn.Identity: "activation_removed"}[type(module)]


def patch(model: nn.Module) -> dict[str, int]:
    """Swaps the fused modules into `model` (in place) and returns how many of each kind; a no-op if patched."""
    if not is_patched(model):
        swaps = [(parent, name, getattr(parent, name), new) for parent, name, new in _plan(model)]
        for parent, name, _, new in swaps:
            setattr(parent, name, new)
        model.__dict__[_SWAPS] = swaps
    return dict(Counter(_kind(new) for _, _, _, new in model.__dict__[_SWAPS]))


def unpatch(model: nn.Module) -> None:
    """Puts the original modules back; a no-op on a model that is not patched."""
    for parent, name, original, _ in reversed(model.__dict__.pop(_SWAPS, [])):
        setattr(parent, name, original)


def is_patched(model: nn.Module) -> bool:
    return bool(model.__dict__.get(_SWAPS))
