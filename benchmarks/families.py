"""Each model family's architecture with random weights, at its native resolution, through streamsynth's loop and
through its own diffusers pipeline, in one run: seconds per image of both, and how far apart their images are.

    python benchmarks/families.py --size tiny --device cpu --out runs/families               # seconds, the docs' table
    python benchmarks/families.py --size native --device cuda --dtype fp16 --out runs/families-gpu   # the GPU step

Every family registered in `streamsynth.synth.families` (or those named) is built by its own `random_pipeline`
("tiny": a few MB; "native": the released architecture, built on the device), moved to the dtype, and sampled with
the same prompts and seeds by diffusers' `__call__` (with the family's `reference_call_options`) and by
streamsynth's `Synthesizer.generate` on the same components; the timed batches alternate between the two, so a change
of load falls on both alike. On a CUDA device streamsynth's default fast path is timed after them (it changes the
components in place, so it comes last). The images of the two plain paths are compared (largest absolute difference,
PSNR); random weights make noise, so the comparison checks the arithmetic, not the pictures. One JSON record is
written per family as soon as it is measured, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from streamsynth.benchmarks import benchtools  # noqa: E402
from streamsynth.commands.args import ArgumentParser, add_device, comma_list, resolve_device  # noqa: E402
from streamsynth.seeding import derive_seed  # noqa: E402
from streamsynth.synth import SynthesisConfig, Synthesizer  # noqa: E402
from streamsynth.synth.families import FAMILIES  # noqa: E402
from streamsynth.synth.loading import resolve_dtype  # noqa: E402

KEYS = tuple(dict.fromkeys(family.key for family in FAMILIES.values()))
PROMPTS = ("a photo of tench, a man holding a large fish by a river", "a photo of church, a stone church under clouds",
           "a photo of golf ball, a white ball on green grass", "a photo of parachute, a red parachute in a blue sky")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for families.json")
    p.add_argument("--families", type=comma_list(str, KEYS), default=list(KEYS), help="families to time")
    p.add_argument("--size", choices=("tiny", "native"), default="tiny",
                   help="tiny random models, or the released architectures (random weights; build them on a GPU)")
    add_device(p)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch")
    p.add_argument("--num-inference-steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=4.5, help="classifier-free guidance scale")
    p.add_argument("--repeats", type=int, default=3, help="timed batches of each path (median reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def _parameters(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in part.parameters()) for name, part in pipe.components.items()
            if isinstance(part, torch.nn.Module)}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def measure_family(key: str, args: argparse.Namespace, device: torch.device) -> dict:
    family = next(f for f in FAMILIES.values() if f.key == key)
    benchtools.reset_peak_memory(device)
    started = time.perf_counter()
    pipe = family.random_pipeline(args.size, device).to(device, resolve_dtype(args.dtype, device))
    pipe.set_progress_bar_config(disable=True)
    benchtools.synchronize(device)
    built_s = time.perf_counter() - started
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    seeds = [derive_seed("families", i) for i in range(args.batch_size)]
    size = family.native_size(pipe)
    config = SynthesisConfig(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)

    def diffusers_batch() -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompts, height=size, width=size, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, generator=generators, output_type="pt",
                    **family.reference_call_options).images

    paths = {"diffusers": diffusers_batch, "streamsynth": lambda: Synthesizer(pipe, config).generate(prompts, seeds)}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    images = {name: run() for name, run in paths.items()}  # the warm-up batch, kept for the comparison
    for _ in range(args.repeats):  # alternating: a change of load hits both alike
        for name, run in paths.items():
            with benchtools.Timer(device) as timer:
                run()
            seconds[name].append(timer.seconds)
    if device.type == "cuda":
        from streamsynth.synth.fast import FastPathOptions

        fast = Synthesizer.from_pipeline(pipe, config, FastPathOptions())
        images["streamsynth-fast"] = fast.generate(prompts, seeds)
        seconds["streamsynth-fast"] = []
        for _ in range(args.repeats):
            with benchtools.Timer(device) as timer:
                fast.generate(prompts, seeds)
            seconds["streamsynth-fast"].append(timer.seconds)
    per_image = {name: statistics.median(times) / args.batch_size for name, times in seconds.items()}
    reference = images["diffusers"]
    record = {
        "family": family.name, "key": key, "size": args.size, "resolution": size,
        "text_encoders": [str(encoder) for encoder in family.text_encoders(pipe)],
        "parameters": _parameters(pipe), "build_s": built_s, "seconds": seconds, "s_per_image": per_image,
        "streamsynth_vs_diffusers": per_image["diffusers"] / per_image["streamsynth"],
        "max_abs_difference": {name: (image.float() - reference.float()).abs().max().item()
                               for name, image in images.items() if name != "diffusers"},
        "psnr_db": {name: _psnr(image, reference) for name, image in images.items() if name != "diffusers"},
        "peak_memory_bytes": benchtools.peak_memory_bytes(device),
        "peak_memory_kind": benchtools.peak_memory_kind(device),
    }
    return record


def main(argv: list[str] | None = None) -> int:
    import diffusers

    args = parse_args(argv)
    # Casting a built model's dtype makes diffusers warn about modules to keep in fp32; random models have none.
    diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = benchtools.as_device(resolve_device(args.device))
    report = {"benchmark": "families", "random_weights": True, "device": benchtools.device_name(device),
              "environment": benchtools.environment(device),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "families": []}
    print(f"{'family':<11} {'pixels':>6} {'diffusers s/img':>16} {'streamsynth s/img':>18} {'fast s/img':>11} "
          f"{'max |diff|':>11}")
    with benchtools.on_device(device):
        for key in args.families:
            record = measure_family(key, args, device)
            gc.collect()  # the family's pipeline, before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["families"].append(record)
            path = benchtools.write_json(out / "families.json", report)
            times = record["s_per_image"]
            fast = f"{times['streamsynth-fast']:>11.3f}" if "streamsynth-fast" in times else f"{'-':>11}"
            print(f"{record['family']:<11} {record['resolution']:>6} {times['diffusers']:>16.3f} "
                  f"{times['streamsynth']:>18.3f} {fast} {record['max_abs_difference']['streamsynth']:>11.2e}",
                  flush=True)
    print(f"device: {report['device']}; batch {args.batch_size}, {args.num_inference_steps} steps, guidance "
          f"{args.guidance_scale}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
