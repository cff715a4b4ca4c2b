"""`streamsynth evaluate | audit-privacy | preview`: argument parsing only; each command imports its module when it runs."""

from __future__ import annotations

import argparse
import json

# Suite name → its command-line option; the names are those evaluate.SUITES and SUBSET_SUITES use.
SUITE_OPTIONS = {
    "imagenet-val": "ImageNet val, one folder per WordNet id",
    "imagenet-v2": "ImageNet-V2 (folders 0..999 or WordNet ids)",
    "imagenet-sketch": "ImageNet-Sketch",
    "imagenet-r": "ImageNet-R, scored on its 200 classes",
    "imagenet-a": "ImageNet-A, scored on its 200 classes",
}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_loader_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, help="crop size (default: the checkpoint's image_size, else 224)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    parser.add_argument("--device", help="default: cuda if available, else cpu")


def add_commands(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 of a trained classifier on ImageNet val and its OOD sets",
        description="Score a checkpoint written by train.py on real ImageFolder test sets. Class folders of classes "
        "the classifier was not trained on are skipped and counted.",
    )
    evaluate.add_argument("checkpoint", help="a classifier checkpoint (see streamsynth.classifier)")
    for suite, help_text in SUITE_OPTIONS.items():
        evaluate.add_argument(f"--{suite}", metavar="DIR", help=help_text)
    evaluate.add_argument("--suite", action="append", default=[], metavar="NAME=DIR", help="any other ImageFolder")
    evaluate.add_argument("--out", default="eval", help="results file stem: writes OUT.json and OUT.csv")
    _add_loader_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    audit = subparsers.add_parser(
        "audit-privacy",
        help="membership inference: can the classifier's confidence tell its training images from others?",
        description="Confidence-threshold membership inference on a trained classifier: MEMBERS are images it was "
        "trained on, NON-MEMBERS images it never saw, both ImageFolders named by the checkpoint's class ids. About "
        "50%% balanced accuracy means no measurable leakage. See docs/privacy.md.",
    )
    audit.add_argument("checkpoint", help="a classifier checkpoint (see streamsynth.classifier)")
    audit.add_argument("--members", required=True, metavar="DIR", help="ImageFolder of training images")
    audit.add_argument("--non-members", required=True, metavar="DIR", help="ImageFolder of images not trained on")
    audit.add_argument("--out", metavar="JSON", help="also write the result to this JSON file")
    _add_loader_options(audit)
    audit.set_defaults(func=_audit_privacy)

    preview = subparsers.add_parser(
        "preview",
        help="a PNG grid of synthetic samples per class, labelled with their prompts",
        description="Draw the first samples of chosen classes exactly as the training stream would make them "
        "(same sampler, prompts, seeds and generator). Without --sd-model/--captions it uses the embedded default, "
        "a tiny generator trained on 8x8 handwritten digits (not Stable Diffusion).",
    )
    preview.add_argument("--sd-model", help="Stable Diffusion hub id or diffusers folder (default: the embedded digits model)")
    preview.add_argument("--captions", help="caption store (default: the embedded digits captions)")
    preview.add_argument("--prompt", default="cip", help="prompt strategy: cip, basic, name, clip or a template")
    preview.add_argument("--classes", nargs="+", metavar="CLASS", help="class ids, names or indices (default: first 10)")
    preview.add_argument("--samples", type=int, default=4, help="samples per class (columns)")
    preview.add_argument("--seed", type=int, default=0, help="the run seed, as given to training")
    preview.add_argument("--steps", type=int, default=50, help="denoising steps")
    preview.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    preview.add_argument("--image-size", type=int, default=224, help="side of the images, as handed to training")
    preview.add_argument("--device", help="default: cuda if available, else cpu")
    preview.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 on CUDA, else fp32")
    preview.add_argument("--out", default="preview.png", help="the PNG to write")
    preview.set_defaults(func=_preview)


def _checkpoint_and_transform(args: argparse.Namespace):
    from .classifier import DEFAULT_IMAGE_SIZE, load_classifier
    from .evaluate import eval_transform

    device = args.device or _default_device()
    model, checkpoint = load_classifier(args.checkpoint, device)
    image_size = args.image_size or checkpoint.get("image_size", DEFAULT_IMAGE_SIZE)
    return model, checkpoint, eval_transform(image_size), device


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import check_eval_folder, evaluate_suites, format_results, write_results

    suites = {suite: getattr(args, suite.replace("-", "_")) for suite in SUITE_OPTIONS}
    suites = {suite: folder for suite, folder in suites.items() if folder}
    for item in args.suite:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--suite {item!r}: expected NAME=DIR")
        suites[name] = folder
    if not suites:
        raise ValueError(f"no test set given: pass at least one of {['--' + s for s in SUITE_OPTIONS]} or --suite NAME=DIR")
    model, checkpoint, transform, device = _checkpoint_and_transform(args)
    for suite, folder in suites.items():  # each suite scores something: a wrong folder is an error, not a "-" row
        check_eval_folder(folder, suite, checkpoint["class_ids"])
    results = evaluate_suites(model, suites, checkpoint["class_ids"], transform, device, args.batch_size, args.workers)
    print(format_results(results))
    json_path, csv_path = write_results(results, args.out, metadata={"checkpoint": str(args.checkpoint)})
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _audit_privacy(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .privacy import audit_membership
    from .safeio import atomic_write_text

    model, checkpoint, transform, device = _checkpoint_and_transform(args)
    audit = audit_membership(
        model, args.members, args.non_members, checkpoint["class_ids"], transform, device, args.batch_size, args.workers
    )
    print(audit.report())
    if args.out:
        result = {**asdict(audit), "chance_mean": audit.chance_mean, "chance_95": audit.chance_95,
                  "checkpoint": str(args.checkpoint), "members_folder": args.members,
                  "non_members_folder": args.non_members}
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n", what="audit result")
        print(f"wrote {args.out}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from .defaults import EMBEDDED_DEFAULT_NOTICE
    from .preview import preview_grid
    from .synth.tiny import RANDOM_WEIGHTS_NOTICE

    preview = preview_grid(
        captions=args.captions, model=args.sd_model, prompt=args.prompt, classes=args.classes,
        samples_per_class=args.samples, seed=args.seed, steps=args.steps, guidance=args.guidance,
        image_size=args.image_size, device=args.device or _default_device(), dtype=args.dtype, out=args.out,
    )
    print(f"wrote {preview.path}: {len(preview.specs)} classes x {len(preview.specs[0])} samples from {preview.model}")
    if preview.random_weights:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTICE}")
    elif preview.digits_model:
        print(f"NOTE: {EMBEDDED_DEFAULT_NOTICE}")
    return 0
