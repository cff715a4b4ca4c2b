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
from .families import family_of_pipeline

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
    compile_unet: bool = False  # torch.compile the denoiser, UNet or transformer (minutes of compilation at startup)
    cuda_graphs: bool = False  # replay the fixed-shape denoiser call as a CUDA graph (torch.compile "reduce-overhead")

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
    skipped: list[str] = field(default_factory=list)  # asked for and not possible here: logged as warnings
    left_off: list[str] = field(default_factory=list)  # parts the model's family does not have: logged at debug level

    def postprocess(self, decoded: torch.Tensor, size: int | None, mean: torch.Tensor | None = None,
                    std: torch.Tensor | None = None) -> torch.Tensor:
        """VAE output in [-1, 1] to uint8 (or `(x - mean) / std` fp32) images of `size` x `size`."""
        from ..kernels import postprocess

        run = postprocess.postprocess if self.options.fused_postprocess else postprocess.postprocess_reference
        return run(decoded, size, mean, std)


def apply(pipe, options: FastPathOptions | None = None) -> FastPath:
    """Switches `options` on for a loaded pipeline, in place, where its family has the parts they act on (a UNet's
    attention processors, GroupNorm and GEGLU; an AutoencoderKL); what it did and what it left off is logged at debug
    level (every synthesis worker does this, again after each restart) and kept in the returned `FastPath`."""
    options = options or FastPathOptions()
    family = family_of_pipeline(pipe)
    denoiser = family.denoiser(pipe)
    name = family.denoiser_attribute
    # A UNet's attention processors, GroupNorm and memory format are the fast path's to change, as the VAE's; a
    # transformer keeps its own (joint attention in SD3, linear attention in Sana).
    image_models = [denoiser, pipe.vae] if family.uses_unet else [pipe.vae]
    device = denoiser.device
    fast = FastPath(options, AttentionChoice("sdpa", "not chosen"))
    if options.fuse_qkv:
        fast.attention = AttentionChoice("sdpa", "fused QKV projections run on diffusers' FusedAttnProcessor2_0")
        fast.applied.append(f"attention=sdpa with fused QKV in {_fuse_qkv(pipe, family, fast)}")
        log.debug("attention backend: sdpa (%s)", fast.attention.reason)
    else:
        fast.attention = apply_attention(image_models, device, options.attention)
        fast.applied.append(f"attention={fast.attention.backend} in {_names(pipe, image_models)}")
        if not family.uses_unet:
            fast.left_off.append(f"attention backend in the {name}: {family.name}'s own processors (PyTorch SDPA) "
                                 "kept")

    if options.channels_last:
        for model in image_models:
            model.to(memory_format=torch.channels_last)
        fast.applied.append(f"channels_last in {_names(pipe, image_models)}")
        if not family.uses_unet:
            fast.left_off.append(f"channels_last in the {name}: its activations are token sequences, not images")
    cuda_graphs = options.cuda_graphs and device.type == "cuda"
    compiles = options.compile_unet or cuda_graphs
    if options.triton_kernels:
        from ..kernels.patch import patch

        # A compiled UNet is left to Inductor, which fuses GroupNorm+SiLU itself and cannot fuse across a Triton
        # call: on the H200 its 50 steps took 6.86 s without the kernels and 7.12 s with them. The VAE is not
        # compiled and keeps them (0.35 s against 0.47 s per decode). A transformer has neither GroupNorm nor GEGLU.
        # benchmarks/results/2026-11-27-h200-profile-compiled*.json
        patched = [("vae", pipe.vae)] if compiles or not family.uses_unet else [(name, denoiser), ("vae", pipe.vae)]
        counts = {part: patch(model) for part, model in patched}
        fast.applied.append(f"triton kernels patched in: {counts}")
        if not family.uses_unet:
            fast.left_off.append(f"triton kernels in the {name}: it has no GroupNorm or GEGLU")
    if options.fused_step:
        from ..kernels.guided_step import FusedGuidedStep, unsupported_reason

        reason = unsupported_reason(pipe.scheduler)
        if reason:
            fast.skipped.append(f"fused guided step: {reason}")
        else:
            fast.fused_step = FusedGuidedStep(pipe.scheduler)
            fast.applied.append(f"fused guided step ({type(pipe.scheduler).__name__})")
    if options.cuda_graphs and not cuda_graphs:
        fast.skipped.append(f"CUDA graphs: the {name} is on {device}, not a CUDA device")
    if compiles:
        _compile(pipe, name, fast, cuda_graphs)
    for line in fast.applied:
        log.debug("fast path: %s", line)
    for line in fast.left_off:
        log.debug("fast path: not for %s: %s", family.name, line)
    for line in fast.skipped:
        log.warning("fast path: skipped %s", line)
    return fast


def _names(pipe, models: list[torch.nn.Module]) -> str:
    return "+".join(name for name, component in pipe.components.items() if any(component is m for m in models))


def _fuse_qkv(pipe, family, fast: FastPath) -> str:
    """Fuses Q, K and V (K and V in cross-attention) into one projection in the UNet and an AutoencoderKL, as
    diffusers' `fuse_qkv_projections` does (it refuses any other VAE, an AutoencoderTiny); a transformer's own
    attention processors stay."""
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    models = [family.denoiser(pipe)] if family.uses_unet else []
    if isinstance(pipe.vae, AutoencoderKL):
        models.append(pipe.vae)
    for model in models:
        model.fuse_qkv_projections()
        model.set_attn_processor(FusedAttnProcessor2_0())
    if not family.uses_unet:
        fast.left_off.append(f"fused QKV in the {family.denoiser_attribute}: {family.name}'s own attention "
                             "processors kept")
    return _names(pipe, models) or "nothing"


def _compile(pipe, name: str, fast: FastPath, cuda_graphs: bool) -> None:
    mode = "reduce-overhead" if cuda_graphs else None
    # Not fullgraph: the Triton kernels' Python wrappers (validation, dispatch) may break the graph.
    setattr(pipe, name, torch.compile(getattr(pipe, name), mode=mode))
    fast.applied.append(f"torch.compile({name}, mode={mode!r})" + (" with CUDA graphs" if cuda_graphs else ""))
