"""Top-1 / top-5 accuracy of a classifier on real ImageFolder test sets: ImageNet val and its OOD variants.

The classifier's outputs are the caption store's classes (`class_ids`, in label order), which may be all of
ImageNet-1K or a few classes of it. Each eval folder has one sub-folder per class, named by WordNet id, or by
ImageNet-1K index 0..999 (ImageNet-V2's release). A folder whose class the classifier does not know is skipped and
reported: a 10-class model is scored on the 10 classes it was trained for.

ImageNet-R and -A hold 200 of the 1000 classes; as in their papers, a 1000-way model is scored with its logits
restricted to those 200 (`SUBSET_SUITES`), so the suite measures robustness rather than confusion with classes
that cannot occur. Top-k is capped at the number of classes a suite lets the model choose from.

Faults (see docs/reliability.md): `check_eval_folder` finds, before any scoring (and before training in train.py),
a missing folder, one without class folders, one none of whose classes the classifier can be scored on, and an
empty or unreadable class folder. Images are decoded with streamsynth's one policy (`streamsynth.imagefiles`): an
image that cannot be read or decoded is skipped, counted in its suite's `unreadable` and named in a warning, so one
corrupt file never costs the results of an evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pkgutil
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from .models import DEFAULT_IMAGE_SIZE
from ..errors import StreamsynthError
from ..limits import SharedCollate, plan_workers
from ..imagefiles import (ClassFolderListing, is_utf8_path, list_class_images, plain_rgb, printable_path,
                          read_image_file)
from ..safeio import atomic_write_text
from ..captions.classnames import imagenet_classes
from ..transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

# The suites of the reference recipe, in the order tables list them.
SUITES = ("imagenet-val", "imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a")
# Suites scored on a class subset: suite name → timm's synset list of that subset.
SUBSET_SUITES = {"imagenet-r": "imagenet_r_synsets.txt", "imagenet-a": "imagenet_a_synsets.txt"}
TOP_K = 5


@lru_cache(maxsize=None)
def suite_classes(suite: str) -> frozenset[str] | None:
    """The WordNet ids a suite is scored on, or None for all the classifier's classes."""
    if suite not in SUBSET_SUITES:
        return None
    data = pkgutil.get_data("timm.data", f"_info/{SUBSET_SUITES[suite]}")
    return frozenset(data.decode().split())


def eval_transform(image_size: int = DEFAULT_IMAGE_SIZE) -> Callable:
    """The standard ImageNet evaluation view: resize to size/0.875, centre crop, normalise as in training."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(image_size / 0.875), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class EvalFolderError(StreamsynthError, ValueError):
    """An evaluation folder cannot be scored as given; the message names the folder and the fix."""


class EmptyClassFolderError(EvalFolderError, FileNotFoundError):
    """A class folder to score holds no image file, or cannot be listed."""


def folder_class_ids(folders: Sequence[str], class_ids: Sequence[str] = ()) -> dict[str, str]:
    """Class folder name → class id: the name itself, except that all-numeric names are ImageNet-1K indices
    (ImageNet-V2's layout) unless they are class ids of the classifier (a dataset with numeric class ids)."""
    known = set(class_ids)
    if all(name.isdigit() for name in folders) and not any(name in known for name in folders):
        imagenet = imagenet_classes()
        out_of_range = [name for name in folders if int(name) >= len(imagenet)]
        if out_of_range:
            raise ValueError(
                f"numeric class folders {out_of_range[:5]} are not ImageNet-1K indices (0..{len(imagenet) - 1}): "
                "name class folders by WordNet id, or by index as ImageNet-V2 does"
            )
        return {name: imagenet[int(name)][0] for name in folders}
    return {name: name for name in folders}


def class_folders(root: str | os.PathLike, suite: str = "") -> list[str]:
    root = Path(root)
    what = f"{suite} folder {root}" if suite else f"folder {root}"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{what} does not exist: give a folder with one sub-folder of images per class "
            "(named by WordNet id, or 0..999 as in ImageNet-V2)"
        )
    try:
        folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    except OSError as err:
        raise EvalFolderError(f"cannot list {what}: {err.strerror or err}") from None
    if not folders:
        raise ValueError(
            f"{what} has no class sub-folders: it must hold one sub-folder of images per class "
            "(for ImageNet val, run the usual script that moves the images into per-synset folders)"
        )
    return folders


def class_folder_images(root: str | os.PathLike, folder: str, real_folders: Mapping[str, str]) -> ClassFolderListing:
    """The image files of class folder `folder` of `root`, listed by streamsynth's one rule
    (`imagefiles.list_class_images`: nothing outside `root`, each file once), less the files whose path is not UTF-8,
    which are moved to `skipped`: a folder, its report and its fingerprint name every image, and one such name must
    not make the whole folder unusable. `real_folders`: every class folder of `root` → its real path
    (`real_class_folders`)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    others = [real for other, real in real_folders.items() if other != folder]
    listing = list_class_images(root, folder, IMG_EXTENSIONS, others)
    kept = [path for path in listing.files if is_utf8_path(path)]
    if len(kept) < len(listing.files):
        listing.skipped += [(path, "its name is not UTF-8 text; rename it") for path in listing.files
                            if not is_utf8_path(path)]
        listing.files = kept
    return listing


def real_class_folders(root: str | os.PathLike, folders: Sequence[str]) -> dict[str, str]:
    """Class folder → its real path (links resolved), once per folder: no listing may lead into another's."""
    return {folder: os.path.realpath(os.path.join(root, folder)) for folder in folders}


def _left_out(skipped: Sequence[tuple[str, str]]) -> str:
    path, why = skipped[0]
    return f"{len(skipped)} left out, e.g. {printable_path(path)}: {why}"


def check_eval_folder(
    root: str | os.PathLike, suite: str = "", class_ids: Sequence[str] | None = None
) -> dict[str, int] | list[str]:
    """Everything about an evaluation folder that can fail, checked before any scoring (in train.py, before
    training): it exists and holds class folders; with `class_ids` (the classifier's outputs), at least one class
    folder is a class the suite can score the classifier on; and none of the class folders to score (all of them
    without `class_ids`) is empty or unreadable. Raises `FileNotFoundError` or `EvalFolderError` naming the folder;
    returns the class folders, or with `class_ids` the class folder → label map `suite_folder_labels` gives."""
    what = f"{suite} folder {root}" if suite else f"folder {root}"
    folders = class_folders(root, suite)
    if class_ids is None:
        to_score: list[str] | dict[str, int] = folders
    else:
        to_score, skipped = suite_folder_labels(root, class_ids, suite_classes(suite), suite)
        if not to_score:
            subset = suite_classes(suite)
            scorable = [cid for cid in class_ids if subset is None or cid in subset]
            if not scorable:
                raise EvalFolderError(
                    f"{what}: none of the classifier's {len(class_ids)} classes is one of the {len(subset)} classes "
                    f"{suite} is scored on, so it cannot be scored; leave it out"
                )
            raise EvalFolderError(
                f"{what}: none of its {len(folders)} class folders (e.g. {folders[:3]}) is a class of the classifier "
                f"(e.g. {list(scorable[:3])}); name class folders by class id (or 0..999 as in ImageNet-V2), or "
                "leave it out"
            )
    real_folders = real_class_folders(root, folders)
    for folder in to_score:
        listing = class_folder_images(root, folder, real_folders)
        if listing.unreadable:
            raise EmptyClassFolderError(f"{what}: cannot read class folder {folder} ({listing.unreadable})")
        if not listing.files:
            left_out = f" that can be used ({_left_out(listing.skipped)})" if listing.skipped else ""
            raise EmptyClassFolderError(f"{what}: class folder {folder} holds no image files{left_out}; add images to "
                                        "it or remove it")
    return to_score


class LabelledImageFolder(ImageFolder):
    """An ImageFolder over chosen class folders whose targets are the classifier's labels.

    `folder_labels` maps class folder name → classifier label; other folders are not read. `targets` are therefore
    classifier labels and do not index `self.classes` (the folder names). The images are listed by
    `class_folder_images` (no link out of `root` followed, each file once, names that are not UTF-8 left out); what is
    left out is in `skipped` ("path: why") and named in one warning.
    """

    def __init__(self, root: str | os.PathLike, folder_labels: Mapping[str, int], transform: Callable | None = None):
        self.folder_labels = dict(folder_labels)
        self.skipped: list[str] = []
        super().__init__(root, transform=transform)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        return sorted(self.folder_labels), self.folder_labels

    def make_dataset(self, directory: str | os.PathLike, class_to_idx: dict[str, int], extensions=None,
                     is_valid_file=None, allow_empty: bool = False) -> list[tuple[str, int]]:
        real_folders = real_class_folders(directory, class_folders(directory))
        samples = []
        for folder in sorted(class_to_idx):
            listing = class_folder_images(directory, folder, real_folders)
            if listing.unreadable or not listing.files:
                raise EmptyClassFolderError(
                    f"{directory}: class folder {folder} " + (f"cannot be read ({listing.unreadable})"
                    if listing.unreadable else "holds no image files") + "; remove it or add images to it")
            samples += [(path, class_to_idx[folder]) for path in listing.files]
            self.skipped += [f"{printable_path(path)}: {why}" for path, why in listing.skipped]
        if self.skipped:
            log.warning("%s: %d files left out, e.g. %s", directory, len(self.skipped), "; ".join(self.skipped[:3]))
        return samples


class ImagesOrReasons(Dataset):
    """Images (`samples`: (path, label) pairs, e.g. a `LabelledImageFolder`'s) decoded with streamsynth's policy:
    item i is (tensor, label, None), or (None, label, "path: why it is unusable") for an image that cannot be read,
    decoded or transformed. Batch it with `collate_skipping`."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        path, label = self.samples[i]
        image = read_image_file(path, convert=plain_rgb)
        if isinstance(image, str):
            return None, label, f"{path}: {image}"
        try:
            return (self.transform(image) if self.transform else image), label, None
        except Exception as err:  # e.g. an image too small for the crop
            return None, label, f"{path}: the evaluation transform failed ({type(err).__name__}: {err})"


def collate_skipping(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    """(the usable images stacked, their labels, the reasons of the unusable ones)."""
    good = [(image, label) for image, label, _ in items if image is not None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, torch.tensor([label for _, label in good], dtype=torch.int64), [r for *_, r in items if r]


def scoring_loader(folder: LabelledImageFolder, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of (images, labels, unreadable) batches that survives corrupt images (see `ImagesOrReasons`).

    Its workers are those the machine's shared memory and file-size limit allow (`limits.plan_workers`: fewer, or
    none, with a warning), and a batch that a worker still cannot hand over is a one-line `SharedMemoryError`."""
    return images_loader(ImagesOrReasons(folder.samples, folder.transform), batch_size, workers, pin_memory,
                         what=f"decoding {folder.root}")


def images_loader(dataset: ImagesOrReasons, batch_size: int, workers: int, pin_memory: bool = False, *,
                  what: str, collate: Callable = collate_skipping) -> DataLoader:
    """A DataLoader of `dataset`'s batches (by default (images, labels, unreadable)) with the workers the machine's
    shared memory and file-size limit allow: the loader of every scoring and audit pass."""
    batch_bytes = min(batch_size, len(dataset)) * _image_bytes(dataset)
    plan = plan_workers(workers, lambda w: batch_bytes, items=-(-len(dataset) // batch_size), what=what,
                        fewer="a smaller --batch-size")
    return DataLoader(dataset, batch_size=batch_size, pin_memory=pin_memory, collate_fn=SharedCollate(collate),
                      **plan.loader_options())


def _image_bytes(dataset: ImagesOrReasons, tries: int = 8) -> int:
    """The bytes of one transformed image (and its label), from the first image of `dataset` that can be used."""
    for i in range(min(tries, len(dataset))):
        image, _, _ = dataset[i]
        if isinstance(image, torch.Tensor):
            return image.nbytes + 8
    return 3 * DEFAULT_IMAGE_SIZE**2 * 4 + 8  # none usable among the first: the default view's float32 pixels


def warn_unreadable(where: str, unreadable: Sequence[str]) -> None:
    if unreadable:
        log.warning("%s: %d images skipped because they cannot be used, e.g. %s", where, len(unreadable),
                    "; ".join(unreadable[:3]))


@dataclass
class SuiteResult:
    """One suite's scores. Accuracies are percentages; None when no image of the suite could be scored."""

    suite: str
    folder: str
    images: int
    top1: float | None
    top5: float | None
    top5_k: int  # the k of "top5": 5, or fewer when the suite lets the model choose from fewer classes
    candidate_classes: int  # outputs the model may choose from (all, or those in the suite's subset)
    scored_classes: int  # class folders read
    skipped_folders: list[str] = field(default_factory=list)  # classes the model lacks or outside the suite's subset
    unreadable: list[str] = field(default_factory=list)  # "path: reason" of images that could not be decoded


def suite_folder_labels(
    root: str | os.PathLike, class_ids: Sequence[str], subset: frozenset[str] | None, suite: str = ""
) -> tuple[dict[str, int], list[str]]:
    """(class folder → classifier label for the folders to score, the folders skipped)."""
    label_of = {cid: label for label, cid in enumerate(class_ids)}
    kept, skipped = {}, []
    for folder, cid in folder_class_ids(class_folders(root, suite), class_ids).items():
        if cid in label_of and (subset is None or cid in subset):
            kept[folder] = label_of[cid]
        else:
            skipped.append(folder)
    return kept, skipped


@torch.no_grad()
def topk_correct(
    model: nn.Module, loader: DataLoader, k: int, mask: torch.Tensor, device: torch.device | str, desc: str = "",
    unreadable: list[str] | None = None,
) -> tuple[int, int, int]:
    """(images, top-1 hits, top-k hits) of `model` over `loader`, choosing only among outputs where `mask` is True.

    `loader` yields (images, labels) or, from `scoring_loader`, (images or None, labels, unreadable): the reasons
    of unreadable images are appended to `unreadable` when it is given."""
    images = top1 = topk = 0
    for batch, labels, *rest in tqdm(loader, desc=desc, leave=False, disable=None):
        if rest and unreadable is not None:
            unreadable.extend(rest[0])
        if batch is None:
            continue
        logits = model(batch.to(device, non_blocking=True)).float()
        if logits.shape[1] != len(mask):
            raise ValueError(
                f"the model has {logits.shape[1]} outputs but {len(mask)} class ids were given: pass the class ids "
                "of the caption store (or checkpoint) the model was trained on"
            )
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
        hits = logits.topk(k, dim=1).indices.cpu() == labels[:, None]
        images += len(labels)
        top1 += int(hits[:, 0].sum())
        topk += int(hits.any(dim=1).sum())
    return images, top1, topk


def evaluate_suite(
    model: nn.Module,
    suite: str,
    folder: str | os.PathLike,
    class_ids: Sequence[str],
    transform: Callable,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    workers: int = 4,
) -> SuiteResult:
    """Scores `model` (outputs = `class_ids`) on one ImageFolder; the suite name decides the class subset."""
    subset = suite_classes(suite)
    folder_labels, skipped = suite_folder_labels(folder, class_ids, subset, suite)
    mask = torch.tensor([subset is None or cid in subset for cid in class_ids])
    candidates = int(mask.sum())
    k = min(TOP_K, candidates)
    if skipped:
        log.info("%s: %d of %d class folders are not classes of the classifier and are skipped",
                 suite, len(skipped), len(skipped) + len(folder_labels))
    if not folder_labels:
        log.warning("%s: no class of %s is a class of the classifier; nothing scored", suite, folder)
        return SuiteResult(suite, str(folder), 0, None, None, k, candidates, 0, skipped)
    dataset = LabelledImageFolder(folder, folder_labels, transform)
    loader = scoring_loader(dataset, batch_size, workers, pin_memory=str(device).startswith("cuda"))
    unreadable: list[str] = []
    images, top1, topk = topk_correct(model, loader, k, mask, device, desc=suite, unreadable=unreadable)
    warn_unreadable(f"{suite} ({folder})", unreadable)
    if images == 0:
        log.warning("%s: no image of %s could be read; nothing scored", suite, folder)
        return SuiteResult(suite, str(folder), 0, None, None, k, candidates, len(folder_labels), skipped, unreadable)
    return SuiteResult(
        suite, str(folder), images, 100.0 * top1 / images, 100.0 * topk / images, k, candidates, len(folder_labels),
        skipped, unreadable,
    )


def evaluate_suites(
    model: nn.Module,
    suites: Mapping[str, str | os.PathLike],
    class_ids: Sequence[str],
    transform: Callable | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    workers: int = 4,
) -> list[SuiteResult]:
    """Scores `model` on each suite (name → ImageFolder root). Names in `SUBSET_SUITES` get their class subset.

    `model` must already be on `device`. `class_ids` are its outputs in label order (the caption store's classes,
    or a checkpoint's `class_ids`); `transform` defaults to `eval_transform()`. Every folder is checked before any is
    scored (`check_eval_folder`, for the class folders each suite scores), so a wrong path or an empty class folder
    fails in seconds, not after an hour of ImageNet val; an unreadable image is skipped and counted, not fatal. The
    model's train/eval mode is restored.
    """
    for suite, folder in suites.items():
        class_folders(folder, suite)
    for suite, folder in suites.items():
        if suite_folder_labels(folder, class_ids, suite_classes(suite), suite)[0]:
            check_eval_folder(folder, suite, class_ids)
    transform = transform or eval_transform()
    was_training = model.training
    model.eval()
    try:
        return [
            evaluate_suite(model, suite, folder, class_ids, transform, device, batch_size, workers)
            for suite, folder in suites.items()
        ]
    finally:
        model.train(was_training)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_results(results: Sequence[SuiteResult]) -> str:
    """A plain-text table, one row per suite."""
    header = f"{'suite':<18}{'images':>9}{'top-1 %':>10}{'top-5 %':>10}  {'classes scored / candidates'}"
    lines = [header, "-" * len(header)]
    for r in results:
        note = f"{r.scored_classes} / {r.candidate_classes}"
        if r.top5_k != TOP_K:
            note += f"  (top-5 is top-{r.top5_k})"
        if r.skipped_folders:
            note += f"  ({len(r.skipped_folders)} folders skipped: classes the model lacks)"
        if r.unreadable:
            note += f"  ({len(r.unreadable)} unreadable images skipped)"
        lines.append(f"{r.suite:<18}{r.images:>9}{_percent(r.top1):>10}{_percent(r.top5):>10}  {note}")
    return "\n".join(lines)


def write_results(
    results: Sequence[SuiteResult], out: str | os.PathLike, metadata: dict | None = None
) -> tuple[Path, Path]:
    """Writes `out`.json (everything, with `metadata`) and `out`.csv (one row per suite); returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out.with_suffix(".json"), out.with_suffix(".csv")
    rows = [asdict(r) for r in results]
    # Written all or nothing: a full disk is a one-line error and leaves the previous results in place.
    atomic_write_text(json_path, json.dumps({"metadata": metadata or {}, "results": rows}, indent=2) + "\n",
                      what="results")
    # The CSV is for spreadsheets: the skipped folders (up to 990 for a small model on V2) and the unreadable images
    # become counts.
    lists = {"skipped_folders": "skipped_classes", "unreadable": "unreadable_images"}
    columns = [name for name in SuiteResult.__dataclass_fields__ if name not in lists] + list(lists.values())
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        counts = {column: len(row.pop(name)) for name, column in lists.items()}
        writer.writerow({**row, **counts})
    atomic_write_text(csv_path, text.getvalue(), what="results")
    return json_path, csv_path
