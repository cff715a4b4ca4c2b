"""Real handwritten digits for the embedded default: a fixed split, pixel-derived captions, a held-out test set.

The data are the test part of the UCI optical-recognition handwritten digits (Alpaydin and Kaynak, 1998; CC BY 4.0):
1,797 real 8x8 greyscale images of the digits 0-9, ink values 0..16, shipped inside streamsynth
(`streamsynth/data/optdigits/`, 45 KB; the same images, in the same order, as `sklearn.datasets.load_digits`, which
earlier versions read them from: their caption keys still say `sklearn-digits/`).

The split is fixed and contiguous: images 0..1296 are the **training part** (the "real training images" that get
captioned and that the shipped generator learned from), images 1297..1796 the **held-out test part** (500 images,
46 to 51 per class), which no generator or classifier training ever sees.

Captions come from `describe_digit`, a small rule-based *describer* (not a neural captioner): it measures four
things in a digit's pixels and names each with one phrase, so that, like BLIP-2 captions of ImageNet photos, a
caption carries per-image information beyond the class:

    strokes   mean ink of the inked pixels      thin strokes | medium strokes | thick strokes
    slant     shear of the ink's second moments slanted left | upright | slanted right
    size      total ink                         small | average size | large
    position  centre of mass of the ink         in the upper left | at the top | in the upper right | on the left |
                                                in the center | on the right | in the lower left | at the bottom |
                                                in the lower right

e.g. "thick strokes, slanted right, small, in the upper left". The thresholds are the tertiles of each measure over
the training part, rounded and fixed here, so every word is used about equally often and a caption is a pure
function of the pixels.

The image path: a digit's ink values v become the grey level v/16 in all three channels; that is the generator's
native 8x8 image. Everything bigger is made by `resize_to_uint8` (antialiased bilinear, the function the stream
resizes synthetic images with on the generator's device), so a held-out real digit reaches the classifier's input
size exactly as a synthetic one does, and is then scored with the standard evaluation view (`eval_transform`).
"""

from __future__ import annotations

import itertools
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from ..classifier.recipe import TrainingRecipe
    from ..transforms import BatchAugment

NUM_IMAGES = 1797
TRAIN_COUNT = 1297  # images 0..1296 are the training part, 1297..1796 the held-out test part
CLASS_IDS = tuple(str(d) for d in range(10))
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DESCRIBER = "streamsynth digit describer v1 (rule-based, from pixels; not a neural captioner)"
CAPTION_STORE_NAME = "digits-captions-v1.lmdb"

# Tertiles of each measure over the training part, rounded (see the module docstring).
THICKNESS_CUTS = (0.575, 0.62)  # mean grey level of the pixels with any ink
SLANT_CUTS = (-0.09, 0.02)  # horizontal shift of the ink per row upwards, in pixels (positive: top leans right)
INK_CUTS = (18.4, 20.6)  # total ink, in full pixels
COLUMN_CUTS = (3.45, 3.68)  # centre of mass, x (0 = left column, 7 = right)
ROW_CUTS = (3.34, 3.61)  # centre of mass, y (0 = top row, 7 = bottom)

STROKES = ("thin strokes", "medium strokes", "thick strokes")
SLANTS = ("slanted left", "upright", "slanted right")
SIZES = ("small", "average size", "large")
POSITIONS = (
    ("in the upper left", "at the top", "in the upper right"),
    ("on the left", "in the center", "on the right"),
    ("in the lower left", "at the bottom", "in the lower right"),
)


DATA_FILE = Path(str(resources.files("streamsynth") / "data" / "optdigits" / "optdigits-test.npz"))


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_FILE) as data:
        images, labels = data["images"], data["labels"]
    if images.shape != (NUM_IMAGES, 8, 8) or labels.shape != (NUM_IMAGES,):
        raise RuntimeError(f"{DATA_FILE} holds digits of shape {images.shape}, expected ({NUM_IMAGES}, 8, 8): "
                           "reinstall streamsynth")
    pixels = (images / 16.0).astype(np.float32)
    pixels.setflags(write=False)
    targets = labels.astype(np.int64)
    targets.setflags(write=False)
    return pixels, targets


def digit_pixels() -> np.ndarray:
    """All 1,797 digits as grey levels in [0, 1], shape (1797, 8, 8) (read-only)."""
    return _load()[0]


def digit_targets() -> np.ndarray:
    """The digit (0-9) of each image, shape (1797,)."""
    return _load()[1]


def train_indices() -> range:
    """The training part: the images that are captioned and that the generator learns from."""
    return range(0, TRAIN_COUNT)


def held_out_indices() -> range:
    """The held-out test part: never seen by generator or classifier training."""
    return range(TRAIN_COUNT, NUM_IMAGES)


def _cut(value: float, cuts: tuple[float, float]) -> int:
    return int(value >= cuts[0]) + int(value >= cuts[1])


def digit_measures(pixels: np.ndarray) -> dict[str, float]:
    """The four measures the describer names, from one digit's 8x8 grey levels in [0, 1]."""
    pixels = np.asarray(pixels, dtype=np.float64)
    ink = pixels.sum()
    if ink <= 0:
        raise ValueError("an empty image has no strokes to describe")
    rows, cols = np.mgrid[0:8, 0:8]
    cy, cx = (pixels * rows).sum() / ink, (pixels * cols).sum() / ink
    var_y = (pixels * (rows - cy) ** 2).sum() / ink
    cov = (pixels * (rows - cy) * (cols - cx)).sum() / ink
    return {
        "thickness": float(pixels[pixels > 0].mean()),
        "slant": float(-cov / var_y) if var_y > 0 else 0.0,  # rows grow downwards: a right lean has cov < 0
        "ink": float(ink),
        "column": float(cx),
        "row": float(cy),
    }


def describe_digit(pixels: np.ndarray) -> str:
    """A short caption computed from the pixels, e.g. "thick strokes, slanted right, small, in the upper left"."""
    m = digit_measures(pixels)
    return ", ".join((
        STROKES[_cut(m["thickness"], THICKNESS_CUTS)],
        SLANTS[_cut(m["slant"], SLANT_CUTS)],
        SIZES[_cut(m["ink"], INK_CUTS)],
        POSITIONS[_cut(m["row"], ROW_CUTS)][_cut(m["column"], COLUMN_CUTS)],
    ))


def image_key(index: int) -> str:
    """The caption store's key of digit `index` (its index in the 1,797 digits)."""
    return f"sklearn-digits/{index:04d}"


def caption_records():
    """One caption per training digit, keyed by image index, class id "0".."9"."""
    from ..captions.importers import CaptionRecord

    pixels, targets = _load()
    return [CaptionRecord(CLASS_IDS[targets[i]], describe_digit(pixels[i]), image_key(i)) for i in train_indices()]


def write_digits_caption_store(out: str | os.PathLike):
    """Write the training part's captions as a new caption store at `out` (built aside, renamed when complete)."""
    from ..captions.importers import write_store

    return write_store(
        caption_records(), out, name_map=dict(zip(CLASS_IDS, CLASS_NAMES)), captioner=DESCRIBER,
        source=f"UCI optical-recognition digits, test part, images 0..{TRAIN_COUNT - 1} (the training part)",
        extra={"split": {"train": [0, TRAIN_COUNT], "test": [TRAIN_COUNT, NUM_IMAGES]}},
    )


def ensure_digits_captions(folder: str | os.PathLike | None = None) -> Path:
    """The digits caption store under the cache folder, built on first use.

    Safe under concurrent first uses: each builder writes its own hidden copy and renames it into place; a
    builder that loses the race keeps the winner's store (the same captions) and checks that it is valid.
    """
    from ..captions.store import CaptionStore, CaptionStoreError
    from ..synth.tiny import cache_dir

    out = Path(folder) if folder is not None else cache_dir() / CAPTION_STORE_NAME
    try:
        CaptionStore(out).verify()  # every record: a few milliseconds for the 1,297 captions
        return out
    except CaptionStoreError as err:
        if out.exists():
            # Not overwritten (it may be something else than the store this function built), but it is streamsynth's
            # own cache, not the user's captions: the fix is to remove it, not to import or caption anything.
            raise CaptionStoreError(f"the digits caption store {out}, which streamsynth builds on first use, is "
                                    f"unusable ({err.without_fix()}); delete it, and it is built again on the next "
                                    "run") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_digits_caption_store(out)
    except OSError:  # FileExistsError, or the rename lost the race: another process built it meanwhile
        CaptionStore(out)  # raises if what is there is not a valid store
    return out


def digits_to_uint8(pixels: np.ndarray | torch.Tensor, size: int | None) -> torch.Tensor:
    """8x8 grey levels (N, 8, 8) in [0, 1] → uint8 RGB (N, 3, size, size), resized as the stream resizes."""
    from ..synth.postprocess import resize_to_uint8

    images = torch.tensor(np.asarray(pixels), dtype=torch.float32)  # a copy: the digits are read-only
    return resize_to_uint8(images[:, None].expand(-1, 3, -1, -1), size)


def class_labels(class_ids: Sequence[str]) -> list[int]:
    """The classifier label of each digit 0-9, given the classifier's class ids (in label order)."""
    missing = [cid for cid in CLASS_IDS if cid not in class_ids]
    if missing:
        raise ValueError(
            f"the classifier's classes {list(class_ids)[:12]} do not include the digit classes {missing}: the "
            "held-out digits can only score a classifier trained on the digits caption store"
        )
    return [list(class_ids).index(cid) for cid in CLASS_IDS]


class DigitImages(Dataset):
    """Real digits (`indices` into the 1,797) as (image, label): resized to `image_size` as synthetic images are,
    then shown through `transform` (default: the standard evaluation view,
    `streamsynth.classifier.evaluate.eval_transform`)."""

    def __init__(self, indices: Sequence[int], image_size: int, class_ids: Sequence[str] = CLASS_IDS, transform=None):
        from ..classifier.evaluate import eval_transform

        pixels, targets = _load()
        chosen = np.asarray(indices, dtype=np.int64)
        self.images = digits_to_uint8(pixels[chosen], image_size)
        labels = class_labels(class_ids)
        self.labels = torch.tensor([labels[t] for t in targets[chosen]])
        self.transform = transform if transform is not None else eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class HeldOutDigits(DigitImages):
    """The 500 held-out real digits (`held_out_indices`) as a `DigitImages`."""

    def __init__(self, image_size: int, class_ids: Sequence[str] = CLASS_IDS, transform=None):
        super().__init__(held_out_indices(), image_size, class_ids, transform)


def held_out_top1(model: torch.nn.Module, image_size: int, device: torch.device | str,
                  class_ids: Sequence[str] = CLASS_IDS, batch_size: int = 250) -> float:
    """Top-1 accuracy (percent) of `model` on the held-out real digits; the model's train/eval mode is restored."""
    from torch.utils.data import DataLoader

    from ..classifier.evaluate import topk_correct

    loader = DataLoader(HeldOutDigits(image_size, class_ids), batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        images, top1, _ = topk_correct(model, loader, 1, torch.ones(len(class_ids), dtype=torch.bool), device,
                                       desc="held-out digits")
    finally:
        model.train(was_training)
    return 100.0 * top1 / images


def report_held_out_digits(model: torch.nn.Module, image_size: int, device: torch.device | str,
                           class_ids: Sequence[str]) -> float:
    """Scores `model` on the held-out real digits and prints one line saying what the number is; returns top-1."""
    top1 = held_out_top1(model, image_size, device, class_ids)
    count = len(held_out_indices())
    print(f"held-out real digits: top-1 {top1:.1f}% on {count} real 8x8 digits that no generator or classifier "
          f"training saw (chance 10%)", flush=True)
    return top1


# ----- small classifiers on digits: the benchmark's and the tests' training loop -----------------------------------

def digit_augmentation(image_size: int) -> "BatchAugment":
    """A mild augmentation for digits: crops of 60-100% of the frame and no flips (a mirrored 2 is not a 2), then
    ImageNet normalisation; a `BatchAugment`, so the stream augments each replayed use of a group in one batch."""
    from ..transforms import BatchAugment

    return BatchAugment(image_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), flip=False)


def real_training_batches(image_size: int, batch_size: int, seed: int = 0,
                          indices: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of real digits, by default the training part (the real-data baseline; `indices`: any of the
    1,797, e.g. a shadow model's share): a seeded reshuffle every epoch, each image augmented by
    `digit_augmentation` under a seed of (seed, epoch, digit index), labels = digits (ids "0".."9")."""
    from ..seeding import derive_seed

    pixels, targets = _load()
    chosen = np.asarray(train_indices() if indices is None else indices, dtype=np.int64)
    if len(chosen) < batch_size:
        raise ValueError(f"{len(chosen)} digits cannot fill a batch of {batch_size}: give more digits or a smaller "
                         "batch")
    images = digits_to_uint8(pixels[chosen], image_size)
    labels = torch.from_numpy(targets[chosen])
    augment = digit_augmentation(image_size)
    generator = torch.Generator().manual_seed(seed)
    for epoch in itertools.count():
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            seeds = [derive_seed(seed, "real digits", epoch, int(chosen[i])) for i in index.tolist()]
            yield augment(images[index], seeds), labels[index]


def fit_classifier(batches: Iterable[tuple], steps: int, arch: str = "test_resnet", num_classes: int = 10,
                   lr: float = 0.1, weight_decay: float = 5e-5, label_smoothing: float = 0.1, seed: int = 0,
                   watch: Callable[[torch.nn.Module], None] | None = None,
                   report: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> torch.nn.Module:
    """Trains `build_classifier(arch)` for `steps` batches of `batches` ((images, labels, ...) tuples) with train.py's
    recipe (`streamsynth.classifier.recipe`): SGD with Nesterov momentum, linear warmup over 2% of the steps, cosine
    decay to zero from the peak learning rate `lr`, label smoothing.

    `watch` and `report`: the learner's hooks for steering, as `train_classifier` takes them."""
    from ..classifier.recipe import train_classifier

    return train_classifier(digits_recipe(steps, arch, num_classes, lr, weight_decay, label_smoothing), batches, seed,
                            watch=watch, report=report)


def digits_recipe(steps: int, arch: str = "test_resnet", num_classes: int = 10, lr: float = 0.1,
                  weight_decay: float = 5e-5, label_smoothing: float = 0.1, image_size: int = 16,
                  batch_size: int = 64) -> "TrainingRecipe":
    """The digits benchmarks' recipe; `lr` is the peak learning rate itself (not scaled by the batch size)."""
    from ..classifier.recipe import TrainingRecipe

    return TrainingRecipe(arch=arch, num_classes=num_classes, image_size=image_size, steps=steps,
                          batch_size=batch_size, peak_lr=lr, weight_decay=weight_decay,
                          label_smoothing=label_smoothing)
