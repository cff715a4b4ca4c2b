"""`streamsynth evaluate | audit-privacy | preview`: argument parsing only; each command imports its module when it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import (EVAL_SUITES, add_device, add_eval_suites, comma_list, eval_suites, list_metavar, nonnegative_int,
                   positive_int, resolve_device)

# The files each command writes inside its --out folder.
EVAL_FILES = ("eval.json", "eval.csv")
AUDIT_FILE = "audit.json"
PREVIEW_FILE = "preview.png"


def _add_loader_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=positive_int,
                        help="side of the centre crop, in pixels (default: the checkpoint's image_size, else 224)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per batch")
    parser.add_argument("--workers", type=nonnegative_int, default=4,
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
        description="Confidence-threshold membership inference on a trained classifier: MEMBERS are images it was "
        "trained on, NON-MEMBERS images it never saw, both ImageFolders named by the checkpoint's class ids. About "
        "50% balanced accuracy means no measurable leakage. See docs/privacy.md.",
    )
    audit.add_argument("checkpoint", help="a classifier checkpoint (see streamsynth.classifier.models)")
    audit.add_argument("--members", required=True, metavar="DIR", help="ImageFolder of training images")
    audit.add_argument("--non-members", required=True, metavar="DIR", help="ImageFolder of images not trained on")
    audit.add_argument("--out", metavar="DIR", help=f"also write the result to OUT/{AUDIT_FILE}")
    _add_loader_options(audit)
    audit.set_defaults(func=_audit_privacy)

    preview = subparsers.add_parser(
        "preview",
        help="a PNG grid of synthetic samples per class, labelled with their prompts",
        description="Draw the first samples of chosen classes exactly as the training stream would make them "
        "(same sampler, prompts, seeds and generator). Without --sd-model/--captions it uses the embedded default, "
        "a tiny generator trained on 8x8 handwritten digits (not Stable Diffusion).",
    )
    preview.add_argument("--sd-model",
                         help="Stable Diffusion hub id or diffusers folder (default: the embedded digits model)")
    preview.add_argument("--captions", help="caption store (default: the embedded digits captions)")
    preview.add_argument("--prompt", default="cip",
                         help="prompt strategy: cip, basic, name, clip, or a template with {name} and {caption}")
    preview.add_argument("--classes", type=comma_list(), metavar=list_metavar("CLASS"),
                         help="comma-separated class ids, names or indices (default: the first 10)")
    preview.add_argument("--samples", type=int, default=4, help="samples per class (columns)")
    preview.add_argument("--seed", type=int, default=0, help="the run seed, as given to training")
    preview.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps")
    preview.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance scale")
    preview.add_argument("--image-size", type=int, default=224, help="side of the images, as handed to training")
    add_device(preview, "the generator's device")
    preview.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 on CUDA, else fp32")
    preview.add_argument("--out", default=".", metavar="DIR", help=f"folder for the grid: writes OUT/{PREVIEW_FILE}")
    preview.set_defaults(func=_preview)


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

    from ..classifier.privacy import audit_membership
    from ..safeio import atomic_write_text

    model, checkpoint, transform, device = _checkpoint_and_transform(args)
    audit = audit_membership(
        model, args.members, args.non_members, checkpoint["class_ids"], transform, device, args.batch_size, args.workers
    )
    print(audit.report())
    if args.out:
        result = {**asdict(audit), "chance_mean": audit.chance_mean, "chance_95": audit.chance_95,
                  "checkpoint": str(args.checkpoint), "members_folder": args.members,
                  "non_members_folder": args.non_members}
        path = Path(args.out) / AUDIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n", what="audit result")
        print(f"wrote {path}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from ..digits.embedded import EMBEDDED_DEFAULT_NOTICE
    from .preview import preview_grid
    from ..synth.tiny import RANDOM_WEIGHTS_NOTICE

    preview = preview_grid(
        captions=args.captions, model=args.sd_model, prompt=args.prompt, classes=args.classes,
        samples_per_class=args.samples, seed=args.seed, steps=args.num_inference_steps, guidance=args.guidance_scale,
        image_size=args.image_size, device=resolve_device(args.device), dtype=args.dtype,
        out=Path(args.out) / PREVIEW_FILE,
    )
    print(f"wrote {preview.path}: {len(preview.specs)} classes x {len(preview.specs[0])} samples from {preview.model}")
    if preview.random_weights:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTICE}")
    elif preview.digits_model:
        print(f"NOTE: {EMBEDDED_DEFAULT_NOTICE}")
    return 0
