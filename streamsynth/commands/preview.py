"""A PNG grid of synthetic samples, one row per class, each image titled with its prompt.

It shows exactly what training would see: the samples are the first ones of each class in the stream's sample-id
order, made by `SyntheticStream.spec` and `SyntheticStream.generate` (same sampler, prompt strategy, seeds,
generator and resize), so a preview with the training run's settings previews that run.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..captions.store import CaptionStore
from ..prompts.templates import PromptTemplate
from ..stream.dataset import SyntheticStream
from ..stream.sampling import SampleSpec
from ..synth.config import GeneratorConfig, SynthesisConfig
from ..digits.model import is_digits_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


def preview_grid(
    captions: str | os.PathLike | CaptionStore | None = None,
    model: str | os.PathLike | None = None,
    prompt: str | PromptTemplate = "cip",
    classes: Sequence[str] | None = None,
    samples_per_class: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 1.5,
    image_size: int | None = 224,
    device: str = "cpu",
    dtype: str | None = None,
    out: str | os.PathLike = "preview.png",
) -> Preview:
    """Generates the preview grid and writes it to `out` (a PNG).

    `captions` and `model` default to the embedded default (the digits captions and the tiny generator trained on
    them); the grid's title then says what that model is. A model with random weights is named as such too.
    """
    from ..digits.embedded import embedded_captions, embedded_model

    if samples_per_class < 1:
        raise ValueError(f"samples per class must be at least 1, got {samples_per_class}")
    generator = GeneratorConfig(model or embedded_model(), image_size=image_size, devices=(device,), dtype=dtype,
                                synthesis=SynthesisConfig(num_inference_steps=steps, guidance_scale=guidance))
    stream = SyntheticStream(captions or embedded_captions(), generator, prompt=prompt, seed=seed)
    labels = resolve_classes(stream, classes)
    specs = first_samples(stream, labels, samples_per_class)
    flat = [spec for row in specs for spec in row]
    synth, chunk = stream.synthesizer(), generator.batch_size
    images = [image for start in range(0, len(flat), chunk)
              for image in synth.generate_uint8([s.prompt for s in flat[start:start + chunk]],
                                                [s.seed for s in flat[start:start + chunk]], image_size).cpu()]
    title_lines = [
        f"generator: {generator.model}",
        f"prompt: {_strategy_line(stream.sampler.template.templates)}",
        f"seed {seed}, {steps} steps, guidance {guidance}, first samples of each class in training order",
    ]
    if stream.random_weights:
        title_lines.append("RANDOM WEIGHTS: streamsynth's tiny test generator. These images are noise, not pictures "
                           "of the classes.")
    elif is_digits_model(generator.model):
        title_lines.append("streamsynth's embedded default: a tiny model trained on real 8x8 handwritten digits "
                           "(UCI), not Stable Diffusion")
    row_names = [f"{stream.store.classes[label].name}\n({stream.store.classes[label].id})" for label in labels]
    fig = render_grid(images, specs, row_names, title_lines)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return Preview(out, generator.model, stream.random_weights, is_digits_model(generator.model), specs, fig)
