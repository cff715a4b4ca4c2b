"""`streamsynth evaluate | audit-privacy`: argument parsing only; each command imports its module when it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import (EVAL_SUITES, add_device, add_eval_suites, eval_suites, nonnegative_int, positive_float, positive_int,
                   resolve_device, seed)

# The files each command writes inside its --out folder.
EVAL_FILES = ("eval.json", "eval.csv")
AUDIT_FILE = "audit.json"
SHADOW_MODELS = 8  # audit-privacy's default: 4 IN and 4 OUT per audited image online


def _add_loader_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=positive_int,
                        help="side of the centre crop, in pixels (default: the checkpoint's image_size, else 224)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=256, help="images per batch")
    parser.add_argument("-j", "--workers", type=nonnegative_int, default=4,
                        help="DataLoader worker processes decoding the images (fewer, with a warning, where /dev/shm is "
                        "too small for them)")
    add_device(parser, "the classifier's device")


def add_commands(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 of a trained classifier on ImageNet val and its OOD sets",
        description="Score a checkpoint written by train.py on real ImageFolder test sets. Class folders of classes "
        "the classifier was not trained on are skipped and counted.",
    )
    evaluate.add_argument("checkpoint", help="a classifier checkpoint (see streamsynth.classifier.models)")
    add_eval_suites(evaluate)
    evaluate.add_argument("--suite", action="append", metavar="NAME=DIR",
                          help="any other ImageFolder, scored under NAME (repeatable)")
    evaluate.add_argument("--out", default=".", metavar="DIR",
                          help=f"folder for the results: writes OUT/{EVAL_FILES[0]} (everything) and OUT/{EVAL_FILES[1]} "
                          "(one row per suite)")
    _add_loader_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    audit = subparsers.add_parser(
        "audit-privacy",
        help="membership inference: can the classifier's confidence tell its training images from others?",
        description="Membership inference on a trained classifier: MEMBERS are images it was trained on, "
        "NON-MEMBERS images it never saw, both ImageFolders named by the checkpoint's class ids. The method paper's "
        "confidence-threshold attack always runs. About 50% balanced accuracy means no measurable leakage. With "
        "--population, LiRA and RMIA run too, with shadow models trained by the checkpoint's recipe, and report the "
        "TPR at 0.1% and 1% FPR and the ROC AUC. See docs/privacy.md.",
    )
    audit.add_argument("checkpoint", help="a classifier checkpoint (see streamsynth.classifier.models)")
    audit.add_argument("--members", required=True, metavar="DIR", help="ImageFolder of training images")
    audit.add_argument("--non-members", required=True, metavar="DIR", help="ImageFolder of images not trained on")
    audit.add_argument("--population", metavar="DIR",
                       help="ImageFolder of real images from the classifier's distribution that it was not trained "
                       "on: with it, LiRA and RMIA also run, calibrated by shadow models trained on it (without it, "
                       "only the threshold attack)")
    audit.add_argument("--shadow-models", type=positive_int, default=SHADOW_MODELS, metavar="N",
                       help="shadow models to train with --population (an even number)")
    audit.add_argument("--shadow-mode", choices=["online", "offline"], default="online",
                       help="online: the shadow models train on halves of the population and the audited images "
                       "(each audited image in half of them); offline: on halves of the population only")
    audit.add_argument("--shadow-steps", type=positive_int, metavar="N",
                       help="optimizer steps of each shadow model (default: the checkpoint's recorded steps)")
    audit.add_argument("--shadow-batch-size", type=positive_int, metavar="N",
                       help="images per shadow training step (default: the checkpoint's recorded batch size)")
    audit.add_argument("--shadow-lr", type=positive_float, metavar="LR",
                       help="peak learning rate of the shadow models for batch 256, scaled linearly as train.py's "
                       "--lr-base (default: the checkpoint's recorded rate)")
    audit.add_argument("--seed", type=seed, default=0,
                       help="seeds which images each shadow model trains on, and its init")
    audit.add_argument("--out", metavar="DIR", help=f"also write the result to OUT/{AUDIT_FILE}")
    _add_loader_options(audit)
    audit.set_defaults(func=_audit_privacy)


def _checkpoint_and_transform(args: argparse.Namespace):
    from ..classifier.models import DEFAULT_IMAGE_SIZE, load_classifier
    from ..classifier.evaluate import eval_transform

    device = resolve_device(args.device)
    model, checkpoint = load_classifier(args.checkpoint, device)
    image_size = args.image_size or checkpoint.get("image_size", DEFAULT_IMAGE_SIZE)
    return model, checkpoint, eval_transform(image_size), device


def _evaluate(args: argparse.Namespace) -> int:
    from ..classifier.evaluate import check_eval_folder, evaluate_suites, format_results, write_results

    suites = eval_suites(args)
    for item in args.suite or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--suite {item!r}: expected NAME=DIR")
        suites[name] = folder
    if not suites:
        raise ValueError(f"no test set given: pass at least one of {['--' + s for s in EVAL_SUITES]} or --suite NAME=DIR")
    model, checkpoint, transform, device = _checkpoint_and_transform(args)
    for suite, folder in suites.items():  # each suite scores something: a wrong folder is an error, not a "-" row
        check_eval_folder(folder, suite, checkpoint["class_ids"])
    results = evaluate_suites(model, suites, checkpoint["class_ids"], transform, device, args.batch_size, args.workers)
    print(format_results(results))
    json_path, csv_path = write_results(results, Path(args.out) / Path(EVAL_FILES[0]).stem,
                                        metadata={"checkpoint": str(args.checkpoint)})
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _audit_privacy(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..classifier.attacks import sklearn_metrics
    from ..classifier.privacy import audit_membership, audit_with_shadow_models
    from ..classifier.recipe import recipe_from_checkpoint
    from ..safeio import atomic_write_text

    sklearn_metrics()  # a missing extra is one line now, not after the model is loaded
    shadow_flags = [flag for flag, value in [("--shadow-models", args.shadow_models != SHADOW_MODELS),
                                             ("--shadow-mode", args.shadow_mode != "online"),
                                             ("--shadow-steps", args.shadow_steps), ("--shadow-batch-size",
                                             args.shadow_batch_size), ("--shadow-lr", args.shadow_lr)] if value]
    if shadow_flags and not args.population:
        raise ValueError(f"{', '.join(shadow_flags)} set the shadow models of LiRA and RMIA, which need "
                         "--population DIR (real images to train them on)")
    model, checkpoint, transform, device = _checkpoint_and_transform(args)
    audit = audit_membership(
        model, args.members, args.non_members, checkpoint["class_ids"], transform, device, args.batch_size, args.workers
    )
    print(audit.report())
    result = {**asdict(audit), "chance_mean": audit.chance_mean, "chance_95": audit.chance_95,
              "checkpoint": str(args.checkpoint), "members_folder": args.members,
              "non_members_folder": args.non_members}
    if args.population:
        recipe = recipe_from_checkpoint(checkpoint, str(args.checkpoint), args.shadow_steps, args.shadow_batch_size,
                                        args.shadow_lr, args.image_size)
        print(f"training {args.shadow_models} shadow models ({args.shadow_mode}): {recipe.describe()}", flush=True)
        reference = audit_with_shadow_models(
            model, recipe, args.members, args.non_members, args.population, checkpoint["class_ids"],
            shadow_models=args.shadow_models, online=args.shadow_mode == "online", seed=args.seed, device=device,
            batch_size=args.batch_size, workers=args.workers, progress=lambda line: print(line, flush=True),
        )
        print(reference.report())
        result["reference_attacks"] = {**asdict(reference), "auc_chance_95": reference.auc_chance_95,
                                       "population_folder": args.population, "seed": args.seed}
    if args.out:
        path = Path(args.out) / AUDIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n", what="audit result")
        print(f"wrote {path}")
    return 0
