"""Speed levers side by side: UNet evaluations per image and images/s of each, against the reference recipe, in one run.

    python benchmarks/speed_levers.py --out runs/speed-levers                       # the embedded digits model, CPU
    python benchmarks/speed_levers.py --sd-arch sd15 --device cuda --dtype fp16 --image-size 512 --out runs/levers-sd15

Every lever and preset of `streamsynth.synth.speed` makes the same batch (same prompts, same seeds) with streamsynth's
sampler on one loaded pipeline; only the scheduler and the sampling settings change between them. The timed batches
go round-robin over the levers (one batch of each, then the next round), so that a change of load on a shared
machine falls on all of them alike; the median per lever is reported, with the ratio to the reference recipe's
median of the same run. UNet evaluations are counted, not assumed: the sampler's feature cache counts the rows of
every UNet call (an image guided on a step counts two), full passes and shallow ones apart. Peak memory is the process's (CPU) or the allocator's (CUDA) over each lever's
timed batches. Quality is the other half of the table: `benchmarks/digits_cip.py --conditions levers`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from streamsynth.benchmarks import benchtools  # noqa: E402
from streamsynth.commands.args import ArgumentParser, add_device, comma_list, resolve_device  # noqa: E402
from streamsynth.seeding import derive_seed  # noqa: E402
from streamsynth.synth import SynthesisConfig, Synthesizer, load_pipeline  # noqa: E402
from streamsynth.synth.loading import scheduler_from_name  # noqa: E402
from streamsynth.synth.speed import SPEED_LEVERS, SPEED_PRESETS  # noqa: E402

LEVERS = {**SPEED_PRESETS, **SPEED_LEVERS}
PROMPTS = ("a photo of 3, a thin three leaning right", "a photo of 7, a seven with a bar",
           "a photo of tench, a man holding a large fish", "a photo of church, a stone church under a cloudy sky")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--sd-model", help="a Stable Diffusion hub id or diffusers folder (default: the embedded "
                        "digits model)")
    source.add_argument("--sd-arch", choices=("sd15",), help="SD1.5's architecture with random weights (speed only)")
    p.add_argument("--model-dir", metavar="DIR", help="where --sd-arch sd15 saves its random weights "
                   "(default: OUT/sd15-random)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for speed-levers.json")
    add_device(p)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--image-size", type=int, help="generated side in pixels (default: the model's own)")
    p.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--levers", type=comma_list(str, tuple(LEVERS)), default=list(LEVERS),
                   help="presets and levers to time (the reference is always timed)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per lever (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per lever first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def model_folder(args: argparse.Namespace, out: Path) -> str:
    if args.sd_arch == "sd15":
        from streamsynth.synth.sd15 import save_random_sd15

        folder = Path(args.model_dir or out / "sd15-random")
        if not (folder / "model_index.json").is_file():
            save_random_sd15(folder)
        return str(folder)
    if args.sd_model:
        return args.sd_model
    from streamsynth.digits.embedded import embedded_model

    return str(embedded_model())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = benchtools.as_device(resolve_device(args.device))
    names = ["reference"] + [n for n in args.levers if n != "reference"]
    with benchtools.on_device(device):
        pipe = load_pipeline(model_folder(args, out), device, args.dtype)
        own_scheduler = pipe.scheduler.config
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
        seeds = [derive_seed("speed-levers", i) for i in range(args.batch_size)]
        schedulers, synths = {}, {}
        for name in names:  # the scheduler first: a Synthesizer reads its step's signature when built
            lever = LEVERS[name]
            pipe.scheduler = schedulers[name] = scheduler_from_name(lever.scheduler, own_scheduler) \
                if lever.scheduler else type(pipe.scheduler).from_config(own_scheduler)
            synths[name] = Synthesizer(pipe, SynthesisConfig(
                num_inference_steps=lever.num_inference_steps, guidance_scale=args.guidance_scale,
                guidance_interval=lever.guidance_interval, feature_cache_interval=lever.feature_cache_interval,
                height=args.image_size, width=args.image_size))

        def batch(name: str) -> torch.Tensor:
            pipe.scheduler = schedulers[name]
            images = synths[name].generate_uint8(prompts, seeds, None)
            benchtools.synchronize(device)
            return images

        rows = {name: {"seconds": [], "peak_memory_bytes": 0} for name in names}
        for name in names:
            for _ in range(max(1, args.warmup)):
                batch(name)
            made = args.batch_size * max(1, args.warmup)
            cache = synths[name].feature_cache
            rows[name]["unet_evaluations_per_image"] = (cache.full_rows + cache.shallow_rows) / made
            rows[name]["full_evaluations_per_image"] = cache.full_rows / made
        for _ in range(args.repeats):  # round-robin: a change of load hits every lever alike
            for name in names:
                benchtools.reset_peak_memory(device)
                with benchtools.Timer(device) as timer:
                    batch(name)
                rows[name]["seconds"].append(timer.seconds)
                rows[name]["peak_memory_bytes"] = max(rows[name]["peak_memory_bytes"],
                                                      benchtools.peak_memory_bytes(device))
    reference_s = statistics.median(rows["reference"]["seconds"])
    report_rows = []
    for name in names:
        lever, row = LEVERS[name], rows[name]
        median = statistics.median(row["seconds"])
        report_rows.append({
            "lever": name, "summary": lever.summary, "scheduler": lever.scheduler or "model's own",
            "num_inference_steps": lever.num_inference_steps, "guidance_interval": lever.guidance_interval,
            "feature_cache_interval": lever.feature_cache_interval,
            "unet_evaluations_per_image": row["unet_evaluations_per_image"],
            "full_evaluations_per_image": row["full_evaluations_per_image"],
            "images_per_s": args.batch_size / median, "speedup_vs_reference": reference_s / median,
            "seconds": row["seconds"], "peak_memory_bytes": row["peak_memory_bytes"],
        })
    report = {"benchmark": "speed-levers", "model": model_folder(args, out), "random_weights": bool(args.sd_arch),
              "device": benchtools.device_name(device), "environment": benchtools.environment(device),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "peak_memory_kind": benchtools.peak_memory_kind(device), "levers": report_rows}
    path = benchtools.write_json(out / "speed-levers.json", report)
    print(f"{'lever':<22} {'UNet evals/img':>15} {'of them full':>13} {'images/s':>9} {'x reference':>12} "
          f"{'peak MiB':>9}")
    for row in report_rows:
        print(f"{row['lever']:<22} {row['unet_evaluations_per_image']:>15.1f} "
              f"{row['full_evaluations_per_image']:>13.1f} {row['images_per_s']:>9.2f} "
              f"{row['speedup_vs_reference']:>12.2f} {row['peak_memory_bytes'] / 2**20:>9.0f}")
    print(f"device: {report['device']}; batch {args.batch_size}, guidance {args.guidance_scale}; "
          f"{args.repeats} round-robin rounds; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
