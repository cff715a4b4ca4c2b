"""The privacy audit on the embedded default: real-trained against synthetic-trained, and the generator's memorisation
(a benchmark, not a test).

    python benchmarks/privacy_digits.py --out runs/privacy-digits          # the table of docs/privacy.md; see --help
    python benchmarks/privacy_digits.py --seeds 0 --steps 40 --shadow-models 4 --memorisation-samples 64 --out runs/dry

Every seed draws two disjoint sets of 500 digits from the training part (the 1,297 digits the generator learned
from): A, the audited members, and B. Classifiers of one architecture and one recipe (those of
benchmarks/digits_cip.py) are audited:

  real:       trained on the whole training part;                      members A, non-members the 500 held-out digits
  synthetic:  trained on the embedded generator's stream alone         members A, non-members the held-out digits
              (Caption-in-Prompt prompts, default guidance);
  control:    trained on the training part without A: A and the held-out digits are both unseen, so whatever an
              attack finds is chance, or a difference between the training part and the held-out digits, which
              come from other writers (the UCI digits are ordered by writer);
  real, random split: trained on the training part without B;          members A, non-members B: a clean audit of a
              real-data classifier, members and non-members drawn alike.

One set of shadow models per seed, trained by the same recipe on real digits, serves all four (online: each on a
random half of all 1,797 digits, every digit in half of them; the images of the pool that an audit does not audit
are its RMIA population). Each attack (the confidence threshold, LiRA, RMIA: streamsynth.classifier.privacy) gives
the TPR at FPR <= 1/500 (0.1% is below what 500 non-members resolve), the TPR at 1% FPR and the ROC AUC.

Then the memorisation check of the shipped generator (streamsynth.digits.memorisation): synthetic digits from the
stream (seed 0) against the training and the held-out digits, in pixel space, and a picture of the nearest pairs.
Writes OUT/results.json (everything, with the ROC curves, settings and timings), OUT/table.md and
OUT/near-copies.png.
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

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.digits_cip import synthetic_batches  # noqa: E402
from streamsynth.classifier.attacks import auc_chance_95  # noqa: E402
from streamsynth.classifier.privacy import membership_attacks, threshold_attack  # noqa: E402
from streamsynth.classifier.shadows import loader_signals, shadow_memberships, train_shadow_models  # noqa: E402
from streamsynth.commands.args import ArgumentParser, comma_list  # noqa: E402
from streamsynth.digits import embedded_model  # noqa: E402
from streamsynth.digits.data import (DigitImages, digits_recipe, fit_classifier, held_out_indices,  # noqa: E402
                                     held_out_top1, real_training_batches, train_indices)
from streamsynth.digits.memorisation import (digit_features, digits_memorisation_check,  # noqa: E402
                                             real_digit_features, synthetic_digits)
from streamsynth.seeding import derive_seed  # noqa: E402

# The audited classifiers: what each trains on and which digits are its audited non-members (see the docstring).
TARGETS = ("real", "synthetic", "control", "real, random split")
# The FPRs each attack's TPR is recorded at: the table's two, and enough more to draw its ROC curve on log axes.
ROC_FPRS = (0.001, 0.004, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
TABLE_FPRS = (0.001, 0.01)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/privacy-digits", help="folder for results.json, table.md, near-copies.png")
    p.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2],
                   help="one audit per seed: its members, shadow models and classifiers")
    p.add_argument("--members", type=int, default=500, help="audited members drawn from the training part")
    p.add_argument("--shadow-models", type=int, default=8, help="shadow models per seed (even)")
    p.add_argument("--shadow-mode", choices=["online", "offline"], default="online",
                   help="online: shadow models train on halves of all digits; offline: of the population only")
    p.add_argument("--model", default="test_resnet", help="classifier (a torchvision or timm name)")
    p.add_argument("--image-size", type=int, default=16, help="classifier input side")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every classifier")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--replay", type=int, default=8, help="uses of each synthetic image (fresh augmentation each)")
    p.add_argument("--num-inference-steps", type=int, default=20, help="denoising steps of the stream")
    p.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance of the stream")
    p.add_argument("--workers", type=int, default=2, help="synthesis worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--memorisation-samples", type=int, default=1000,
                   help="synthetic digits of the memorisation check (0: no check)")
    return p.parse_args(argv)


def audit_seed(args: argparse.Namespace, seed: int) -> list[dict]:
    """The classifiers of one seed, audited against one set of shadow models."""
    rng = np.random.default_rng(derive_seed(seed, "audited members"))
    training = np.arange(train_indices().start, train_indices().stop)
    drawn = rng.permutation(training)
    members, training_non_members = np.sort(drawn[:args.members]), np.sort(drawn[args.members:2 * args.members])
    held_out = np.arange(held_out_indices().start, held_out_indices().stop)
    pool = np.arange(held_out[-1] + 1)  # every digit; pool position = digit index
    online = args.shadow_mode == "online"
    # Offline, no audited digit may be in a shadow model: they train on halves of the rest of the training part.
    memberships = shadow_memberships(len(pool), args.shadow_models, np.isin(pool, np.concatenate(
        [members, training_non_members, held_out])), online, seed)
    recipe = digits_recipe(args.steps, args.model, lr=args.lr, image_size=args.image_size, batch_size=args.batch_size)
    pool_loader = DataLoader(DigitImages(pool, args.image_size), batch_size=500)

    def signals_of(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return loader_signals(model, pool_loader, "cpu")

    shadows = train_shadow_models(
        recipe, memberships,
        lambda indices, shadow_seed: real_training_batches(args.image_size, args.batch_size, shadow_seed,
                                                           pool[indices]),
        signals_of, seed=seed, progress=lambda line: print(f"  seed {seed}: {line}", flush=True))
    results = []
    for target in TARGETS:
        started = time.perf_counter()
        non_members = training_non_members if target == "real, random split" else held_out
        if target == "synthetic":
            batches = synthetic_batches(args, {"prompt": "cip", "guidance": args.guidance_scale}, seed)
        else:  # "real" is the real-data classifier of benchmarks/digits_cip.py, seed for seed
            left_out = {"real": [], "control": members, "real, random split": training_non_members}[target]
            batches = real_training_batches(args.image_size, args.batch_size, seed=seed,
                                            indices=None if target == "real" else np.setdiff1d(training, left_out))
        model = fit_classifier(batches, args.steps, arch=args.model, lr=args.lr, seed=seed)
        log_p, logit = signals_of(model)
        audited = np.isin(pool, np.concatenate([members, non_members]))
        is_member = np.isin(pool[audited], members)
        attacks = membership_attacks(log_p, logit, shadows.log_confidence, shadows.logit_confidence, memberships,
                                     audited, is_member, online, ROC_FPRS)
        balanced, _, _ = threshold_attack(log_p[members], log_p[non_members])
        results.append({
            "seed": seed, "training_data": target,
            "non_members": "training part" if target.endswith("split") else "held out",
            "audited": [len(members), len(non_members)], "top1": held_out_top1(model, args.image_size, "cpu"),
            "balanced_accuracy": balanced,
            "attacks": [{"attack": a.attack, "auc": a.auc, "points": [vars(p) for p in a.points]} for a in attacks],
            "classifier_wall_s": round(time.perf_counter() - started, 1),
            "shadow_models": args.shadow_models, "shadow_wall_s": round(shadows.seconds, 1),
        })
        print(f"  seed {seed} {target}: top-1 {results[-1]['top1']:.1f}%, balanced accuracy {100 * balanced:.1f}%; "
              + "; ".join(f"{a.attack} TPR at {low.label()} {100 * low.tpr:.1f}%, AUC {100 * a.auc:.1f}%"
                          for a, low in ((a, a.point(TABLE_FPRS[0])) for a in attacks)), flush=True)
    return results


def _summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(results: list[dict]) -> str:
    """Per training data and attack: TPR at the two FPRs of `TABLE_FPRS` and AUC, in percent, mean ± std and every
    seed."""
    def point(attack: dict, fpr: float) -> dict:
        return next(p for p in attack["points"] if p["fpr_target"] == fpr)

    first = results[0]["attacks"][0]
    labels = [f"FPR <= 1/{round(1 / p['fpr_bound'])}" if p["fpr_bound"] > p["fpr_target"]
              else f"FPR <= {100 * p['fpr_target']:g}%" for p in (point(first, fpr) for fpr in TABLE_FPRS)]
    lines = [f"| training data | non-members | attack | TPR at {labels[0]} | TPR at {labels[1]} | ROC AUC | per seed "
             f"(TPR at {labels[0]} / AUC) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for target in TARGETS:
        runs = [r for r in results if r["training_data"] == target]
        for i, attack in enumerate(runs[0]["attacks"]):
            low, one = ([100 * point(r["attacks"][i], fpr)["tpr"] for r in runs] for fpr in TABLE_FPRS)
            auc = [100 * r["attacks"][i]["auc"] for r in runs]
            lines.append(f"| {target} | {runs[0]['non_members']} | {attack['attack']} | {_summary(low)} % | "
                         f"{_summary(one)} % | {_summary(auc)} % | "
                         f"{', '.join(f'{a:.1f} / {b:.1f}' for a, b in zip(low, auc))} |")
    low, one = (point(first, fpr) for fpr in TABLE_FPRS)  # the sizes of the first audit (all alike by default)
    lines.append(f"| | | chance (no signal): mean, 95% below | {100 * low['chance_mean']:.1f}, "
                 f"{100 * low['chance_95']:.1f} % | {100 * one['chance_mean']:.1f}, {100 * one['chance_95']:.1f} % | "
                 f"50, {100 * auc_chance_95(*results[0]['audited']):.1f} % | |")
    lines += ["", "| training data | held-out top-1 | best balanced accuracy of the threshold (the paper's figure) |",
              "| --- | --- | --- |"]
    for target in TARGETS:
        runs = [r for r in results if r["training_data"] == target]
        lines.append(f"| {target} | {_summary([r['top1'] for r in runs])} % | "
                     f"{_summary([100 * r['balanced_accuracy'] for r in runs])} % |")
    return "\n".join(lines)


def split_shift(seed: int = 0) -> dict:
    """How far apart the training part and the held-out digits are as distributions: the cross-validated ROC AUC of
    a logistic regression on pixels and class telling one from the other, beside the same with the two parts'
    labels shuffled (no difference: about 50%), and for two contiguous blocks of the training part."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from streamsynth.digits.data import digit_pixels, digit_targets

    features = np.concatenate([digit_pixels().reshape(len(digit_targets()), -1), np.eye(10)[digit_targets()]], axis=1)
    held_out = np.arange(len(features)) >= held_out_indices().start
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    first_block = train_indices().stop - len(held_out_indices())

    def auc(rows: np.ndarray, labels: np.ndarray) -> float:
        scores = cross_val_predict(LogisticRegression(C=0.3, max_iter=3000), features[rows], labels, cv=folds,
                                   method="predict_proba")[:, 1]
        return float(roc_auc_score(labels, scores))

    everything, training = np.arange(len(features)), np.arange(train_indices().stop)
    return {"training part vs held out": auc(everything, held_out),
            "the same, parts shuffled": auc(everything, np.random.default_rng(seed).permutation(held_out)),
            f"training part, digits 0..{first_block - 1} vs the rest": auc(training, training >= first_block)}


def nearest_pairs_picture(synthetic: torch.Tensor, path: Path, pairs: int = 8, scale: int = 8) -> None:
    """Top row: the `pairs` synthetic digits nearest a training digit, each above that training digit; bottom two rows:
    the same for the held-out real digits. Ink is dark."""
    from PIL import Image

    from streamsynth.classifier.memorisation import nearest_neighbours

    training = real_digit_features(train_indices())
    rows = []
    for queries in (digit_features(synthetic), real_digit_features(held_out_indices())):
        distance, index = nearest_neighbours(queries, training)
        order = distance.argsort()[:pairs]
        for images in (queries[order], training[index[order]]):
            tiles = [np.pad(1 - image.view(8, 8).numpy(), 1, constant_values=1) for image in images]
            rows.append(np.concatenate(tiles, axis=1))
        rows.append(np.ones((4, rows[-1].shape[1])))
    grid = np.concatenate(rows[:-1], axis=0)
    picture = Image.fromarray((255 * grid).round().astype(np.uint8))
    picture.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results: list[dict] = []
    memorisation = None
    shift = split_shift()
    print("the training and held-out parts as distributions (cross-validated AUC of a linear classifier): "
          + ", ".join(f"{name} {100 * value:.1f}%" for name, value in shift.items()), flush=True)

    def write() -> None:  # after every seed: an interrupted run keeps what it measured
        (out / "results.json").write_text(json.dumps({
            "settings": settings, "model": str(embedded_model()), "split_shift": shift, "results": results,
            "memorisation": memorisation,
            "wall_s": round(time.perf_counter() - started, 1),
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "torch": torch.__version__, "load_average_at_start": load_at_start,
                        "load_average_at_end": os.getloadavg()},
        }, indent=1) + "\n")

    for seed in args.seeds:
        results += audit_seed(args, seed)
        write()
    text = (table(results) + "\n\nThe training part and the held-out digits as distributions, cross-validated ROC "
            "AUC of a linear classifier telling them apart (50%: alike): "
            + ", ".join(f"{name} {100 * value:.1f}%" for name, value in shift.items()))
    if args.memorisation_samples:
        sampling = time.perf_counter()
        synthetic = synthetic_digits(args.memorisation_samples, seed=0, num_inference_steps=args.num_inference_steps,
                                     guidance_scale=args.guidance_scale)
        check = digits_memorisation_check(synthetic)
        memorisation = {**vars(check), "near_copy_fraction": check.near_copy_fraction,
                        "wall_s": round(time.perf_counter() - sampling, 1)}
        nearest_pairs_picture(synthetic, out / "near-copies.png")
        text += "\n\n" + check.report()
    write()
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}" + (f" and {out / 'near-copies.png'}"
                                                                if args.memorisation_samples else ""))


if __name__ == "__main__":
    main()
