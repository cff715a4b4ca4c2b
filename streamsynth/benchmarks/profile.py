"""`streamsynth profile`: where the time goes, streamsynth's fast path against plain diffusers, in one run.

Both paths load the same model folder with `from_pretrained`, draw the same prompts and seeds, and end with the
same product: uint8 images of the classifier's size on the CPU. Reported per path: seconds per stage, images/s,
achieved TFLOP/s (FLOPs counted with FlopCounterMode on one UNet call, one VAE decode and the text encoder, not
assumed), its share of the GPU's peak, peak memory; then the PSNR between the two paths' images and, for each
kernel switched off alone, the fast path's images/s (the ablation). Writes profile.json and profile.png.

Both paths run their own code, unchanged, and are timed by hooks: diffusers' pipeline by forward hooks on its text
encoder and VAE, streamsynth by wrapping the `Synthesizer`'s own methods (`encode_text`, `denoise`, `decode`) on the
instance around `generate_uint8`, the call the stream's workers make. Timing, peak memory, device names, the
environment and the report come from `streamsynth.benchmarks.benchtools`, as in the other benchmarks.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from . import benchtools
from ..commands.args import (add_device, nonnegative_float, nonnegative_int, positive_float, positive_int,
                             resolve_device)

log = logging.getLogger(__name__)

STAGES = ("text_encoding", "unet_steps", "vae_decode", "postprocess", "to_cpu")
PROMPTS = (
    "a photo of tench, a man holding a large fish on a river bank",
    "a photo of English springer, a dog running through tall grass",
    "a photo of church, a stone church with a tall steeple under a cloudy sky",
    "a photo of garbage truck, a green truck parked on a city street",
)
# NVIDIA's datasheet dense (no sparsity) fp16/bf16 tensor-core rates, TFLOP/s, by a part of the device name; the
# most specific name first. A datasheet peak, not a measurement: anchors.md measured ~790 on an H200's matmuls.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="time streamsynth's fast path against plain diffusers on one model",
        description="Per-stage time, images/s, TFLOP/s, memory and image agreement (PSNR) of streamsynth's fast "
        "path and of diffusers' StableDiffusionPipeline, plus one ablation per Triton kernel.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sd-arch", choices=("sd15", "tiny"),
                        help="random-weight Stable Diffusion architecture: sd15, SD1.5's; tiny, the small test model "
                        "(CPU)")
    source.add_argument("--sd-model", help="an SD1.x/2.x hub id or diffusers folder to profile instead")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the report: writes OUT/profile.json and OUT/profile.png (created)")
    p.add_argument("--model-dir", metavar="DIR",
                   help="where --sd-arch sd15 saves its random weights (default: OUT/sd15-random)")
    add_device(p)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("-b", "--batch-size", type=positive_int, help="images per batch (default: 32; 2 with --dry)")
    p.add_argument("--num-inference-steps", type=positive_int, help="denoising steps (default: 50; 3 with --dry)")
    p.add_argument("--guidance-scale", type=nonnegative_float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--image-size", type=positive_int, default=224, help="the classifier's image side, in pixels")
    p.add_argument("--scheduler", help="a streamsynth scheduler name (default: the model's own, PNDM for SD1.5)")
    p.add_argument("--repeats", type=positive_int, help="timed batches per path, median reported (default: 3; 1 with --dry)")
    p.add_argument("--warmup", type=nonnegative_int,
                   help="untimed batches first, per path (and per ablation when compiled) (default: 1)")
    p.add_argument("--peak-tflops", type=positive_float,
                   help="the device's peak rate for the share-of-peak figure (default for H100/H200: the datasheet's "
                   "dense fp16 rate, 989 SXM, 756 PCIe, 835 NVL; none on other devices)")
    p.add_argument("--dry", action="store_true", help="a smoke run: small batch, few steps, one repeat")
    p.add_argument("--no-ablation", action="store_true", help="skip the per-kernel on/off runs")
    fast = p.add_argument_group("fast-path options (streamsynth.synth.fast)")
    fast.add_argument("--attention", choices=("auto", "sdpa", "xformers"), default="auto",
                      help="attention backend: auto probes which is fastest")
    fast.add_argument("--channels-last", action="store_true", help="NHWC activations in the UNet and VAE")
    fast.add_argument("--fuse-qkv", action="store_true", help="one projection for attention's query, key and value")
    fast.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow start)")
    fast.add_argument("--cuda-graphs", action="store_true", help="compile the UNet with CUDA graphs")
    fast.add_argument("--no-kernels", action="store_true", help="leave all Triton kernels out of the fast path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = benchtools.as_device(resolve_device(args.device))
    # Events, synchronisation, memory statistics and Triton launches all follow the current device: make it ours.
    with benchtools.on_device(device):
        return _profile(args, settings, out, device)


def _profile(args: argparse.Namespace, settings: dict, out: Path, device: torch.device) -> int:
    model = _model_folder(args, out, device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(settings["batch"])]
    from ..seeding import derive_seed
    from ..synth import has_random_weights

    seeds = [derive_seed("profile", i) for i in range(settings["batch"])]

    reference = _load(model, args, device)
    flops = count_flops(reference, settings["batch"], settings["steps"], args.guidance_scale)
    attention = unet_attention(reference, settings["batch"], args.guidance_scale)
    ref_result, ref_images = _measure(lambda: _diffusers_batch(reference, prompts, seeds, settings, args), settings,
                                      device)
    scheduler_name = type(reference.scheduler).__name__
    reference = None  # frees the pipeline (the lambda above holds the name, not the object)
    _free(device)

    synth = _synthesizer(_load(model, args, device), settings, args)
    fast_result, fast_images = _measure(lambda: _streamsynth_batch(synth, prompts, seeds, args), settings, device)
    fast_result["fast_path"], fast_result["skipped"] = synth.fast_path.applied, synth.fast_path.skipped
    # One more batch under the profiler: where the device's time goes, kernel by kernel (attention, convolutions,
    # matrix multiplies, the Triton kernels), and whether it ever waits on the host.
    fast_result["busiest_ops"] = benchtools.busiest_ops(lambda: _streamsynth_batch(synth, prompts, seeds, args),
                                                         device, top=25)
    fast_pipe = synth.pipe

    peak = args.peak_tflops or _default_peak_tflops(device)
    for result in (ref_result, fast_result):
        _add_rates(result, flops["per_batch"], peak)
    report = {
        "benchmark": "profile", "device": benchtools.device_name(device), "environment": benchtools.environment(device),
        "model": str(model), "random_weights": has_random_weights(model), "arch": args.sd_arch, "dtype": str(fast_pipe.unet.dtype).replace("torch.", ""),
        "scheduler": scheduler_name, "guidance_scale": args.guidance_scale, "image_size": _image_size(fast_pipe),
        "classifier_size": args.image_size, **settings, "dry": args.dry, "flops": flops,
        "peak_tflops": peak, "peak_tflops_source": "--peak-tflops" if args.peak_tflops else "datasheet default",
        "kernels_requested": not args.no_kernels,
        "kernels_ran_triton": _kernels_ran_triton(device) and not args.no_kernels,
        "paths": {"diffusers": ref_result, "streamsynth": fast_result}, "unet_attention": attention,
        "speedup": fast_result["images_per_s"] / ref_result["images_per_s"],
        **image_agreement(fast_images, ref_images), "ablation": {},
    }
    # Written before the ablation too, so a run stopped during the ablation keeps the main comparison.
    benchtools.write_json(out / "profile.json", report)
    if not (args.no_ablation or args.no_kernels):
        report["ablation"] = _ablation(synth, prompts, seeds, args, settings, device, ref_images)
        benchtools.write_json(out / "profile.json", report)
    plot(report, out / "profile.png")
    _print_summary(report, out)
    return 0


def _settings(args) -> dict:
    # report key: (option, default with --dry, default)
    defaults = dict(batch=("batch_size", 2, 32), steps=("num_inference_steps", 3, 50), repeats=("repeats", 1, 3),
                    warmup=("warmup", 1, 1))
    settings = {k: getattr(args, dest) if getattr(args, dest) is not None else (dry if args.dry else full)
                for k, (dest, dry, full) in defaults.items()}
    for key in ("batch", "steps", "repeats"):
        if settings[key] < 1:
            flag = "--" + defaults[key][0].replace("_", "-")
            raise ValueError(f"{flag} must be at least 1, got {settings[key]}")
    return settings


def _model_folder(args, out: Path, device: torch.device) -> str | Path:
    if args.sd_model:
        from ..synth.loading import model_family

        family = model_family(args.sd_model)
        if family.key != "sd":  # the stage hooks and FLOP counts below read an SD1.x/2.x UNet's call
            raise ValueError(f"streamsynth profile measures SD1.x/2.x models; {args.sd_model} is {family.name}: time "
                             "it against its diffusers pipeline with benchmarks/families.py")
        return args.sd_model
    if args.sd_arch == "tiny":
        from ..synth import ensure_tiny_pipeline

        return ensure_tiny_pipeline()
    from ..synth.sd15 import save_random_sd15

    folder = Path(args.model_dir or out / "sd15-random")
    log.info("SD1.5 architecture with random weights in %s (built on first use)", folder)
    return save_random_sd15(folder, device)


def _load(model, args, device):
    from ..synth import load_pipeline

    return load_pipeline(model, device, args.dtype, scheduler=args.scheduler)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fast_path_options(args):
    from ..synth.fast import FastPathOptions

    use_kernels = not args.no_kernels
    return FastPathOptions(
        triton_kernels=use_kernels, fused_step=use_kernels, fused_postprocess=use_kernels, attention=args.attention,
        channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile_unet=args.compile,
        cuda_graphs=args.cuda_graphs,
    )


def _synthesizer(pipe, settings, args):
    """streamsynth's Synthesizer on `pipe`, with the fast path switched on as the stream's workers switch it on."""
    from ..synth import SynthesisConfig, Synthesizer

    config = SynthesisConfig(num_inference_steps=settings["steps"], guidance_scale=args.guidance_scale)
    return Synthesizer.from_pipeline(pipe, config, fast=_fast_path_options(args))


def _clock(device: torch.device) -> benchtools.StageClock:
    return benchtools.StageClock(device, STAGES)


# The Synthesizer's methods whose return ends a stage; wrapped on the instance, so the class's code runs unchanged.
SYNTHESIZER_STAGES = (("encode_text", "text_encoding"), ("denoise", "unet_steps"), ("decode", "vae_decode"))


@contextmanager
def _method_marks(synth, clock: benchtools.StageClock):
    """Marks stage ends when the Synthesizer's own methods return, by wrapping them on the instance."""
    def marking(method, stage):
        def wrapper(*args, **kwargs):
            result = method(*args, **kwargs)
            clock.mark(stage)
            return result
        return wrapper

    for name, stage in SYNTHESIZER_STAGES:
        setattr(synth, name, marking(getattr(synth, name), stage))
    try:
        yield
    finally:
        for name, _ in SYNTHESIZER_STAGES:
            delattr(synth, name)  # the class's method shows through again


def _streamsynth_batch(synth, prompts, seeds, args) -> tuple[benchtools.StageClock, torch.Tensor]:
    """One batch the way the stream's workers make it: `generate_uint8`, then the copy to the CPU."""
    clock = _clock(synth.device)
    with _method_marks(synth, clock):
        images = synth.generate_uint8(prompts, seeds, args.image_size)
    clock.mark("postprocess")
    images = images.cpu()
    clock.mark("to_cpu")
    return clock, images


@contextmanager
def _stage_hooks(pipe, clock: benchtools.StageClock):
    """Marks stage ends from inside diffusers' own __call__ with module hooks, without touching its code."""
    vae_entry = pipe.vae.post_quant_conv if pipe.vae.post_quant_conv is not None else pipe.vae.decoder
    handles = [
        pipe.text_encoder.register_forward_hook(lambda *_: clock.mark("text_encoding")),
        vae_entry.register_forward_pre_hook(lambda *_: clock.mark("unet_steps")),
        pipe.vae.decoder.register_forward_hook(lambda *_: clock.mark("vae_decode")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _diffusers_batch(pipe, prompts, seeds, settings, args) -> tuple[benchtools.StageClock, torch.Tensor]:
    from ..synth import resize_to_uint8

    clock = _clock(pipe.unet.device)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad(), _stage_hooks(pipe, clock):
        images = pipe(prompt=prompts, num_inference_steps=settings["steps"], guidance_scale=args.guidance_scale,
                      generator=generators, output_type="pt").images
        images = resize_to_uint8(images, args.image_size)  # what streamsynth hands the classifier, the unfused way
        clock.mark("postprocess")
        images = images.cpu()
        clock.mark("to_cpu")
    return clock, images


def _measure(run_batch, settings, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Warm-up batches, then timed ones (`benchtools.measure`): median seconds per stage, images/s, peak memory;
    and the last batch's images."""
    measured = benchtools.measure(run_batch, device, settings["warmup"], settings["repeats"])
    timings = [clock.seconds() for clock, _ in measured.results]
    stages = {stage: statistics.median(t[stage] for t in timings) for stage in STAGES}
    total = statistics.median(sum(t.values()) for t in timings)
    result = {"stages_s": stages, "total_s": total, "images_per_s": settings["batch"] / total,
              "warmup_s": measured.warmup_s, **measured.peak_memory.as_dict()}
    return result, measured.results[-1][1]


def _ablation(synth, prompts, seeds, args, settings, device, ref_images: torch.Tensor) -> dict:
    """The fast path's images/s with each kernel switched off alone, and its images' agreement with diffusers'.

    The agreement localises a numerical problem: the kernel whose switching off raises the PSNR is the one to look at.
    """
    from ..kernels.dispatch import DIFFUSION_KERNELS, disabled

    # Eager, everything an ablation runs has run already; a compiled UNet recompiles when a kernel is switched off.
    settings = {**settings, "warmup": settings["warmup"] if args.compile or args.cuda_graphs else 0}
    results = {}
    for name in DIFFUSION_KERNELS:
        with disabled(name):
            result, images = _measure(lambda: _streamsynth_batch(synth, prompts, seeds, args), settings, device)
        results[name] = {"images_per_s": result["images_per_s"], "stages_s": result["stages_s"],
                         **image_agreement(images, ref_images)}
    return results


def count_flops(pipe, batch: int, steps: int, guidance_scale: float) -> dict:
    """FLOPs of one UNet call (CFG doubles its batch), one VAE decode and the prompts' text encoding, counted by
    PyTorch's FlopCounterMode (matmuls, convolutions, attention), and their total for one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    latents, text = _unet_inputs(pipe, batch, guidance_scale)
    ids = torch.zeros(batch, text.shape[1], dtype=torch.long, device=unet.device)
    counts = {}
    with torch.no_grad():
        for name, call in (
            ("text_encoder", lambda: pipe.text_encoder(ids)),
            ("unet_call", lambda: unet(latents, 500, encoder_hidden_states=text)),
            ("vae_decode", lambda: vae.decode(latents[:batch])),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            counts[name] = counter.get_total_flops()
    # The unconditional prompt's encoding is left out: it is the same for every batch (streamsynth caches it).
    counts["per_batch"] = steps * counts["unet_call"] + counts["vae_decode"] + counts["text_encoder"]
    return counts


def _unet_inputs(pipe, batch: int, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random latents and text embeddings for one UNet call of a batch (CFG doubles its rows)."""
    unet = pipe.unet
    rows = 2 * batch if guidance_scale > 1.0 else batch
    device, dtype = unet.device, unet.dtype
    size = unet.config.sample_size
    latents = torch.randn(rows, unet.config.in_channels, size, size, device=device, dtype=dtype)
    text = torch.randn(rows, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device,
                       dtype=dtype)
    return latents, text


class _AttentionShapes(TorchFunctionMode):
    """Counts the `scaled_dot_product_attention` calls made inside it by shape (query, key, value, mask or None):
    it sees every call diffusers' attention processors make, without patching them."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[tuple] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.counts[(*(tuple(t.shape) for t in args[:3]), None if mask is None else tuple(mask.shape))] += 1
        return func(*args, **kwargs)


def unet_attention(pipe, batch: int, guidance_scale: float) -> list[dict]:
    """The attention calls of one UNet evaluation, one entry per distinct shape with its count, each timed under every
    `scaled_dot_product_attention` backend on random tensors of that shape (`benchtools.attention_backends_ms`; None
    where a backend refuses the call or runs out of memory): which backend SD's attention (head dim 40 in SD1.5's
    first blocks) should pin."""
    unet = pipe.unet
    latents, text = _unet_inputs(pipe, batch, guidance_scale)
    shapes = _AttentionShapes()
    with torch.no_grad(), shapes:
        unet(latents, 500, encoder_hidden_states=text)
    del latents, text
    calls = []
    for (query, key, value, mask), count in shapes.counts.items():
        tensors = [torch.randn(shape, device=unet.device, dtype=unet.dtype) for shape in (query, key, value)]
        attn_mask = None if mask is None else torch.zeros(mask, device=unet.device, dtype=unet.dtype)
        calls.append({"query": list(query), "key": list(key), "mask": mask is not None, "calls": count,
                      "ms": benchtools.attention_backends_ms(*tensors, attn_mask)})
        del tensors, attn_mask
        _free(unet.device)
    return calls


def _add_rates(result: dict, flops_per_batch: float, peak: float | None) -> None:
    tflops = flops_per_batch / result["total_s"] / 1e12
    result["achieved_tflops"] = tflops
    result["share_of_peak"] = tflops / peak if peak else None


def image_agreement(fast: torch.Tensor, reference: torch.Tensor) -> dict:
    """PSNR in dB of the fast path's uint8 images against the reference's (None when identical)."""
    mse = (fast.double() - reference.double()).pow(2).mean().item()
    return {"psnr_db": 10 * math.log10(255**2 / mse) if mse > 0 else None, "images_identical": mse == 0}


def _image_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = benchtools.device_name(device)
    return next((tflops for part, tflops in PEAK_TFLOPS if part in name), None)


def _kernels_ran_triton(device: torch.device) -> bool:
    from ..kernels.dispatch import runs_triton

    return runs_triton("group_norm", torch.empty(0, device=device))


def plot(report: dict, path: Path) -> None:
    """Left: milliseconds per image by stage for both paths. Right: images/s, with each kernel switched off."""
    batch = report["batch"]
    paths = report["paths"]
    title = (f"{report['arch'] or report['model']} on {report['device']}, {report['dtype']}, batch {batch}, "
             f"{report['steps']} steps, guidance {report['guidance_scale']}"
             + (" (dry run: a smoke test, not a measurement)" if report["dry"] else ""))
    with benchtools.figure(path, 2, figsize=(12, 4.5), title=title) as (left, right):
        bottoms = [0.0] * len(paths)
        for stage in STAGES:
            heights = [1000 * result["stages_s"][stage] / batch for result in paths.values()]
            left.bar(list(paths), heights, bottom=bottoms, label=stage)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        left.set_ylabel("ms per image")
        left.set_title("time per stage")
        left.legend(fontsize="small")
        labels = list(paths) + [f"without {name}" for name in report["ablation"]]
        rates = [r["images_per_s"] for r in paths.values()] + [r["images_per_s"] for r in report["ablation"].values()]
        right.bar(labels, rates, color=["tab:gray", "tab:blue"] + ["tab:orange"] * len(report["ablation"]))
        right.set_ylabel("images/s")
        right.set_title("throughput (streamsynth with each kernel off alone)")
        right.tick_params(axis="x", labelrotation=30)


def _agreement(result: dict) -> str:
    return "identical" if result["images_identical"] else f"{result['psnr_db']:.1f} dB PSNR"


def _print_summary(report: dict, out: Path) -> None:
    for name, result in report["paths"].items():
        share = f", {100 * result['share_of_peak']:.1f}% of peak" if result["share_of_peak"] else ""
        print(f"{name:12s} {result['images_per_s']:8.3f} img/s  {result['achieved_tflops']:8.3f} TFLOP/s{share}  "
              f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB  warm-up {result['warmup_s']:.1f} s")
    print(f"speedup {report['speedup']:.3f}x, images fast vs diffusers: {_agreement(report)}")
    for name, result in report["ablation"].items():
        print(f"  without {name:12s} {result['images_per_s']:8.3f} img/s, images vs diffusers: {_agreement(result)}")
    if report["random_weights"]:
        print("note: the model has RANDOM WEIGHTS (same architecture and FLOPs as a checkpoint): its images are noise, "
              "its timings are real")
    if not report["kernels_requested"]:
        print("note: --no-kernels: the fast path ran without its Triton kernels")
    elif not report["kernels_ran_triton"]:
        print("note: the Triton kernels did not run here (no CUDA device): their references did")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
