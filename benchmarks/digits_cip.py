"""The Caption-in-Prompt comparison in miniature, on real handwritten digits (a benchmark, not a test).

    python benchmarks/digits_cip.py --out runs/digits-cip                 # docs/digits.md's table; see --help
    python benchmarks/digits_cip.py --seeds 0 --steps 40 --out runs/dry    # a quick look

Classifiers of one architecture and one training recipe are trained on

  (a) real:   the real training part of scikit-learn's digits (1,297 images, the images the generator learned from),
  (b) cip:    the stream from the embedded digits generator with Caption-in-Prompt prompts ("a photo of {name},
              {caption}") at the default guidance scale,
  (c) basic:  the same stream with the basic prompt "a photo of {name}",
  (d) cip at other guidance scales,

each from several seeds, and every classifier is scored on the 500 held-out real digits that neither the generator
nor any classifier saw. Synthetic classifiers see synthetic images only. It prints a table (mean, standard
deviation and every seed's top-1) and writes it with all settings and timings to OUT/results.json and
OUT/table.md. This is the quality harness that speed levers (fewer steps, other schedulers, limited guidance) are
judged by: `--conditions levers` trains one set of classifiers per entry of `--levers` (the reference recipe, each
speed lever alone, the speed presets: `streamsynth.synth.speed`), all with the CiP prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from streamsynth import GeneratorConfig, StreamLoader, SynthesisConfig, SyntheticStream  # noqa: E402
from streamsynth.digits import embedded_captions, embedded_model  # noqa: E402
from streamsynth.commands.args import ArgumentParser, comma_list  # noqa: E402
from streamsynth.digits.data import (CLASS_IDS, digit_augmentation, fit_classifier, held_out_top1,  # noqa: E402
                                real_training_batches)
from streamsynth.stream import EpochsInARow  # noqa: E402
from streamsynth.synth.speed import SPEED_LEVERS, SPEED_PRESETS, SpeedPreset  # noqa: E402


CONDITIONS = ("real", "cip", "basic", "guidance", "levers")
# The speed presets and each speed lever alone (streamsynth.synth.speed), all at the default guidance scale.
# A negative control: two PNDM steps leave noise in the images, a drop the table must show if it can show any.
LEVERS = {**SPEED_PRESETS, **SPEED_LEVERS, "control: pndm 2": SpeedPreset("pndm", 2, summary="too few steps")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/digits-cip", help="folder for results.json and table.md")
    p.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2], help="one classifier per seed and condition")
    p.add_argument("--guidance-scale", type=comma_list(float), default=[1.0, 1.5, 3.0, 5.0],
                   help="guidance scales for the CiP prompt (condition d)")
    p.add_argument("--default-guidance", type=float, default=1.5, help="the guidance of conditions (b) and (c)")
    p.add_argument("--conditions", type=comma_list(str, CONDITIONS), default=list(CONDITIONS),
                   help="which comparisons to run")
    p.add_argument("--model", default="test_resnet", help="classifier (a torchvision or timm name)")
    p.add_argument("--image-size", type=int, default=16, help="classifier input side")
    # 150 steps of 64 with replay 8: 1,200 synthetic digits per classifier, so that the 15 synthetic classifiers of
    # the default table fit in about an hour on a shared 2-core CPU (synthesis is nearly all of the cost).
    p.add_argument("--steps", type=int, default=150, help="classifier optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--replay", type=int, default=8, help="uses of each synthetic image (fresh augmentation each)")
    p.add_argument("--num-inference-steps", type=int, default=20, help="denoising steps of conditions b-d")
    p.add_argument("--levers", type=comma_list(str, tuple(LEVERS)), default=list(LEVERS),
                   help="which presets and levers condition 'levers' compares")
    p.add_argument("--workers", type=int, default=2, help="synthesis worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer process")
    p.add_argument("--fidelity-images", type=int, default=500,
                   help="with condition 'levers': samples per lever judged by a classifier trained on real digits "
                   "(0: none)")
    p.add_argument("--no-classifiers", action="store_true",
                   help="only the fidelity of the levers, no synthetic-to-real classifiers")
    return p.parse_args(argv)


def conditions(args: argparse.Namespace) -> list[dict]:
    runs = []
    if "real" in args.conditions:
        runs.append({"name": "real", "data": "real"})
    if "cip" in args.conditions:
        runs.append({"name": f"cip, guidance {args.default_guidance:g}", "data": "stream", "prompt": "cip",
                     "guidance": args.default_guidance})
    if "basic" in args.conditions:
        runs.append({"name": f"basic, guidance {args.default_guidance:g}", "data": "stream", "prompt": "basic",
                     "guidance": args.default_guidance})
    if "guidance" in args.conditions:
        runs += [{"name": f"cip, guidance {g:g}", "data": "stream", "prompt": "cip", "guidance": g}
                 for g in args.guidance_scale if g != args.default_guidance or "cip" not in args.conditions]
    if "levers" in args.conditions:
        runs += [{"name": name, "data": "stream", "prompt": "cip", "guidance": args.default_guidance,
                  "steps": LEVERS[name].num_inference_steps, "scheduler": LEVERS[name].scheduler,
                  "interval": LEVERS[name].guidance_interval, "cache": LEVERS[name].feature_cache_interval}
                 for name in args.levers]
    return runs


def synthetic_stream(args: argparse.Namespace, condition: dict, seed: int) -> SyntheticStream:
    """The embedded generator's stream under this condition's prompt, guidance and sampler settings."""
    lever = {"guidance_interval": condition["interval"]} if "interval" in condition else {}
    if condition.get("cache", 1) != 1:
        lever["feature_cache_interval"] = condition["cache"]
    generator = GeneratorConfig(
        embedded_model(), image_size=args.image_size, devices=("cpu",), batch_size=args.batch_size,
        scheduler=condition.get("scheduler"),
        synthesis=SynthesisConfig(num_inference_steps=condition.get("steps", args.num_inference_steps),
                                  guidance_scale=condition["guidance"], **lever))
    return SyntheticStream(embedded_captions(), generator, prompt=condition["prompt"], seed=seed,
                           batch_size=args.batch_size, replay=args.replay, transform=digit_augmentation(args.image_size))


def synthetic_batches(args: argparse.Namespace, condition: dict, seed: int) -> EpochsInARow:
    """The condition's stream, endlessly; one group ready per worker, so the workers stop soon after the
    classifier's last step, wasting little synthesis."""
    return EpochsInARow(StreamLoader(synthetic_stream(args, condition, seed), args.workers, prefetch_factor=1))


def fidelity(args: argparse.Namespace, condition: dict, judge: torch.nn.Module,
             reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """How recognisable the condition's images are: the share of its first `--fidelity-images` samples (seed 0)
    that a classifier trained on the real digits gives the class they were prompted with, and their mean absolute
    difference in grey levels from the reference recipe's images of the same samples (same prompts, same seeds).
    More sensitive than the synthetic-to-real top-1, which a classifier can reach from rough images."""
    from streamsynth.classifier.evaluate import eval_transform

    specs, images = synthetic_stream(args, condition, seed=0).make_samples(range(args.fidelity_images))
    view = eval_transform(args.image_size)
    with torch.no_grad():
        predicted = judge.eval()(torch.stack([view(image) for image in images])).argmax(1)
    labels = torch.tensor([spec.label for spec in specs])
    result = {"condition": condition["name"], "fidelity": 100.0 * (predicted == labels).float().mean().item(),
              "images": len(specs)}
    reference = images if reference is None else reference  # the reference recipe is its own yardstick
    result["mean_abs_difference_to_reference"] = (images.float() - reference.float()).abs().mean().item()
    return result, images


def run(args: argparse.Namespace, condition: dict, seed: int) -> dict:
    started = time.perf_counter()
    if condition["data"] == "real":
        batches = real_training_batches(args.image_size, args.batch_size, seed=seed)
    else:
        batches = synthetic_batches(args, condition, seed)
    model = fit_classifier(batches, args.steps, arch=args.model, lr=args.lr, seed=seed)
    top1 = held_out_top1(model, args.image_size, "cpu", CLASS_IDS)
    return {"condition": condition["name"], "seed": seed, "top1": top1,
            "wall_s": round(time.perf_counter() - started, 1)}


def table(results: list[dict], names: list[str]) -> str:
    lines = ["| training data | top-1 on held-out real digits (mean ± std) | seeds |", "| --- | --- | --- |"]
    for name in names:
        values = [r["top1"] for r in results if r["condition"] == name]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(values):.1f} ± {spread:.1f} % | "
                     f"{', '.join(f'{v:.1f}' for v in values)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = conditions(args)
    results, started, load_at_start = [], time.perf_counter(), os.getloadavg()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    fidelities = lever_fidelities(args, runs) if "levers" in args.conditions and args.fidelity_images else []
    for condition in runs if not args.no_classifiers else []:
        for seed in args.seeds:
            result = run(args, condition, seed)
            results.append(result)
            print(f"{result['condition']:>22}  seed {seed}: top-1 {result['top1']:.1f}%  ({result['wall_s']:.0f} s)",
                  flush=True)
            write_results(out, settings, runs, results, fidelities, started, load_at_start)
    write_results(out, settings, runs, results, fidelities, started, load_at_start)
    names = [c["name"] for c in runs]
    text = table(results, names) if results else ""
    if fidelities:
        text += "\n\n" + fidelity_table(fidelities)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


def lever_fidelities(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """The fidelity of every lever condition, judged by one classifier trained on the real digits (seed 0)."""
    judge = fit_classifier(real_training_batches(args.image_size, args.batch_size, seed=0), args.steps,
                           arch=args.model, lr=args.lr, seed=0)
    print(f"judge: trained on real digits, held-out top-1 {held_out_top1(judge, args.image_size, 'cpu', CLASS_IDS):.1f}%",
          flush=True)
    levers = [c for c in runs if c["name"] in LEVERS]
    levers.sort(key=lambda c: c["name"] != "reference")  # the reference first: the others are compared to it
    found, reference = [], None
    for condition in levers:
        result, images = fidelity(args, condition, judge, reference)
        if condition["name"] == "reference":
            reference = images
        found.append(result)
        print(f"{result['condition']:>22}  fidelity {result['fidelity']:.1f}%  "
              f"|difference| {result['mean_abs_difference_to_reference']:.1f}", flush=True)
    return found


def fidelity_table(fidelities: list[dict]) -> str:
    lines = ["| sampler | judged as its prompted class | mean \\|difference\\| to the reference's images (grey levels) |",
             "| --- | --- | --- |"]
    lines += [f"| {f['condition']} | {f['fidelity']:.1f} % | {f['mean_abs_difference_to_reference']:.1f} |"
              for f in fidelities]
    return "\n".join(lines)


def write_results(out: Path, settings: dict, runs: list[dict], results: list[dict], fidelities: list[dict],
                  started: float, load_at_start: tuple) -> None:
    """Written after every classifier: an hour's run interrupted keeps what it measured."""
    (out / "results.json").write_text(json.dumps({
        "settings": settings, "conditions": runs, "model": str(embedded_model()), "results": results,
        "fidelity": fidelities, "wall_s": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg()},
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
