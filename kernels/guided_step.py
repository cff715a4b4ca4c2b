"""Classifier-free guidance fused with the scheduler update: DDIM (eta=0) and PNDM's PLMS steps.

Unfused, one sampling step after the UNet reads and writes latent-sized tensors about ten times: chunk, the
guidance combine, the multistep combination of up to four noise predictions and the transfer to the previous
timestep. Here one kernel reads the UNet output, the sample and the stored predictions once and writes the new
sample (and the guided prediction PLMS keeps for later steps).

The kernel mirrors diffusers' arithmetic op by op, rounding every intermediate to the tensors' dtype as PyTorch's
elementwise ops do, and keeps the scheduler's state (`ets`, `counter`, `cur_sample`) exactly as `scheduler.step`
would, so fused and unfused steps can be mixed. On the CPU (Triton's interpreter) the result equals
`scheduler.step` bit for bit in fp32 and fp16; on CUDA PyTorch's handling of scalar operands may differ in the last
bit (e.g. division as a reciprocal product), which is why the tests allow a few ulps.
"""

from __future__ import annotations

import torch

from .dispatch import check_float_dtype, check_same_device, runs_triton

# Update rules; the PLMS ones are named by how many noise predictions they combine.
DDIM = 0
PLMS_FIRST = 1  # first step: the current prediction alone, the sample is kept for the second step
PLMS_SECOND = 2  # second step: mean of the first two predictions, applied to the kept sample
PLMS_2 = 3
PLMS_3 = 4
PLMS_4 = 5


def guided_step_reference(scheduler, noise: torch.Tensor, t, sample: torch.Tensor,
                          guidance_scale: float | None) -> torch.Tensor:
    """The unfused step: `uncond + s * (cond - uncond)` (when guided), then `scheduler.step`."""
    if guidance_scale is not None:
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance_scale * (cond - uncond)
    return scheduler.step(noise, t, sample, return_dict=False)[0]


def _check_inputs(noise: torch.Tensor, sample: torch.Tensor, previous: list[torch.Tensor], guided: bool) -> None:
    rows = 2 * sample.shape[0] if guided else sample.shape[0]
    if sample.dim() < 1 or noise.shape != (rows, *sample.shape[1:]):
        what = "[uncond; cond] stacked on the batch dimension" if guided else "the sample's shape"
        raise ValueError(
            f"guided step: noise has shape {tuple(noise.shape)}, expected {(rows, *sample.shape[1:])} ({what})"
        )
    for name, tensor in [("noise", noise), ("sample", sample)] + [(f"previous[{i}]", p) for i, p in enumerate(previous)]:
        check_float_dtype(name, tensor)
        if tensor.dtype != sample.dtype:
            raise ValueError(f"guided step: {name} is {tensor.dtype} but sample is {sample.dtype}: use one dtype")
        if not tensor.is_contiguous():
            raise ValueError(f"guided step: {name} must be contiguous (NCHW): call .contiguous()")
        if name.startswith("previous") and tensor.shape != sample.shape:
            raise ValueError(f"guided step: {name} has shape {tuple(tensor.shape)}, expected {tuple(sample.shape)}")
    check_same_device(noise=noise, sample=sample, **{f"previous{i}": p for i, p in enumerate(previous)})


def fused_update(noise: torch.Tensor, sample: torch.Tensor, previous: list[torch.Tensor], rule: int,
                 coefficients: tuple[float, ...], guidance_scale: float | None, store_eps: bool,
                 clip_range: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch: guided prediction from `noise`, then `rule` with `coefficients`; returns (prev sample, eps).

    `previous` holds the earlier predictions the rule needs, newest first. `eps` is the guided prediction, written
    only when `store_eps` (PLMS keeps it for later steps).
    """
    _check_inputs(noise, sample, previous, guidance_scale is not None)
    prev = torch.empty_like(sample)
    eps = torch.empty_like(sample) if store_eps else None
    dummy = sample
    e1, e2, e3 = (previous + [dummy] * 3)[:3]
    c0, c1, c2, c3 = (tuple(coefficients) + (0.0,) * 4)[:4]
    from .guided_step_triton import launch

    launch(noise, sample, e1, e2, e3, prev, eps if store_eps else dummy, float(guidance_scale or 0.0),
           (c0, c1, c2, c3), float(clip_range or 0.0), guided=guidance_scale is not None, rule=rule,
           store_eps=store_eps, clip=clip_range is not None)
    return prev, eps


def unsupported_reason(scheduler) -> str | None:
    """Why the fused step cannot stand in for `scheduler.step`, or None when it can."""
    from diffusers import DDIMScheduler, PNDMScheduler

    config = scheduler.config
    if not isinstance(scheduler, (DDIMScheduler, PNDMScheduler)):
        return f"{type(scheduler).__name__} is not fused (only DDIMScheduler with eta=0 and PNDMScheduler)"
    if config.prediction_type != "epsilon":
        return f"prediction_type={config.prediction_type!r} is not fused (only 'epsilon')"
    if isinstance(scheduler, PNDMScheduler) and not config.skip_prk_steps:
        return "PNDMScheduler with Runge-Kutta warm-up steps (skip_prk_steps=False) is not fused"
    if isinstance(scheduler, DDIMScheduler) and config.thresholding:
        return "DDIMScheduler with dynamic thresholding is not fused"
    return None


def _factor(scalar: torch.Tensor, dtype: torch.dtype) -> float:
    # A 0-dim tensor times a tensor is computed with the scalar rounded to the tensor's dtype (seen on CPU fp16)...
    return float(scalar.to(dtype))


def _divisor(scalar: torch.Tensor) -> float:
    # ...while dividing by one uses the fp32 scalar.
    return float(scalar)


class FusedGuidedStep:
    """`guided_step_reference(scheduler, ...)` as one kernel; the scheduler's own state is updated as `step` would.

    Call it as `prev = step(noise, t, sample, guidance_scale)`, with `guidance_scale=None` for unguided sampling
    (noise is then the plain prediction). DDIM runs with eta=0, the default of `DDIMScheduler.step`.
    """

    def __init__(self, scheduler):
        reason = unsupported_reason(scheduler)
        if reason:
            raise ValueError(f"fused guided step: {reason}; leave the fused step off for this scheduler")
        self.scheduler = scheduler

    def __call__(self, noise: torch.Tensor, t, sample: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
        if not runs_triton("guided_step", sample):
            return guided_step_reference(self.scheduler, noise, t, sample, guidance_scale)
        if self.scheduler.num_inference_steps is None:
            raise ValueError("fused guided step: call scheduler.set_timesteps(...) before stepping")
        # Elementwise torch ops accept mixed layouts; the kernel reads flat memory, so bring all to one layout.
        noise, sample = noise.contiguous(), sample.contiguous()
        from diffusers import DDIMScheduler

        if isinstance(self.scheduler, DDIMScheduler):
            return self._ddim(noise, int(t), sample, guidance_scale)
        return self._plms(noise, int(t), sample, guidance_scale)

    def _alphas(self, timestep: int, prev_timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scheduler
        alpha_prev = s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
        return s.alphas_cumprod[timestep], alpha_prev

    def _stride(self) -> int:
        s = self.scheduler
        return s.config.num_train_timesteps // s.num_inference_steps

    def _ddim(self, noise, timestep, sample, guidance_scale):
        alpha, alpha_prev = self._alphas(timestep, timestep - self._stride())
        # The same fp32 scalar arithmetic as DDIMScheduler.step with eta=0 (its std_dev_t is then 0).
        dtype = sample.dtype
        coefficients = (_factor((1 - alpha) ** 0.5, dtype), _divisor(alpha ** 0.5), _factor(alpha_prev ** 0.5, dtype),
                        _factor((1 - alpha_prev) ** 0.5, dtype))
        config = self.scheduler.config
        clip = config.clip_sample_range if config.clip_sample else None
        prev, _ = fused_update(noise, sample, [], DDIM, coefficients, guidance_scale,
                               store_eps=False, clip_range=clip)
        return prev

    def _plms(self, noise, timestep, sample, guidance_scale):
        s = self.scheduler
        prev_timestep = timestep - self._stride()
        ets = s.ets[-3:]
        if s.counter == 1:  # the second step re-evaluates the first step's interval from the kept sample
            if len(ets) != 1 or s.cur_sample is None:
                raise RuntimeError("PNDM scheduler state is inconsistent: call scheduler.set_timesteps(...) first")
            prev_timestep, timestep = timestep, timestep + self._stride()
            rule, previous, sample = PLMS_SECOND, ets[::-1], s.cur_sample.contiguous()
        elif not ets:
            if s.counter != 0:
                raise RuntimeError("PNDM scheduler state is inconsistent: call scheduler.set_timesteps(...) first")
            rule, previous = PLMS_FIRST, []
        else:
            rule, previous = (PLMS_2, PLMS_3, PLMS_4)[len(ets) - 1], [e.contiguous() for e in ets[::-1]]
        alpha, alpha_prev = self._alphas(timestep, prev_timestep)
        coefficients = (
            _factor((alpha_prev / alpha) ** 0.5, sample.dtype),
            _factor(alpha_prev - alpha, sample.dtype),
            _divisor(alpha * (1 - alpha_prev) ** 0.5 + (alpha * (1 - alpha) * alpha_prev) ** 0.5),
        )
        prev, eps = fused_update(noise, sample, previous, rule, coefficients,
                                 guidance_scale, store_eps=rule != PLMS_SECOND)
        if rule != PLMS_SECOND:
            s.ets = ets + [eps]
        s.cur_sample = sample if rule == PLMS_FIRST else None
        s.counter += 1
        return prev
