"""Triton kernels for Stable Diffusion's memory-bound hot spots, each beside its plain-PyTorch reference.

Modules:
- `group_norm`: GroupNorm with an optional fused SiLU, NCHW or channels_last, fp32 statistics.
- `geglu`: diffusers' GEGLU gate (bias, split, exact GELU and product) in one pass after a bias-free matmul.
- `guided_step`: the classifier-free-guidance combine fused with the DDIM (eta=0) or PNDM/PLMS update.
- `postprocess`: VAE output in [-1, 1] to classifier input (antialiased bilinear resize, uint8 or normalised).
- `patch`: swaps the fused modules into a loaded diffusers UNet or VAE, reversibly.
- `dispatch`: switches each kernel on or off and decides where it can run.
- `workloads`: every call SD1.5's fast path makes to a kernel, at SD1.5's shapes, runnable with or without the kernel.
- `compile_check`: compiles every kernel for a GPU on a machine without one (`python -m kernels.compile_check`).
- `bench`: each kernel against its reference on a device, call by call: error, time, GB/s (`python -m kernels.bench`).

Import the submodules directly; nothing here imports Triton, so `import kernels` works on any machine.
"""

from .dispatch import KERNEL_NAMES, disabled, is_enabled, set_enabled

__all__ = ["KERNEL_NAMES", "disabled", "is_enabled", "set_enabled"]
