"""Caption a collection of real images into a caption store: read, batch, caption, write, report, resume.

DataLoader workers read and decode the images and run the model's image processor; the main process only moves
ready batches to the device, generates and writes. Captions are committed in transactions of `commit_every`, so a
run killed at any point loses at most the uncommitted batch, and `resume=True` captions exactly the images that
are not yet in the store.

Unreadable images are skipped and listed, with the reason, in a JSON report beside the store
(`{store}.report.json`). A class whose every image is unreadable stays in the store with no captions, so class
indices keep matching the dataset's labels; the stream never samples it, and the report and a warning name it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..prompts.classnames import readable_names
from ..safeio import atomic_write_text
from .captioners import Captioner, ImagePreprocessor
from ..imagefiles import decode_image
from .images import ImageCollection, ImageRef, Skipped, find_images
from .store import CaptionStore, CaptionStoreError, CaptionStoreWriter

log = logging.getLogger(__name__)


def report_path(store: str | os.PathLike) -> Path:
    store = Path(store)
    return store.with_name(f"{store.name}.report.json")


def default_batch_size(device: str | torch.device) -> int:
    # shared/perf/anchors.md: plain generate of BLIP-2 OPT-2.7b (fp16, H200) makes 306 images/s in batches of 256,
    # 111 in the reference batches of 65.
    return 256 if torch.device(device).type == "cuda" else 8


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


class _DecodedImages(Dataset):
    """Item i: (i, pixel tensor, None) or (i, None, why it was skipped). Runs in DataLoader workers."""

    def __init__(self, images: list[ImageRef], preprocessor: ImagePreprocessor):
        self.images = images
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        data = self.images[i].read_bytes()
        if isinstance(data, str):
            return i, None, data
        image = decode_image(data, self.preprocessor.size)
        if isinstance(image, str):
            return i, None, image
        try:
            return i, self.preprocessor(image), None
        except Exception as err:  # the model's processor may refuse a shape it was not written for
            return i, None, f"the model's image processor failed ({type(err).__name__}: {err})"


@dataclass
class _Batch:
    indices: list[int]
    pixels: torch.Tensor | None
    failed: list[tuple[int, str]]

    def pin_memory(self) -> "_Batch":
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> _Batch:
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    return _Batch(
        indices=[i for i, _ in good],
        pixels=torch.stack([pixels for _, pixels in good]) if good else None,
        failed=[(i, reason) for i, pixels, reason in items if pixels is None],
    )


@contextmanager
def _interrupt_after_block():
    """Hold Ctrl-C until the block ends, then raise it.

    A KeyboardInterrupt between the writer's puts would leave a caption without its source entry or its count
    (and a resume would then lose or duplicate an image); held back, it arrives only between whole writes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and previous is not signal.SIG_IGN:
            if callable(previous):
                previous(*received[0])
            else:
                raise KeyboardInterrupt


@dataclass
class CaptionReport:
    """What a captioning run did; written as JSON beside the store."""

    store: str
    source: str
    model: str
    complete: bool
    images_found: int
    captions_in_store: int
    captioned_this_run: int = 0
    already_in_store: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    empty_classes: list[dict] = field(default_factory=list)

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n",
                                 what="captioning report")

    def write_or_warn(self, path: str | os.PathLike) -> None:
        """Write the report on a path that is already failing (an error, Ctrl-C): a report that cannot be written
        (the disk is full) is a warning, so that the error that stopped the run is the one the user sees."""
        try:
            self.write(path)
        except Exception as err:
            log.warning("the captioning report %s could not be written: %s", path, err)


def caption_images(
    images: str | os.PathLike | ImageCollection,
    out: str | os.PathLike,
    captioner: Captioner,
    *,
    name_map: dict[str, str] | None = None,
    class_field: str = "cls",
    batch_size: int | None = None,
    num_workers: int | None = None,
    resume: bool = False,
    commit_every: int = 1024,
    progress: bool = True,
) -> CaptionReport:
    """Caption every image of `images` (ImageFolder root or WebDataset shards) into the caption store `out`.

    Returns the report, also written to `report_path(out)`. Raises `RuntimeError` if no image at all could be
    captioned (the store is then left incomplete).
    """
    collection = images if isinstance(images, ImageCollection) else find_images(images, class_field)
    out = Path(out)
    classes = list(zip(collection.class_ids, readable_names(collection.class_ids, name_map)))
    extra = {"layout": collection.layout, "captioning": captioner.settings}
    if resume:
        finished = _finished_run(collection, out, captioner.name, extra)
        if finished is not None:
            return finished
    writer = CaptionStoreWriter(
        out, classes, captioner=captioner.name, source=collection.source, resume=resume,
        commit_every=commit_every, extra=extra,
    )
    todo = [image for image in collection.images if not writer.has_source(image.key)]
    report = CaptionReport(
        store=str(out), source=collection.source, model=captioner.name, complete=False,
        images_found=len(collection.images), captions_in_store=sum(writer.counts),
        already_in_store=len(collection.images) - len(todo),
        skipped=[_skipped_entry(s, s.reason, collection) for s in collection.unusable],
    )
    if resume and report.already_in_store:
        log.info("resuming %s: %d of %d images already captioned", out, report.already_in_store, len(collection.images))
    batch_size = batch_size or default_batch_size(captioner.device)
    num_workers = default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(
        _DecodedImages(todo, captioner.preprocessor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=captioner.device.type == "cuda",
    )
    start = time.perf_counter()
    processed = 0
    try:
        with tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress, dynamic_ncols=True) as bar:
            for batch in loader:
                for i, reason in batch.failed:
                    report.skipped.append(_skipped_entry(todo[i], reason, collection))
                if batch.pixels is not None:
                    texts = captioner.caption(batch.pixels)
                    with _interrupt_after_block():
                        for i, text in zip(batch.indices, texts):
                            if text:
                                writer.add(todo[i].class_index, text, todo[i].key)
                                report.captioned_this_run += 1
                            else:
                                report.skipped.append(
                                    _skipped_entry(todo[i], "the captioner returned an empty caption", collection)
                                )
                processed += len(batch.indices) + len(batch.failed)
                bar.update(len(batch.indices) + len(batch.failed))
        _summarise(report, writer.counts, processed, start)
        report.empty_classes = _empty_classes(writer.counts, classes, collection)
        if report.captions_in_store == 0:
            raise RuntimeError(
                f"no image under {collection.source} could be captioned ({len(report.skipped)} skipped): the reasons "
                f"are in {report_path(out)}"
            )
    except BaseException:
        # Ctrl-C and errors alike: keep every caption made so far; the store stays incomplete and resumable. After a
        # failed write (a full disk) there is nothing left to commit, and the error raised is that write's.
        with _interrupt_after_block():
            writer.close_keeping()
        _summarise(report, writer.counts, processed, start)
        report.write_or_warn(report_path(out))
        raise
    with _interrupt_after_block():
        try:
            writer.finalize()
        except BaseException:
            writer.close()
            _summarise(report, writer.counts, processed, start)
            report.write_or_warn(report_path(out))
            raise
        report.complete = True
        report.write_or_warn(report_path(out))  # the captions are complete either way
    for entry in report.empty_classes:
        log.warning("class %s (%s) has no captions: %s", entry["id"], entry["name"], entry["reason"])
    return report


def _finished_run(collection: ImageCollection, out: Path, model: str, extra: dict) -> CaptionReport | None:
    """`--resume` of a store that is already complete (e.g. a run killed while it wrote its report): nothing is left
    to caption; the report is written again. None when the store is not complete (the writer resumes it)."""
    try:
        store = CaptionStore(out)
    except CaptionStoreError:
        return None  # incomplete (the usual resume), or damaged: the writer says which
    made_by = {"captioner": store.meta.get("captioner"), "extra": store.meta.get("extra", {})}
    if [c.id for c in store.classes] != collection.class_ids or made_by != {"captioner": model, "extra": extra}:
        raise ValueError(f"cannot resume {out}: it is a complete caption store made from other classes or with "
                         "other settings; write a new store")
    missing = [image for image in collection.images if not store.has_source(image.key)]
    report = CaptionReport(
        store=str(out), source=collection.source, model=model, complete=True, images_found=len(collection.images),
        captions_in_store=len(store), already_in_store=len(collection.images) - len(missing),
        skipped=[_skipped_entry(s, s.reason, collection) for s in collection.unusable]
        + [_skipped_entry(image, "not in the store: unreadable when it was captioned, or added since (caption new "
                                 "images into a new store)", collection) for image in missing],
        empty_classes=_empty_classes([c.num_captions for c in store.classes], list(zip(collection.class_ids,
                                     [c.name for c in store.classes])), collection),
    )
    log.info("%s is already complete (%d captions); its report is written again", out, len(store))
    report.write_or_warn(report_path(out))
    return report


def _skipped_entry(image: ImageRef | Skipped, reason: str, collection: ImageCollection) -> dict:
    entry = {"key": image.key, "reason": reason}
    if isinstance(image, ImageRef):
        entry["class"] = collection.class_ids[image.class_index]
    return entry


def _summarise(report: CaptionReport, counts: list[int], processed: int, start: float) -> None:
    report.elapsed_s = round(time.perf_counter() - start, 3)
    report.images_per_s = round(processed / report.elapsed_s, 2) if report.elapsed_s > 0 else 0.0
    report.captions_in_store = sum(counts)


def _empty_classes(counts: list[int], classes: list[tuple[str, str]], collection: ImageCollection) -> list[dict]:
    found = collection.images_per_class()
    return [
        {
            "index": c,
            "id": cid,
            "name": name,
            "images_found": found[c],
            "reason": (f"all {found[c]} images unreadable" if found[c]
                       else collection.unreadable_classes.get(c, "no image files found")),
        }
        for c, (cid, name) in enumerate(classes)
        if counts[c] == 0
    ]
