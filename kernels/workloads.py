"""Every way a Stable Diffusion model's fast path calls a kernel (`model_workloads`), and a language model's decoding
step its attention kernel (`decode_attention_workloads`), as repeatable calls on tensors of the models' shapes.

Each `Workload` calls the kernel through its public, switchable entry point, so the same call runs the Triton kernel
or, inside `disabled(workload.kernel)`, its PyTorch reference. The model is given by its component configurations
(`ModelConfigs`; streamsynth passes SD1.5's, `streamsynth.synth.sd15.kernel_workloads`, and BLIP-2 OPT-2.7b's text
configuration, `streamsynth.benchmarks.kernel_bench.workloads`). `compile_check` compiles the
workloads for a GPU without launching; `python -m streamsynth.benchmarks.kernel_bench` runs both sides on a device and compares
their outputs (`within_tolerance`) and times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch


# The dtypes the workloads come in, by the names the command lines take.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Kernel output against reference output, both on the device (as in tests/test_kernels.py): atol = rtol per dtype.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# uint8 images: every pixel within one level (a value one rounding from .5) and at least 99% of them equal.
UINT8_MIN_EQUAL = 0.99


def within_tolerance(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a kernel's output agrees with its reference's within the tolerances above."""
    error = (output.float() - reference.float()).abs()
    if output.dtype == torch.uint8:
        return bool(error.max() <= 1) and (error == 0).float().mean().item() >= UINT8_MIN_EQUAL
    tolerance = TOLERANCES[output.dtype]
    return bool((error <= tolerance + tolerance * reference.float().abs()).all())


@dataclass(frozen=True)
class ModelConfigs:
    """A Stable Diffusion model's component configurations, as diffusers' and transformers' constructors take them."""

    unet: dict  # UNet2DConditionModel
    vae: dict  # AutoencoderKL
    text_encoder: dict  # CLIPTextConfig
    scheduler: dict  # DDIMScheduler / PNDMScheduler


@dataclass
class Workload:
    kernel: str  # a name of KERNEL_NAMES
    description: str
    run: Callable[[], torch.Tensor]  # repeatable: any state the call changes is reset first
    bytes_moved: int  # what the kernel must read and write at least: inputs and output, once each


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _tensor_maker(dtype: torch.dtype, device: str | torch.device, random: bool, upcast: torch.dtype | None):
    """`tensor(*shape, channels_last=False, scale=1.0)`: the workloads' inputs, standard normal times `scale` from
    one seeded generator (rounded to `dtype`, then held in `upcast` if given), or uninitialised if not `random`."""
    generator = torch.Generator(device).manual_seed(0) if random else None

    def tensor(*shape: int, channels_last: bool = False, scale: float = 1.0) -> torch.Tensor:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if not random:
            return torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
        x = (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)
        return x.to(upcast or dtype).contiguous(memory_format=memory_format)

    return tensor


def model_workloads(model: ModelConfigs, dtype: torch.dtype, device: str | torch.device = "cpu", batch: int = 1,
                    random: bool = True, kernel: str | None = None,
                    upcast: torch.dtype | None = None) -> Iterator[Workload]:
    """The workloads of `model` at its native size for `batch` images (the UNet sees 2 x batch with guidance), or of
    one `kernel` only (the others' inputs are then never made: the GroupNorm shapes alone take seconds to find).

    Shapes come from the model's configuration: they decide the block sizes, so these are the variants a real run
    compiles. `random=False` leaves the tensors uninitialised (enough for compiling). With `upcast` (float32), the
    same input values, rounded to `dtype`, are held in that wider type: its reference gives the exact result that
    both a kernel and its reference in `dtype` round away from (to within float32's 6e-8).
    """
    UNET, VAE, SCHEDULER = model.unet, model.vae, model.scheduler  # noqa: N806 - the configurations, as data

    tensor = _tensor_maker(dtype, device, random, upcast)
    unet_batch = 2 * batch
    if kernel in (None, "group_norm"):
        yield from _group_norm_workloads(model, tensor, unet_batch, batch)
    if kernel in (None, "geglu"):
        yield from _geglu_workloads(tensor, unet_batch, UNET)
    if kernel in (None, "guided_step"):
        yield from _guided_step_workloads(tensor, batch, SCHEDULER)
    if kernel in (None, "postprocess"):
        yield from _postprocess_workloads(tensor, batch, VAE, device)


def _group_norm_workloads(model: ModelConfigs, tensor, unet_batch: int, batch: int) -> Iterator[Workload]:
    from .group_norm import group_norm

    for where, groups, shape in group_norm_inputs(model):
        rows = (unet_batch if where == "unet" else batch) * shape[0]
        channels, size = shape[1], "x".join(map(str, shape[2:]))
        weight, bias = tensor(channels), tensor(channels)
        for layout in ("nchw", "channels_last") if len(shape) == 4 else ("contiguous",):
            x = tensor(rows, channels, *shape[2:], channels_last=layout == "channels_last")
            for silu in (True, False):
                yield Workload("group_norm", f"{where} {channels}x{size} {layout} silu={silu}",
                               lambda x=x, g=groups, w=weight, b=bias, s=silu: group_norm(x, g, w, b, silu=s),
                               2 * _nbytes(x) + _nbytes(weight, bias))
    latent = model.unet["sample_size"]
    plain = tensor(unet_batch, 320, latent, latent)
    yield Workload("group_norm", "without affine", lambda: group_norm(plain, 32), 2 * _nbytes(plain))


def _geglu_workloads(tensor, unet_batch: int, unet: dict) -> Iterator[Workload]:
    from .geglu import geglu

    latent = unet["sample_size"]
    unet_levels = [(c, latent >> i) for i, c in enumerate(unet["block_out_channels"])]
    for channels, side in unet_levels[:3]:  # the levels with transformer blocks; GEGLU's inner width is 4x
        projected, proj_bias = tensor(unet_batch, side * side, 8 * channels), tensor(8 * channels)
        yield Workload("geglu", f"{channels}x{side}²", lambda p=projected, b=proj_bias: geglu(p, b),
                       _nbytes(projected) * 3 // 2)
    projected = tensor(unet_batch, latent * latent, 8 * 320)
    yield Workload("geglu", "without bias", lambda: geglu(projected), _nbytes(projected) * 3 // 2)


def _postprocess_workloads(tensor, batch: int, vae: dict, device) -> Iterator[Workload]:
    from .postprocess import postprocess

    decoded = tensor(batch, vae["out_channels"], vae["sample_size"], vae["sample_size"]).clamp(-1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)
    std = torch.tensor([0.229, 0.224, 0.225], device=device)
    for size in (224, 128, None):
        out = (size or vae["sample_size"]) ** 2 * batch * 3
        yield Workload("postprocess", f"512²->{size} uint8", lambda s=size: postprocess(decoded, s),
                       _nbytes(decoded) + out)
        yield Workload("postprocess", f"512²->{size} normalised", lambda s=size: postprocess(decoded, s, mean, std),
                       _nbytes(decoded) + 4 * out)


def group_norm_inputs(model: ModelConfigs) -> list[tuple[str, int, tuple[int, ...]]]:
    """(component, groups, input shape for one image) of every distinct GroupNorm call of the model's UNet and VAE
    decoder at its native size, found by running them on the meta device (no memory, no weights).

    Reading the shapes off the models, rather than off `block_out_channels`, catches the up-blocks' GroupNorms of
    concatenated skip connections (960 to 2560 channels), which have their own block sizes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    UNET, VAE, TEXT_ENCODER = model.unet, model.vae, model.text_encoder  # noqa: N806

    calls: dict[tuple, None] = {}

    def record(where: str):
        def hook(module: torch.nn.GroupNorm, args: tuple) -> None:
            x = args[0]
            channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            if not (x.is_contiguous() or channels_last):  # the workloads make these two layouts only
                raise NotImplementedError(f"{where}: a GroupNorm input with strides {x.stride()}: add its layout")
            calls[(where, module.num_groups, (1, *x.shape[1:]))] = None
        return hook

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    for where, model in (("unet", unet), ("vae", vae)):
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.register_forward_pre_hook(record(where))
    latent = UNET["sample_size"]
    with torch.no_grad():
        unet(torch.empty(1, 4, latent, latent, device="meta"), 500,
             encoder_hidden_states=torch.empty(1, TEXT_ENCODER["max_position_embeddings"], UNET["cross_attention_dim"],
                                               device="meta"))
        vae.decode(torch.empty(1, 4, latent, latent, device="meta"))
    return list(calls)


def _guided_step_workloads(tensor, batch: int, scheduler_config: dict) -> Iterator[Workload]:
    """Every update rule of the fused step, each from the scheduler state that selects it, reset before each call."""
    from diffusers import DDIMScheduler, PNDMScheduler

    from .guided_step import FusedGuidedStep

    sample = tensor(batch, 4, 64, 64)
    history = [tensor(batch, 4, 64, 64, scale=0.1) for _ in range(3)]
    pndm_states = {  # rule: (counter, ets); the second step also re-reads the sample the first step kept
        "plms first": (0, []), "plms second": (1, history[:1]), "plms 2-term": (2, history[:1]),
        "plms 3-term": (3, history[:2]), "plms 4-term": (4, history[:3]),
    }
    for guided in (True, False):
        noise = tensor(2 * batch if guided else batch, 4, 64, 64)
        scale = 1.5 if guided else None
        moved = _nbytes(noise) + 2 * _nbytes(sample)
        for clip in (False, True):
            ddim = DDIMScheduler.from_config(scheduler_config, clip_sample=clip)
            ddim.set_timesteps(50)
            step = FusedGuidedStep(ddim)
            yield Workload("guided_step", f"ddim guided={guided} clip={clip}",
                           lambda step=step, n=noise, s=scale: step(n, 501, sample, s), moved)
        for rule, (counter, ets) in pndm_states.items():
            pndm = PNDMScheduler.from_config(scheduler_config)
            pndm.set_timesteps(50)
            step = FusedGuidedStep(pndm)

            def run(step=step, n=noise, s=scale, counter=counter, ets=ets) -> torch.Tensor:
                state = step.scheduler
                state.counter, state.ets, state.cur_sample = counter, list(ets), sample if counter == 1 else None
                return step(n, 501, sample, s)

            yield Workload("guided_step", f"{rule} guided={guided}", run,
                           moved + _nbytes(*ets) + _nbytes(sample))


def decode_attention_workloads(text_config: dict, cache_length: int, dtype: torch.dtype,
                               device: str | torch.device = "cpu", batches: tuple[int, ...] = (65, 512),
                               random: bool = True, upcast: torch.dtype | None = None) -> Iterator[Workload]:
    """A decoder-only language model's attention in a decoding step (transformers' `text_config` fields), for each
    number of captions in `batches`, over a cache of `cache_length` slots: the additive mask of a static cache three
    quarters filled (streamsynth's graphed decoding), the boolean mask of transformers' SDPA masks over a growing
    cache, and no mask. `random` and `upcast` as in `model_workloads`."""
    from .decode_attention import decode_attention

    tensor = _tensor_maker(dtype, device, random, upcast)
    heads = text_config["num_attention_heads"]
    head_dim = text_config["hidden_size"] // heads
    key_heads = text_config.get("num_key_value_heads") or heads
    filled = cache_length - (cache_length - 1) // 4  # a step in mid-caption: the last quarter of slots not yet used
    for batch in batches:
        query = tensor(batch, heads, 1, head_dim)
        key, value = tensor(batch, key_heads, cache_length, head_dim), tensor(batch, key_heads, cache_length, head_dim)
        additive = torch.zeros(batch, 1, 1, cache_length, dtype=upcast or dtype, device=device)
        additive[..., filled:] = torch.finfo(dtype).min
        seen = torch.ones(batch, 1, 1, filled, dtype=torch.bool, device=device)
        grown_key, grown_value = key[:, :, :filled], value[:, :, :filled]
        moved = _nbytes(key, value) + 2 * _nbytes(query)
        yield Workload("decode_attention", f"{batch}x{heads}x{cache_length} static cache",
                       lambda q=query, k=key, v=value, m=additive: decode_attention(q, k, v, m),
                       moved + _nbytes(additive))
        yield Workload("decode_attention", f"{batch}x{heads}x{filled} bool mask",
                       lambda q=query, k=grown_key, v=grown_value, m=seen: decode_attention(q, k, v, m),
                       moved * filled // cache_length + _nbytes(seen))
        yield Workload("decode_attention", f"{batch}x{heads}x{cache_length} no mask",
                       lambda q=query, k=key, v=value: decode_attention(q, k, v), moved)
