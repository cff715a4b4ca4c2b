"""Accuracy per generated image: does steering the generator by the learner save generated images? (a benchmark)

    python benchmarks/steering_digits.py --out runs/steering        # docs/steering.md's table and plot; see --help
    python benchmarks/steering_digits.py --seeds 0 --budgets 256 --modes uniform,sample --out runs/dry   # a look
    python benchmarks/steering_digits.py --replot runs/steering/results.json --out runs/steering   # table, plot again

On the embedded default (the tiny digits generator, Caption-in-Prompt prompts), one classifier is trained per
(steering mode, seed, budget): the budget is a number of images generated, steering's extra candidates included, and
the classifier trains on what that budget buys, each image used `--replay` times (held fixed), with train.py's recipe
scaled to the run (warmup, cosine decay to zero at its last step). Every classifier is scored on the 500 held-out
real digits. Modes:

  uniform       the plain stream: every caption once per pass
  class         class-level steering as it ships (`ClassFeedback`: floor 0.5, weights from the per-class loss at
                each epoch's start; an epoch is `--every` groups)
  class-strong  the same, sharper: floor 0.1, weights from the loss squared (the mirror of the control)
  caption       caption-level steering (`CaptionFeedback`: floor 0.5, a version every `--every` groups)
  sample        sample-level selection (`UncertaintySelection`: `--pool` candidates per sample, the learner's
                entropy, its weights handed over every `--every` groups)
  sample-easy   the same selection turned round: the candidate the learner is surest of
  control       the negative control: class-strong turned round, towards the classes the learner already knows
                (floor 0.1, weights from 1 / loss squared); it must do worse than uniform, or the harness cannot see
                steering at all

What each classifier trained on is also judged: a classifier trained once on the real training digits (the judge)
labels every batch the classifier is fed, and the share it labels as the prompted class (the fidelity of the
training images) and the class mix are recorded, so a mode that steers towards the generator's failures shows it.

It writes OUT/results.json (every setting, every classifier, the costs, the summary and the two checks: does a mode
reach the uniform stream's final accuracy with at most half the generated images, does the control do worse),
OUT/table.md and OUT/steering.png (top-1 against images generated and against images trained on, one line a mode,
the seeds' range as a band).
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

from streamsynth import GeneratorConfig, StreamLoader, SyntheticStream, speed_preset  # noqa: E402
from streamsynth.commands.args import ArgumentParser, comma_list  # noqa: E402
from streamsynth.digits import embedded_captions, embedded_model  # noqa: E402
from streamsynth.digits.data import (CLASS_IDS, digit_augmentation, fit_classifier, held_out_top1,  # noqa: E402
                                     real_training_batches)
from streamsynth.stream import CaptionFeedback, ClassFeedback, EpochsInARow, UncertaintySelection  # noqa: E402

MODES = ("uniform", "class", "class-strong", "caption", "sample", "sample-easy", "control")
CLASS_LEVEL = {"class": {"floor": 0.5}, "class-strong": {"floor": 0.1, "power": 2.0},
               "control": {"floor": 0.1, "power": 2.0, "prefer": "easy"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/steering", help="folder for results.json, table.md and steering.png")
    p.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2],
                   help="one classifier per seed, mode and budget (the seed fixes the stream and the initialisation)")
    p.add_argument("--budgets", type=comma_list(int), default=[128, 256, 512, 1024, 2048],
                   help="images generated per classifier, candidates included (multiples of --batch-size)")
    p.add_argument("--modes", type=comma_list(str, MODES), default=list(MODES), help="which modes to compare")
    p.add_argument("--every", type=int, default=4,
                   help="groups between steering updates (class level: the epoch; caption and sample: a version)")
    p.add_argument("--lag", type=int, default=2, help="groups made ahead under the previous version (>= workers x 1)")
    p.add_argument("--pool", type=int, default=2, help="candidates per sample in the sample mode")
    p.add_argument("--model", default="test_resnet", help="classifier (a torchvision or timm name)")
    p.add_argument("--image-size", type=int, default=16, help="classifier input side")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, and per generation group")
    p.add_argument("--replay", type=int, default=4, help="uses of each generated image (fresh augmentation each)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--speed", default="fast", help="the generator's speed preset (streamsynth.synth.speed)")
    p.add_argument("--workers", type=int, default=2, help="synthesis worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer process")
    p.add_argument("--judge-steps", type=int, default=300, help="steps of the judge, trained on the real digits")
    p.add_argument("--replot", metavar="JSON", help="write table.md and steering.png from a results.json, train nothing")
    return p.parse_args(argv)


# ----- one classifier ------------------------------------------------------------------------------------------------

def steered_groups(args: argparse.Namespace, mode: str, budget: int) -> int:
    """How many groups the classifier trains on when `budget` images may be generated: one image per sample, except
    in the sample modes, whose steered groups (version 1 on: from group every + lag) generate `pool` per sample."""
    plain = budget // args.batch_size
    if not mode.startswith("sample"):
        return plain
    unsteered = args.every + args.lag
    return plain if plain <= unsteered else unsteered + (plain - unsteered) // args.pool


def generated_images(args: argparse.Namespace, mode: str, groups: int) -> int:
    if not mode.startswith("sample"):
        return groups * args.batch_size
    unsteered = min(groups, args.every + args.lag)
    return (unsteered + args.pool * (groups - unsteered)) * args.batch_size


def learner_feedback(args: argparse.Namespace, mode: str):
    """(feedback, steering) of a mode, as StreamLoader takes them."""
    if mode in CLASS_LEVEL:
        return ClassFeedback(len(CLASS_IDS), **CLASS_LEVEL[mode]), None
    if mode == "caption":
        return None, CaptionFeedback(args.every, args.lag)
    if mode.startswith("sample"):
        return None, UncertaintySelection(args.pool, args.every, args.lag,
                                          prefer="easy" if mode == "sample-easy" else "hard")
    return None, None


class Judged:
    """The batches a classifier trains on, passed through, each image labelled by the judge on the way: how many the
    judge takes for the class they were made as, and how many of each class there were."""

    def __init__(self, batches, judge: torch.nn.Module):
        self.batches, self.judge = batches, judge
        self.agreed, self.per_class = 0, torch.zeros(len(CLASS_IDS), dtype=torch.long)

    def __iter__(self):
        for batch in self.batches:
            with torch.no_grad():
                self.agreed += int((self.judge(batch[0]).argmax(1) == batch[1]).sum())
            self.per_class += torch.bincount(batch[1], minlength=len(CLASS_IDS))
            yield batch

    def summary(self) -> dict:
        seen = int(self.per_class.sum())
        return {"fidelity": 100.0 * self.agreed / seen if seen else 0.0,
                "class_shares": (self.per_class.double() / max(seen, 1)).tolist()}


def train_judge(args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    """A classifier of the same recipe trained on the real training digits (seed 0), and its held-out top-1."""
    judge = fit_classifier(real_training_batches(args.image_size, args.batch_size, seed=0), args.judge_steps,
                           arch=args.model, lr=args.lr, seed=0)
    return judge, held_out_top1(judge, args.image_size, "cpu", CLASS_IDS)


def run(args: argparse.Namespace, mode: str, seed: int, budget: int, judge: torch.nn.Module) -> dict:
    started = time.perf_counter()
    generator = GeneratorConfig(embedded_model(), image_size=args.image_size, devices=("cpu",),
                                batch_size=args.batch_size, **speed_preset(args.speed))
    # Class-level steering moves its weights once an epoch: an epoch is `every` groups, as the others' versions.
    epoch_size = args.every * args.batch_size * args.replay if mode in CLASS_LEVEL else None
    stream = SyntheticStream(embedded_captions(), generator, seed=seed, batch_size=args.batch_size,
                             replay=args.replay, transform=digit_augmentation(args.image_size), epoch_size=epoch_size,
                             return_sample_ids=True)
    feedback, steering = learner_feedback(args, mode)
    loader = StreamLoader(stream, args.workers, prefetch_factor=1, feedback=feedback, steering=steering)
    learner = feedback or steering
    groups = steered_groups(args, mode, budget)
    judged = Judged(EpochsInARow(loader), judge)
    model = fit_classifier(judged, groups * args.replay, arch=args.model, lr=args.lr, seed=seed,
                           watch=steering.watch if steering else None, report=learner.update if learner else None)
    top1 = held_out_top1(model, args.image_size, "cpu", CLASS_IDS)
    metrics = loader.metrics()
    workers = metrics["workers"]
    busy_s = sum(w["images"] / w["images_per_s"] for w in workers if w["images_per_s"])
    learner_s, read_s = sum(w["learner_s"] for w in workers), sum(w["handover_s"] for w in workers)
    made = sum(w["generated"] for w in workers)
    per_image_s = (busy_s - learner_s - read_s) / made if made else 0.0  # a generated image's worker seconds
    hand_overs = metrics["hand_over_s"]
    if steering is not None:
        steering.close()
    return {
        "mode": mode, "seed": seed, "budget": budget, "groups": groups, "steps": groups * args.replay,
        "trained_images": groups * args.batch_size, "generated_images": generated_images(args, mode, groups),
        "top1": top1, "wall_s": round(time.perf_counter() - started, 1), **judged.summary(),
        "cost": {  # what the workers did (prefetched groups the classifier never took included) and the trainer
            "worker_generated_images": made, "worker_s_per_generated_image": per_image_s,
            "learner_forward_s": learner_s, "hand_over_read_s": read_s,
            "hand_overs": len(hand_overs), "trainer_hand_over_s_total": sum(hand_overs),
            "trainer_hand_over_s_max": max(hand_overs, default=0.0),
            # the same costs in generated images: seconds divided by a generated image's worker seconds
            "learner_forward_image_equivalents": learner_s / per_image_s if per_image_s else 0.0,
            "hand_over_image_equivalents": (read_s + sum(hand_overs)) / per_image_s if per_image_s else 0.0,
        },
    }


# ----- the summary, the two checks, the table and the plot ----------------------------------------------------------

def summarise(results: list[dict], modes: list[str], budgets: list[int]) -> dict:
    """Per mode and budget: mean, standard deviation and every seed's top-1; then the goal and the control's check."""
    table = {}
    for mode in modes:
        for budget in budgets:
            runs = [r for r in results if r["mode"] == mode and r["budget"] == budget]
            if not runs:
                continue
            values = [r["top1"] for r in runs]
            table.setdefault(mode, {})[str(budget)] = {
                "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seeds": {str(r["seed"]): r["top1"] for r in runs}, "trained_images": runs[0]["trained_images"],
                "generated_images": runs[0]["generated_images"],
                "fidelity": statistics.mean(r["fidelity"] for r in runs),
                # how unevenly the classes were drawn: the largest class share over the smallest
                "class_share_ratio": statistics.mean(max(r["class_shares"]) / max(min(r["class_shares"]), 1e-9)
                                                     for r in runs),
                # steering's own cost beyond the images it generates, in generated images (mean over seeds), and
                # the longest the trainer was held by a hand-over (any seed)
                "steering_cost_images": statistics.mean(r["cost"]["learner_forward_image_equivalents"]
                                                        + r["cost"]["hand_over_image_equivalents"] for r in runs),
                "trainer_hold_ms_max": 1000 * max(r["cost"]["trainer_hand_over_s_max"] for r in runs)}
    summary = {"top1": table}
    if "uniform" not in table:
        return summary
    final_budget = str(max(int(b) for b in table["uniform"]))
    final = table["uniform"][final_budget]["mean"]
    reached = {mode: min((int(b) for b, row in rows.items() if row["mean"] >= final), default=None)
               for mode, rows in table.items()}
    summary["goal"] = {
        "uniform_final_budget": int(final_budget), "uniform_final_top1": final,
        "budget_reaching_uniform_final": reached,
        "met_by": [m for m, b in reached.items() if m not in ("uniform", "control") and b is not None
                   and b <= int(final_budget) // 2],
    }
    summary["minus_uniform"] = {mode: {b: statistics.mean(d) for b, d in paired_differences(summary, mode).items()}
                                for mode in table if mode != "uniform"}
    if "control" in table:
        differences = summary["minus_uniform"]["control"]
        summary["control"] = {"mean_minus_uniform": statistics.mean(differences.values()) if differences else None,
                              "worse": bool(differences) and statistics.mean(differences.values()) < 0}
    return summary


def table_text(summary: dict, modes: list[str], budgets: list[int]) -> str:
    """Top-1 (mean ± std over seeds), then what the classifiers were fed: judged fidelity and the class mix."""
    rows, lines = summary["top1"], []
    header = ["| mode | " + " | ".join(f"{b:,} generated" for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for title, cell in (
            ("top-1 on held-out real digits, %, mean ± std over seeds",
             lambda r, b: f"{r['mean']:.1f} ± {r['std']:.1f}"
             + (f" ({r['trained_images']:,} trained)" if r["trained_images"] != b else "")),
            ("training images the judge takes for their class, % (mean over seeds)",
             lambda r, b: f"{r['fidelity']:.1f}"),
            ("largest class share / smallest, among the training images (mean over seeds)",
             lambda r, b: f"{r['class_share_ratio']:.1f}"),
            ("steering's cost beyond the images generated, in generated images (the learner's forward passes in the "
             "workers, the hand-overs; mean over seeds) / the longest a hand-over held the trainer, ms",
             lambda r, b: f"{r.get('steering_cost_images', 0):.1f} / {r.get('trainer_hold_ms_max', 0):.0f}")):
        lines += [f"{title}:", "", *header]
        for mode in modes:
            found = [rows.get(mode, {}).get(str(b)) for b in budgets]
            lines.append(f"| {mode} | " + " | ".join("–" if r is None else cell(r, b) for r, b in zip(found, budgets))
                         + " |")
        lines.append("")
    lines += ["top-1 minus the uniform stream's with the same seed and budget, points: mean [lowest, highest seed]:", "",
              *header]
    for mode in modes:
        differences = paired_differences(summary, mode) if mode != "uniform" else {}
        lines.append(f"| {mode} | " + " | ".join(
            f"{statistics.mean(d):+.1f} [{min(d):+.1f}, {max(d):+.1f}]" if (d := differences.get(str(b))) else "–"
            for b in budgets) + " |")
    return "\n".join(lines)


def paired_differences(summary: dict, mode: str) -> dict[str, list[float]]:
    """Per budget, each seed's top-1 of `mode` minus the uniform stream's with the same seed (which fixes the first
    groups, before steering starts, and the classifier's initialisation): differences without the seeds' spread."""
    rows, uniform = summary["top1"].get(mode, {}), summary["top1"].get("uniform", {})
    return {b: [row["seeds"][s] - uniform[b]["seeds"][s] for s in row["seeds"] if s in uniform[b]["seeds"]]
            for b, row in rows.items() if b in uniform}


def plot(summary: dict, modes: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.4))
    axes = fig.subplots(1, 3)
    for mode in modes:
        rows = summary["top1"].get(mode)
        if not rows:
            continue
        budgets = sorted(rows, key=int)
        low = [min(rows[b]["seeds"].values()) for b in budgets]
        high = [max(rows[b]["seeds"].values()) for b in budgets]
        mean = [rows[b]["mean"] for b in budgets]
        style = {"linestyle": "--"} if mode in ("control", "sample-easy") else {}
        for axis, x_key in zip(axes, ("generated_images", "trained_images")):
            x = [rows[b][x_key] for b in budgets]
            line, = axis.plot(x, mean, marker="o", label=mode, **style)
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.12)
        differences = paired_differences(summary, mode)
        x = [rows[b]["generated_images"] for b in budgets if b in differences]
        axes[2].plot(x, [sum(differences[b]) / len(differences[b]) for b in budgets if b in differences], marker="o",
                     color=line.get_color(), **style)
        axes[2].fill_between(x, [min(differences[b]) for b in budgets if b in differences],
                             [max(differences[b]) for b in budgets if b in differences], color=line.get_color(),
                             alpha=0.12)
    if "goal" in summary:
        for axis in axes[:2]:
            axis.axhline(summary["goal"]["uniform_final_top1"], color="grey", linewidth=0.8, linestyle=":")
    titles = ("(a) top-1 against images generated", "(b) top-1 against images trained on",
              "(c) minus uniform, same seed and budget")
    labels = ("images generated (candidates included)", "images trained on", "images generated")
    for axis, title, label in zip(axes, titles, labels):
        axis.set_xscale("log", base=2)
        axis.set(xlabel=label, title=title)
        axis.grid(alpha=0.3)
    for axis in axes[:2]:
        axis.set_ylim(50, 100)  # below: the first budget, before any steering, where every mode is the plain stream
        axis.set_ylabel("top-1 %, held-out real digits")
    axes[2].axhline(0, color="grey", linewidth=0.8)
    axes[2].set_ylabel("top-1 points")
    fig.text(0.5, 0.01, "mean over seeds; bands: the seeds' range", ha="center", fontsize=9)
    axes[1].legend(loc="lower right")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=90)


def write_outputs(out: Path, record: dict) -> None:
    """results.json after every classifier (an hour's run interrupted keeps what it measured); table and plot."""
    modes, budgets = record["settings"]["modes"], record["settings"]["budgets"]
    record["summary"] = summarise(record["results"], modes, budgets)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "table.md").write_text(table_text(record["summary"], modes, budgets) + "\n")
    plot(record["summary"], modes, out / "steering.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        write_outputs(out, json.loads(Path(args.replot).read_text()))
        print((out / "table.md").read_text())
        return
    torch.set_num_threads(args.threads)
    record = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "replot")},
              "model": str(embedded_model()), "results": [],
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "load_average_at_start": os.getloadavg()}}
    started = time.perf_counter()
    judge, record["judge_top1"] = train_judge(args)
    judge.eval()
    for seed in args.seeds:  # seeds outermost: an interrupted run still has every mode for the seeds it finished
        for budget in args.budgets:
            for mode in args.modes:
                result = run(args, mode, seed, budget, judge)
                record["results"].append(result)
                record["wall_s"] = round(time.perf_counter() - started, 1)
                record["machine"]["load_average_at_end"] = os.getloadavg()
                print(f"{mode:>12}  seed {seed}  {budget:5d} generated ({result['trained_images']:5d} trained): "
                      f"top-1 {result['top1']:.1f}%, judged faithful {result['fidelity']:.1f}%  "
                      f"({result['wall_s']:.0f} s)", flush=True)
                write_outputs(out, record)
    print((out / "table.md").read_text())
    print(json.dumps({k: v for k, v in record["summary"].items() if k != "top1"}, indent=1))


if __name__ == "__main__":
    main()
