"""Triton kernels for Stable Diffusion's memory-bound hot spots and a captioner's decoding attention, each beside its
plain-PyTorch reference.

Installed as `streamsynth.kernels` (the repository keeps this folder at its top level; the wheel maps it into the
streamsynth package, and a checkout's `streamsynth/__init__.py` gives it the same name). Nothing here imports
streamsynth: the kernels know diffusers' and transformers' modules and tensors, not the stream.

Modules:
- `group_norm`: GroupNorm with an optional fused SiLU, NCHW or channels_last, fp32 statistics.
- `geglu`: diffusers' GEGLU gate (bias, split, exact GELU and product) in one pass after a bias-free matmul.
- `guided_step`: the classifier-free-guidance combine fused with the DDIM (eta=0) or PNDM/PLMS update.
- `postprocess`: VAE output to classifier input (antialiased bilinear resize, uint8 or normalised).
- `decode_attention`: attention for one query token over a KV cache (a language model's decoding step), and its
  hook into transformers' `AttentionInterface`.
- `<kernel>_triton`: each kernel's Triton code, imported only when the kernel runs (Triton is an optional extra).
- `patch`: swaps the fused modules into a loaded diffusers UNet or VAE, reversibly.
- `dispatch`: switches each kernel on or off and decides where it can run.
- `workloads`: every call a Stable Diffusion model's fast path makes to a kernel, at the model's shapes, runnable
  with or without the kernel, and the tolerances a kernel's output is held to.
- `compile_check`: compiles kernels for a GPU on a machine without one
  (`python -m streamsynth.kernel_compile_check` runs it on SD1.5's workloads).
Each kernel is timed against its reference by `python -m streamsynth.kernel_bench`.

Import the submodules directly; nothing here imports Triton until a kernel runs, so this package imports anywhere.
"""

from .dispatch import KERNEL_NAMES, disabled, is_enabled, set_enabled

__all__ = ["KERNEL_NAMES", "disabled", "is_enabled", "set_enabled"]
