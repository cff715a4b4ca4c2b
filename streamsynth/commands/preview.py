"""`streamsynth preview`: a PNG grid of synthetic samples, one row per class, each image titled with its prompt.

It shows exactly what training sees: the command takes train.py's synthesis flags with train.py's defaults
(`streamsynth.commands.options`), and the samples are the first ones of each class in the stream's sample-id
order, made by the stream itself (`SyntheticStream.make_samples`: same sampler, prompt strategy, seeds, generator
loop and resize). A preview with a run's flags (or `--config` of its run.json) previews that run.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..digits.model import is_digits_model
from ..stream.dataset import SyntheticStream
from ..stream.sampling import SampleSpec
from . import options
from .args import comma_list, list_metavar, positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PREVIEW_FILE = "preview.png"
DEFAULT_MAX_CLASSES = 10
# Grid geometry in inches at DPI: each cell is a square image under a few lines of prompt text; the header holds
# one line of text per TITLE_LINE_HEIGHT.
CELL_WIDTH, CELL_HEIGHT, TITLE_LINE_HEIGHT, DPI = 2.4, 2.8, 0.2, 100
PROMPT_CHARS, PROMPT_LINE = 110, 34
TITLE_CHARS_PER_INCH = 11


@dataclass
class Preview:
    path: Path
    model: str
    random_weights: bool
    digits_model: bool  # the embedded default's tiny digits generator
    specs: list[list[SampleSpec]]  # rows of the grid
    images: torch.Tensor  # uint8 (N, 3, H, W), row by row
    figure: Figure


def resolve_classes(stream: SyntheticStream, classes: Sequence[str] | None) -> list[int]:
    """Labels for class ids, readable names or label indices; default: the first `DEFAULT_MAX_CLASSES` classes."""
    store_classes = stream.store.classes
    if not classes:
        return list(range(min(DEFAULT_MAX_CLASSES, len(store_classes))))
    by_key = {c.id: c.index for c in store_classes} | {c.name.lower(): c.index for c in store_classes}
    labels = []
    for wanted in classes:
        key = wanted if wanted in by_key else wanted.lower()
        if key in by_key:
            labels.append(by_key[key])
        elif wanted.isdigit() and int(wanted) < len(store_classes):
            labels.append(int(wanted))
        else:
            examples = ", ".join(f"{c.id} ({c.name})" for c in store_classes[:3])
            raise ValueError(
                f"class {wanted!r} is not in caption store {stream.store.path}: give class ids, names or indices "
                f"0..{len(store_classes) - 1}, e.g. {examples}"
            )
    return list(dict.fromkeys(labels))  # one row per class, however often it was named


def first_samples(stream: SyntheticStream, labels: Sequence[int], samples_per_class: int) -> list[list[SampleSpec]]:
    """The first `samples_per_class` samples of each label, in sample-id order (the order training makes them)."""
    counts = {label: stream.store.classes[label].num_captions for label in labels}
    empty = [stream.store.classes[label].id for label, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"classes {empty} have no captions in {stream.store.path}, so the stream never draws them")
    # Every pass over the store visits each caption once, so this many passes hold enough samples of every class.
    passes = math.ceil(samples_per_class / min(counts.values()))
    rows: dict[int, list[SampleSpec]] = {label: [] for label in labels}
    missing = len(labels) * samples_per_class
    for sample_id in range(passes * stream.sampler.num_captions):
        label, _ = stream.sampler.locate(sample_id)
        if label in rows and len(rows[label]) < samples_per_class:
            rows[label].append(stream.spec(sample_id))
            missing -= 1
            if missing == 0:
                break
    return [rows[label] for label in labels]


def _cell_title(prompt: str) -> str:
    return textwrap.fill(textwrap.shorten(prompt, PROMPT_CHARS, placeholder=" ..."), PROMPT_LINE)


def _strategy_line(templates: Sequence[str]) -> str:
    if len(templates) == 1:
        return templates[0]
    return f"one of {len(templates)} templates, chosen by each sample's seed"


def render_grid(
    images: Sequence[torch.Tensor], specs: list[list[SampleSpec]], row_names: Sequence[str], title_lines: Sequence[str]
) -> Figure:
    """A matplotlib Figure: rows of uint8 CHW images, each titled with its prompt, rows labelled by class name.

    Its size is fixed by the grid (CELL_WIDTH x CELL_HEIGHT per image, plus the title), so the PNG's is too.
    """
    from matplotlib.figure import Figure

    rows, cols = len(specs), len(specs[0])
    width = cols * CELL_WIDTH
    title = "\n".join(textwrap.fill(line, int(width * TITLE_CHARS_PER_INCH)) for line in title_lines)
    height = rows * CELL_HEIGHT + (title.count("\n") + 2) * TITLE_LINE_HEIGHT
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, row in enumerate(specs):
        for c, spec in enumerate(row):
            ax = axes[r][c]
            ax.imshow(images[r * cols + c].permute(1, 2, 0).numpy())
            ax.set_title(_cell_title(spec.prompt), fontsize=7, loc="left")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(row_names[r], fontsize=9)
    fig.suptitle(title, fontsize=8)
    return fig


def preview_grid(stream: SyntheticStream, classes: Sequence[str] | None = None, samples_per_class: int = 4,
                 out: str | os.PathLike = "preview.png") -> Preview:
    """Draws the first `samples_per_class` samples of each class of `stream` (its own sample ids, prompts, seeds and
    generator loop, `SyntheticStream.make_samples`) and writes the grid to `out` (a PNG). The grid's title says what
    the generator is: the embedded digits model, or one with random weights, is named as such."""
    if samples_per_class < 1:
        raise ValueError(f"samples per class must be at least 1, got {samples_per_class}")
    labels = resolve_classes(stream, classes)
    specs = first_samples(stream, labels, samples_per_class)
    _, images = stream.make_samples([spec.sample_id for row in specs for spec in row])
    generator, synthesis = stream.generator, stream.generator.synthesis
    title_lines = [
        "generator: streamsynth's embedded digits model" if is_digits_model(generator.model)
        else f"generator: {generator.model}",
        f"prompt: {_strategy_line(stream.sampler.template.templates)}",
        f"seed {stream.sampler.run_seed}, {synthesis.num_inference_steps} steps, guidance {synthesis.guidance_scale}, "
        "first samples of each class in training order",
    ]
    if stream.random_weights:
        title_lines.append("RANDOM WEIGHTS: streamsynth's tiny test generator. These images are noise, not pictures "
                           "of the classes.")
    elif is_digits_model(generator.model):
        title_lines.append("streamsynth's embedded default: a tiny model trained on real 8x8 handwritten digits "
                           "(UCI), not Stable Diffusion")
    row_names = [f"{stream.store.classes[label].name}\n({stream.store.classes[label].id})" for label in labels]
    fig = render_grid(list(images), specs, row_names, title_lines)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return Preview(out, generator.model, stream.random_weights, is_digits_model(generator.model), specs, images, fig)


# ----- the command ---------------------------------------------------------------------------------------------------

def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "preview",
        help="a PNG grid of synthetic samples per class, labelled with their prompts",
        description="Draw the first samples of chosen classes exactly as the training stream makes them: the same "
        "flags and defaults as train.py (so the same sampler, prompts, seeds, generator and image size). Without "
        "--sd-model/--captions it uses the embedded default, a tiny generator trained on 8x8 handwritten digits (not "
        "Stable Diffusion).",
    )
    options.add_config_options(p)
    options.add_source_options(p)
    p.add_argument("--classes", type=comma_list(), metavar=list_metavar("CLASS"),
                   help="comma-separated class ids, names or indices (default: the first 10)")
    p.add_argument("--samples", type=positive_int, default=4, help="samples per class (columns)")
    options.add_sampler_options(p)
    options.add_generator_options(p, devices_help="the generator's device, e.g. cuda:1 (default: the GPU, else "
                                  "the CPU)")
    p.add_argument("--out", default=".", metavar="DIR", help=f"folder for the grid: writes OUT/{PREVIEW_FILE}")
    p.set_defaults(func=_preview, parser=p)


def _preview(args: argparse.Namespace) -> int:
    from ..digits.embedded import EMBEDDED_DEFAULT_NOTICE
    from ..synth.tiny import RANDOM_WEIGHTS_NOTICE

    args = options.resolve(args)
    if args.print_config:
        options.print_config(args)
        return 0
    model, captions = options.source_paths(args)
    generator = options.generator_config(args, model, options.node_devices(args.synth_devices))
    stream = SyntheticStream(captions, generator, prompt=args.prompt, seed=args.seed)
    preview = preview_grid(stream, args.classes, args.samples, Path(args.out) / PREVIEW_FILE)
    print(f"wrote {preview.path}: {len(preview.specs)} classes x {len(preview.specs[0])} samples from {preview.model}")
    if preview.random_weights:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTICE}")
    elif preview.digits_model:
        print(f"NOTE: {EMBEDDED_DEFAULT_NOTICE}")
    return 0
