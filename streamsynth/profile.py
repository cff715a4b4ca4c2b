"""`streamsynth profile`: where the time goes, streamsynth's fast path against plain diffusers, in one run.

Both paths load the same model folder with `from_pretrained`, draw the same prompts and seeds, and end with the
same product: uint8 images of the classifier's size on the CPU. Reported per path: seconds per stage, images/s,
achieved TFLOP/s (FLOPs counted with FlopCounterMode on one UNet call, one VAE decode and the text encoder, not
assumed), its share of the GPU's peak, peak memory; then the PSNR between the two paths' images and, for each
kernel switched off alone, the fast path's images/s (the ablation). Writes profile.json and profile.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

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
    source.add_argument("--arch", choices=("sd15", "tiny"),
                        help="sd15: SD1.5's architecture with random weights; tiny: the small test model (CPU)")
    source.add_argument("--model", help="a diffusers folder or hub id to profile instead")
    p.add_argument("--out", required=True, help="folder for profile.json and profile.png (created)")
    p.add_argument("--model-dir", help="where --arch sd15 saves its random weights (default: OUT/sd15-random)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, help="images per batch (default 32; 2 with --dry)")
    p.add_argument("--steps", type=int, help="denoising steps (default 50; 3 with --dry)")
    p.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, default=224, help="the classifier's image size")
    p.add_argument("--scheduler", help="a streamsynth scheduler name (default: the model's own, PNDM for SD1.5)")
    p.add_argument("--repeats", type=int, help="timed batches per path, median reported (default 3; 1 with --dry)")
    p.add_argument("--warmup", type=int, help="untimed batches first, per path (and per ablation when compiled; default 1)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak rate for the share-of-peak figure (default for H100/H200: the datasheet's "
                   "dense fp16 rate, 989 SXM, 756 PCIe, 835 NVL; none on other devices)")
    p.add_argument("--dry", action="store_true", help="a smoke run: small batch, few steps, one repeat")
    p.add_argument("--no-ablation", action="store_true", help="skip the per-kernel on/off runs")
    fast = p.add_argument_group("fast-path options (streamsynth.synth.fast)")
    fast.add_argument("--attention", choices=("auto", "sdpa", "xformers"), default="auto")
    fast.add_argument("--channels-last", action="store_true")
    fast.add_argument("--fuse-qkv", action="store_true")
    fast.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow start)")
    fast.add_argument("--cuda-graphs", action="store_true", help="compile the UNet with CUDA graphs")
    fast.add_argument("--no-kernels", action="store_true", help="leave all Triton kernels out of the fast path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    model = _model_folder(args, out, device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(settings["batch"])]
    from .seeding import derive_seed
    from .synth import has_random_weights

    seeds = [derive_seed("profile", i) for i in range(settings["batch"])]

    reference = _load(model, args, device)
    flops = count_flops(reference, settings["batch"], settings["steps"], args.guidance)
    ref_result, ref_images = _measure(lambda: _diffusers_batch(reference, prompts, seeds, settings, args), settings,
                                      device)
    scheduler_name = type(reference.scheduler).__name__
    del reference
    _free(device)

    fast_pipe = _load(model, args, device)
    fast = _apply_fast_path(fast_pipe, args)
    synth = _synthesizer(fast_pipe, fast, settings, args)
    fast_result, fast_images = _measure(lambda: _fast_batch(synth, fast, prompts, seeds, args), settings, device)
    fast_result["fast_path"], fast_result["skipped"] = fast.applied, fast.skipped

    peak = args.peak_tflops or _default_peak_tflops(device)
    for result in (ref_result, fast_result):
        _add_rates(result, flops["per_batch"], peak)
    report = {
        "device": _device_name(device), "torch": torch.__version__, "diffusers": _diffusers_version(),
        "model": str(model), "random_weights": has_random_weights(model), "arch": args.arch, "dtype": str(fast_pipe.unet.dtype).replace("torch.", ""),
        "scheduler": scheduler_name, "guidance_scale": args.guidance, "image_size": _image_size(fast_pipe),
        "classifier_size": args.size, **settings, "dry": args.dry, "flops": flops,
        "peak_tflops": peak, "peak_tflops_source": "--peak-tflops" if args.peak_tflops else "datasheet default",
        "kernels_ran_triton": _kernels_ran_triton(device) and not args.no_kernels,
        "paths": {"diffusers": ref_result, "streamsynth": fast_result},
        "speedup": fast_result["images_per_s"] / ref_result["images_per_s"],
        **image_agreement(fast_images, ref_images), "ablation": {},
    }
    # Written before the ablation too, so a run stopped during the ablation keeps the main comparison.
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    if not (args.no_ablation or args.no_kernels):
        report["ablation"] = _ablation(synth, fast, prompts, seeds, args, settings, device, ref_images)
        (out / "profile.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "profile.png")
    _print_summary(report, out)
    return 0


def _settings(args) -> dict:
    defaults = dict(batch=(2, 32), steps=(3, 50), repeats=(1, 3), warmup=(1, 1))
    settings = {k: getattr(args, k) if getattr(args, k) is not None else pair[0 if args.dry else 1]
                for k, pair in defaults.items()}
    for key in ("batch", "steps", "repeats"):
        if settings[key] < 1:
            raise ValueError(f"--{key} must be at least 1, got {settings[key]}")
    return settings


def _model_folder(args, out: Path, device: torch.device) -> str | Path:
    if args.model:
        return args.model
    if args.arch == "tiny":
        from .synth import ensure_tiny_pipeline

        return ensure_tiny_pipeline()
    from .synth.sd15 import save_random_sd15

    folder = Path(args.model_dir or out / "sd15-random")
    log.info("SD1.5 architecture with random weights in %s (built on first use)", folder)
    return save_random_sd15(folder, device)


def _load(model, args, device):
    from .synth import load_pipeline

    return load_pipeline(model, device, args.dtype, scheduler=args.scheduler)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _apply_fast_path(pipe, args):
    from .synth.fast import FastPathOptions, apply

    use_kernels = not args.no_kernels
    return apply(pipe, FastPathOptions(
        triton_kernels=use_kernels, fused_step=use_kernels, fused_postprocess=use_kernels, attention=args.attention,
        channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile_unet=args.compile,
        cuda_graphs=args.cuda_graphs,
    ))


def _synthesizer(pipe, fast, settings, args):
    from .synth import SynthesisConfig, Synthesizer

    config = SynthesisConfig(num_inference_steps=settings["steps"], guidance_scale=args.guidance)
    return Synthesizer(pipe, config, fused_step=fast.fused_step)


class StageClock:
    """Marks the end of each stage; on CUDA with events on the current stream, read after one synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, stage: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((stage, event))
        else:
            self.marks.append((stage, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Seconds per stage: each interval is charged to the stage whose mark ends it."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = dict.fromkeys(STAGES, 0.0)
        for (_, begin), (stage, end) in zip(self.marks, self.marks[1:]):
            totals[stage] += begin.elapsed_time(end) / 1000 if self.cuda else end - begin
        return totals


def _fast_batch(synth, fast, prompts, seeds, args) -> tuple[StageClock, torch.Tensor]:
    clock = StageClock(synth.device)
    with torch.no_grad():
        text = synth.encode_text(prompts)
        clock.mark("text_encoding")
        synth.pipe.scheduler.set_timesteps(synth.config.num_inference_steps, device=synth.device)
        latents, generators = synth.initial_latents(seeds)
        latents = synth.denoise(latents, text, generators)
        clock.mark("unet_steps")
        decoded = synth.decode(latents)
        clock.mark("vae_decode")
        images = fast.postprocess(decoded, args.size)
        clock.mark("postprocess")
        images = images.cpu()
        clock.mark("to_cpu")
    return clock, images


@contextmanager
def _stage_hooks(pipe, clock: StageClock):
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


def _diffusers_batch(pipe, prompts, seeds, settings, args) -> tuple[StageClock, torch.Tensor]:
    from .synth import resize_to_uint8

    clock = StageClock(pipe.unet.device)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad(), _stage_hooks(pipe, clock):
        images = pipe(prompt=prompts, num_inference_steps=settings["steps"], guidance_scale=args.guidance,
                      generator=generators, output_type="pt").images
        images = resize_to_uint8(images, args.size)  # what streamsynth hands the classifier, the unfused way
        clock.mark("postprocess")
        images = images.cpu()
        clock.mark("to_cpu")
    return clock, images


def _measure(run_batch, settings, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Warm-up batches, then timed ones: median seconds per stage, images/s, peak memory; and the last images."""
    for _ in range(settings["warmup"]):
        run_batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings = []
    for _ in range(settings["repeats"]):
        clock, images = run_batch()
        timings.append(clock.seconds())
    stages = {stage: statistics.median(t[stage] for t in timings) for stage in STAGES}
    total = statistics.median(sum(t.values()) for t in timings)
    result = {"stages_s": stages, "total_s": total, "images_per_s": settings["batch"] / total, **_peak_memory(device)}
    return result, images


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "cuda max_memory_allocated"}
    # ru_maxrss is KiB on Linux; it is the whole process's peak so far, not this path's alone.
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process peak RSS (cumulative over the run)"}


def _ablation(synth, fast, prompts, seeds, args, settings, device, ref_images: torch.Tensor) -> dict:
    """The fast path's images/s with each kernel switched off alone, and its images' agreement with diffusers'.

    The agreement localises a numerical problem: the kernel whose switching off raises the PSNR is the one to look at.
    """
    from kernels import KERNEL_NAMES, disabled

    # Eager, everything an ablation runs has run already; a compiled UNet recompiles when a kernel is switched off.
    settings = {**settings, "warmup": settings["warmup"] if args.compile or args.cuda_graphs else 0}
    results = {}
    for name in KERNEL_NAMES:
        with disabled(name):
            result, images = _measure(lambda: _fast_batch(synth, fast, prompts, seeds, args), settings, device)
        results[name] = {"images_per_s": result["images_per_s"], "stages_s": result["stages_s"],
                         **image_agreement(images, ref_images)}
    return results


def count_flops(pipe, batch: int, steps: int, guidance_scale: float) -> dict:
    """FLOPs of one UNet call (CFG doubles its batch), one VAE decode and the prompts' text encoding, counted by
    PyTorch's FlopCounterMode (matmuls, convolutions, attention), and their total for one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    rows = 2 * batch if guidance_scale > 1.0 else batch
    device, dtype = unet.device, unet.dtype
    size = unet.config.sample_size
    latents = torch.randn(rows, unet.config.in_channels, size, size, device=device, dtype=dtype)
    length = pipe.tokenizer.model_max_length
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    text = torch.randn(rows, length, unet.config.cross_attention_dim, device=device, dtype=dtype)
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
    name = torch.cuda.get_device_name(device)
    return next((tflops for part, tflops in PEAK_TFLOPS if part in name), None)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _kernels_ran_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    from kernels.dispatch import is_interpreted
    from kernels.group_norm import _group_norm_kernel

    return is_interpreted(_group_norm_kernel)


def plot(report: dict, path: Path) -> None:
    """Left: milliseconds per image by stage for both paths. Right: images/s, with each kernel switched off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = report["batch"]
    paths = report["paths"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
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
    fig.suptitle(f"{report['arch'] or report['model']} on {report['device']}, {report['dtype']}, batch {batch}, "
                 f"{report['steps']} steps, guidance {report['guidance_scale']}"
                 + (" (dry run: a smoke test, not a measurement)" if report["dry"] else ""), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _agreement(result: dict) -> str:
    return "identical" if result["images_identical"] else f"{result['psnr_db']:.1f} dB PSNR"


def _print_summary(report: dict, out: Path) -> None:
    for name, result in report["paths"].items():
        share = f", {100 * result['share_of_peak']:.1f}% of peak" if result["share_of_peak"] else ""
        print(f"{name:12s} {result['images_per_s']:8.3f} img/s  {result['achieved_tflops']:8.3f} TFLOP/s{share}  "
              f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB")
    print(f"speedup {report['speedup']:.3f}x, images fast vs diffusers: {_agreement(report)}")
    for name, result in report["ablation"].items():
        print(f"  without {name:12s} {result['images_per_s']:8.3f} img/s, images vs diffusers: {_agreement(result)}")
    if report["random_weights"]:
        print("note: the model has RANDOM WEIGHTS (same architecture and FLOPs as a checkpoint): its images are noise, "
              "its timings are real")
    if not report["kernels_ran_triton"]:
        print("note: the Triton kernels did not run here (no CUDA device): their references did")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
