"""`streamsynth train-digits-generator`: train the embedded default's tiny generator again (see
`streamsynth.digits.train_generator`), or draw the loss curves of one already trained."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields

from .args import fraction, nonnegative_float, positive_float, positive_int, seed

# The flags of the training settings (`GeneratorSettings`), with what each means and how it is checked.
SETTINGS_HELP = {
    "seed": (seed, "seed of every random draw of the training"),
    "threads": (positive_int, "intra-op threads (one is the faster choice on a busy 2-core machine)"),
    "vae_steps": (positive_int, "optimizer steps of the VAE stage"),
    "vae_batch_size": (positive_int, "images per VAE step"),
    "vae_lr": (positive_float, "the VAE's peak learning rate"),
    "kl_weight": (nonnegative_float, "weight of the KL term beside the VAE's per-pixel squared error"),
    "unet_steps": (positive_int, "optimizer steps of the UNet and text-encoder stage"),
    "unet_batch_size": (positive_int, "images per UNet step"),
    "unet_lr": (positive_float, "the UNet stage's peak learning rate"),
    "warmup_steps": (positive_int, "steps of linear learning-rate warmup"),
    "weight_decay": (nonnegative_float, "AdamW weight decay"),
    "empty_prompt_share": (fraction, "share of training prompts left empty (for classifier-free guidance)"),
    "basic_prompt_share": (fraction, "share of training prompts without the caption (\"a photo of {name}\")"),
    "ema_decay": (fraction, "decay of the weights' moving average that ships"),
    "log_every": (positive_int, "steps between loss records in the model card"),
}


def add_commands(subparsers) -> None:
    from ..digits.train_generator import GeneratorSettings

    p = subparsers.add_parser(
        "train-digits-generator", help="train the embedded default's tiny digits generator again (about 35 CPU "
        "minutes)", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--out", metavar="DIR", help="folder to save the pipeline to (e.g. streamsynth/data/digits-sd)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--plot", metavar="PNG", help="also draw the loss curves to this PNG")
    p.add_argument("--plot-only", metavar="MODEL", help="draw the loss curves of an already trained MODEL; no training")
    defaults = asdict(GeneratorSettings())
    for field in fields(GeneratorSettings):
        kind, text = SETTINGS_HELP[field.name]
        p.add_argument("--" + field.name.replace("_", "-"), type=kind, default=defaults[field.name], help=text)
    p.set_defaults(func=_train, parser=p)


def _train(args: argparse.Namespace) -> int:
    from ..digits.train_generator import GeneratorSettings, plot_loss_curves, train_generator

    if args.plot_only:
        print(f"wrote {plot_loss_curves(args.plot_only, args.plot or 'loss.png')}")
        return 0
    if not args.out:
        args.parser.error("--out is required (or --plot-only MODEL)")
    settings = GeneratorSettings(**{f.name: getattr(args, f.name) for f in fields(GeneratorSettings)})
    folder = train_generator(args.out, settings, overwrite=args.overwrite)
    if args.plot:
        print(f"wrote {plot_loss_curves(folder, args.plot)}")
    return 0
