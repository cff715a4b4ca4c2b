"""The fast-path options in one place: what to switch on, and `apply(pipe, options)` to switch it on.

    fast = apply(pipe, FastPathOptions(channels_last=True))
    synth = Synthesizer(pipe, config, fast_path=fast)
    batch = fast.postprocess(synth.decode(latents), size=224)

Precision (fp16/bf16) is chosen when the pipeline is loaded (`load_pipeline(..., dtype=...)`). Which options pay
off is a GPU measurement (`streamsynth profile`); the defaults switch on only what changes no result beyond
rounding, costs no compile time and measured faster on a GPU. `apply` changes the pipeline in place; only the
kernel patch has an undo (`streamsynth.kernels.patch.unpatch`): load a fresh pipeline for a plain diffusers baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .attention import BACKENDS, AttentionChoice, apply_attention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPathOptions:
    # Defaults as measured on an H200 (SD1.5, 512², batch 32, fp16; benchmarks/results/2026-11-27-h200-*): GEGLU and
    # GroupNorm pay off (without them 4.4% and 1.0% fewer images/s); the fused step and post-processing do not (no
    # difference in the ablation; kernel-bench times the post-processing kernel at 0.24-0.5x its reference), so they
    # are opt-in until tuned.
    triton_kernels: bool = True  # fused GroupNorm(+SiLU) and GEGLU swapped into the UNet (unless compiled) and the VAE
    fused_step: bool = False  # guidance combine + scheduler update in one kernel (DDIM eta=0, PNDM/PLMS)
    fused_postprocess: bool = False  # VAE output to classifier input in one kernel
    attention: str = "auto"  # "auto" (xformers if its probe passes, else SDPA), "sdpa" or "xformers"
    channels_last: bool = False  # NHWC activations in the UNet and VAE (slower in eager on H200 without the kernels)
    fuse_qkv: bool = False  # one matmul for Q, K and V (diffusers' fuse_qkv_projections; runs on SDPA)
    compile_unet: bool = False  # torch.compile the UNet (minutes of compilation at startup)
    cuda_graphs: bool = False  # replay the fixed-shape UNet call as a CUDA graph (torch.compile "reduce-overhead")

    def __post_init__(self) -> None:
        if self.attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}: use one of {list(BACKENDS)}")
        if self.fuse_qkv and self.attention == "xformers":
            raise ValueError("fuse_qkv runs attention through SDPA (diffusers' FusedAttnProcessor2_0): "
                             "drop fuse_qkv or use attention='auto' or 'sdpa'")


@dataclass
class FastPath:
    """What `apply` switched on, plus the pieces the sampling loop and the post-processing take from it."""

    options: FastPathOptions
    attention: AttentionChoice
    fused_step: object | None = None  # a streamsynth.kernels.guided_step.FusedGuidedStep, or None where unsupported
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def postprocess(self, decoded: torch.Tensor, size: int | None, mean: torch.Tensor | None = None,
                    std: torch.Tensor | None = None) -> torch.Tensor:
        """VAE output in [-1, 1] to uint8 (or `(x - mean) / std` fp32) images of `size` x `size`."""
        from ..kernels import postprocess

        run = postprocess.postprocess if self.options.fused_postprocess else postprocess.postprocess_reference
        return run(decoded, size, mean, std)


def apply(pipe, options: FastPathOptions | None = None) -> FastPath:
    """Switches `options` on for a loaded `StableDiffusionPipeline`, in place; what it did is logged at debug level
    (every synthesis worker does this, again after each restart) and kept in the returned `FastPath`."""
    options = options or FastPathOptions()
    device = pipe.unet.device
    if options.fuse_qkv:
        from diffusers import AutoencoderKL

        # Only an AutoencoderKL has attention to fuse; diffusers refuses any other VAE (an AutoencoderTiny).
        pipe.fuse_qkv_projections(unet=True, vae=isinstance(pipe.vae, AutoencoderKL))
        attention = AttentionChoice("sdpa", "fused QKV projections run on diffusers' FusedAttnProcessor2_0")
        log.debug("attention backend: sdpa (%s)", attention.reason)
    else:
        attention = apply_attention([pipe.unet, pipe.vae], device, options.attention)
    fast = FastPath(options, attention)
    fast.applied.append(f"attention={attention.backend}" + (" with fused QKV" if options.fuse_qkv else ""))

    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        fast.applied.append("channels_last")
    cuda_graphs = options.cuda_graphs and device.type == "cuda"
    compiles_unet = options.compile_unet or cuda_graphs
    if options.triton_kernels:
        from ..kernels.patch import patch

        # A compiled UNet is left to Inductor, which fuses GroupNorm+SiLU itself and cannot fuse across a Triton
        # call: on the H200 its 50 steps took 6.86 s without the kernels and 7.12 s with them. The VAE is not
        # compiled and keeps them (0.35 s against 0.47 s per decode).
        # benchmarks/results/2026-11-27-h200-profile-compiled*.json
        models = [("vae", pipe.vae)] if compiles_unet else [("unet", pipe.unet), ("vae", pipe.vae)]
        counts = {name: patch(model) for name, model in models}
        fast.applied.append(f"triton kernels patched in: {counts}")
    if options.fused_step:
        from ..kernels.guided_step import FusedGuidedStep, unsupported_reason

        reason = unsupported_reason(pipe.scheduler)
        if reason:
            fast.skipped.append(f"fused guided step: {reason}")
        else:
            fast.fused_step = FusedGuidedStep(pipe.scheduler)
            fast.applied.append(f"fused guided step ({type(pipe.scheduler).__name__})")
    if options.cuda_graphs and not cuda_graphs:
        fast.skipped.append(f"CUDA graphs: the UNet is on {device}, not a CUDA device")
    if compiles_unet:
        _compile(pipe, fast, cuda_graphs)
    for line in fast.applied:
        log.debug("fast path: %s", line)
    for line in fast.skipped:
        log.warning("fast path: skipped %s", line)
    return fast


def _compile(pipe, fast: FastPath, cuda_graphs: bool) -> None:
    mode = "reduce-overhead" if cuda_graphs else None
    # Not fullgraph: the Triton kernels' Python wrappers (validation, dispatch) may break the graph.
    pipe.unet = torch.compile(pipe.unet, mode=mode)
    fast.applied.append(f"torch.compile(unet, mode={mode!r})" + (" with CUDA graphs" if cuda_graphs else ""))
