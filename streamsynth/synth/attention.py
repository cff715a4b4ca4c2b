"""Choosing the attention backend: xformers where it demonstrably works on the device, else PyTorch SDPA.

An installed xformers is no proof that it works: a wheel built for another PyTorch imports fine but has no CUDA
operators (seen on the H200 box, see docs/performance.md, "Anchors"). So xformers is used only after a probe call on tiny
tensors on the target device returns the same numbers as SDPA. xformers is an optional extra
(`pip install streamsynth[xformers]`); without it SDPA is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers")


@dataclass(frozen=True)
class AttentionChoice:
    backend: str  # "xformers" or "sdpa"
    reason: str


_probes: dict[str, str | None] = {}


def probe_xformers(device: str | torch.device) -> str | None:
    """None when `xformers.ops.memory_efficient_attention` runs on `device` and agrees with SDPA; else why not."""
    device = torch.device(device)
    if str(device) not in _probes:
        _probes[str(device)] = _run_probe(device)
    return _probes[str(device)]


def _run_probe(device: torch.device) -> str | None:
    try:
        import xformers.ops
    except Exception as err:  # ImportError, or a broken install raising anything at import
        return f"xformers is not importable ({type(err).__name__}: {err})"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator("cpu").manual_seed(0)
    # xformers takes (batch, tokens, heads, head_dim); SDPA takes (batch, heads, tokens, head_dim).
    q, k, v = (torch.randn(1, 8, 2, 16, generator=generator).to(device, dtype) for _ in range(3))
    try:
        out = xformers.ops.memory_efficient_attention(q, k, v)
    except Exception as err:
        return f"xformers.ops.memory_efficient_attention failed on {device} ({type(err).__name__}: {err})"
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    if not torch.allclose(out.float(), expected.float(), atol=1e-2, rtol=1e-2):
        return f"xformers.ops.memory_efficient_attention on {device} disagrees with PyTorch SDPA"
    return None


def choose_attention(device: str | torch.device, prefer: str = "auto") -> AttentionChoice:
    """xformers when asked for (or on "auto") and its probe passes on `device`; SDPA otherwise."""
    if prefer not in BACKENDS:
        raise ValueError(f"unknown attention backend {prefer!r}: use one of {list(BACKENDS)}")
    if prefer == "sdpa":
        return AttentionChoice("sdpa", "asked for")
    failure = probe_xformers(device)
    if failure is None:
        return AttentionChoice("xformers", f"probe call succeeded on {device}")
    if prefer == "xformers":
        raise ValueError(f"xformers was asked for but cannot be used: {failure}; use the sdpa backend instead")
    return AttentionChoice("sdpa", failure)


def apply_attention(models: list[torch.nn.Module], device: str | torch.device, prefer: str = "auto") -> AttentionChoice:
    """Sets the chosen backend's attention processor on each diffusers model (UNet, VAE) that has attention (an
    AutoencoderTiny has none) and logs the choice (at debug level: each synthesis worker makes it)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    choice = choose_attention(device, prefer)
    processor = XFormersAttnProcessor() if choice.backend == "xformers" else AttnProcessor2_0()
    for model in models:
        if hasattr(model, "set_attn_processor"):
            model.set_attn_processor(processor)
    log.debug("attention backend: %s (%s)", choice.backend, choice.reason)
    return choice
