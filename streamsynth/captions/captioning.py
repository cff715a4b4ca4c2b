"""Caption a collection of real images into a caption store: read, batch, caption, write, report, resume.

DataLoader workers read and decode the images and run the model's image processor, every worker a share of each
batch; the main process only joins the shares on the device, generates and writes. Captions are committed in
transactions of `commit_every`, so a run killed at any point loses at most the uncommitted batch, and `resume=True`
captions exactly the images that are not yet in the store.

Unreadable images are skipped and listed, with the reason, in a JSON report beside the store
(`{store}.report.json`). A class whose every image is unreadable stays in the store with no captions, so class
indices keep matching the dataset's labels; the stream never samples it, and the report and a warning name it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .classnames import readable_names
from ..ranks import RankError, Ranks, raise_failures
from ..safeio import atomic_write_text, fsync_folder
from .captioners import Captioner, ImagePreprocessor
from ..imagefiles import decode_image
from ..limits import SharedCollate, plan_workers
from .images import ImageCollection, ImageRef, Skipped, find_images
from .store import CaptionStore, CaptionStoreError, CaptionStoreWriter, StorePart

log = logging.getLogger(__name__)


def report_path(store: str | os.PathLike) -> Path:
    store = Path(store)
    return store.with_name(f"{store.name}.report.json")


def default_batch_size(device: str | torch.device) -> int:
    """8 on the CPU; on a GPU 512 if it has at least 64 GiB, else 256.

    BLIP-2 OPT-2.7b on an H200 (fp16, 2,048 JPEGs, benchmarks/results/2026-11-27-h200-caption-bench-worker-shares-*):
    404-415 images/s in batches of 512 (33 GiB held) against 340 in batches of 256 (17 GiB) and 111 in the reference
    script's 65; 512 would not leave room for a larger captioner on a 40-48 GiB card.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    return 512 if torch.cuda.get_device_properties(device).total_memory >= 64 * 2**30 else 256


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

    @staticmethod
    def join(shares: list["_Batch"], device: torch.device) -> "_Batch":
        """One batch from its shares (in order), its pixels on `device`."""
        pixels = [share.pixels.to(device, non_blocking=True) for share in shares if share.pixels is not None]
        return _Batch(
            indices=[i for share in shares for i in share.indices],
            pixels=(pixels[0] if len(pixels) == 1 else torch.cat(pixels)) if pixels else None,
            failed=[failure for share in shares for failure in share.failed],
        )


def worker_shares(batches: list[list[int]], batch_size: int, num_workers: int) -> tuple[list[list[int]], list[int]]:
    """Each batch cut into shares of at most ceil(batch_size / num_workers) images: (the shares in order, how many
    shares each batch has).

    A DataLoader worker that decoded a whole batch alone would keep the device waiting batch_size times one image's
    decode for every batch it starts (256 JPEGs at ~6.5 ms: 1.7 s before the first caption); shared by every
    worker, a batch is ready `num_workers` times sooner. The batches themselves, and so the captions, are unchanged.
    """
    size = max(1, -(-batch_size // max(1, num_workers)))
    shares, counts = [], []
    for batch in batches:
        cut = [batch[start : start + size] for start in range(0, len(batch), size)]
        shares += cut
        counts.append(len(cut))
    return shares, counts


def _pixel_bytes(captioner: Captioner) -> int:
    """The bytes of one image as the model's processor hands it over: 3 x side x side in the processor's dtype."""
    side = captioner.preprocessor.size
    return 3 * side * side * getattr(captioner.preprocessor, "dtype", torch.float32).itemsize


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
    # Of elapsed_s, how long the captioner waited for decoded images: large means more --workers would help.
    input_wait_s: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    empty_classes: list[dict] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)  # under torchrun: what each rank did

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
    ranks: Ranks | None = None,
) -> CaptionReport:
    """Caption every image of `images` (ImageFolder root or WebDataset shards) into the caption store `out`.

    Returns the report, also written to `report_path(out)`. Raises `RuntimeError` if no image at all could be
    captioned (the store is then left incomplete).

    With `ranks` of a distributed job (torchrun), every rank must call this with the same arguments: each captions
    its share into a part of its own and rank 0 merges the parts into `out` (see `_caption_ranks`). A single process
    continues such a job's parts too, when `resume` finds them.
    """
    collection = images if isinstance(images, ImageCollection) else find_images(images, class_field)
    out = Path(out)
    classes = list(zip(collection.class_ids, readable_names(collection.class_ids, name_map)))
    extra = {"layout": collection.layout, "captioning": captioner.settings}
    batch_size = batch_size or default_batch_size(captioner.device)
    num_workers = default_num_workers() if num_workers is None else num_workers
    ranks = ranks or Ranks()
    if ranks.distributed or parts_folder(out).exists():
        return _caption_ranks(collection, out, captioner, ranks, classes, extra, batch_size=batch_size,
                              num_workers=num_workers, resume=resume, commit_every=commit_every, progress=progress)
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
    tally = _Tally()
    try:
        _caption_batches(todo, None, collection, captioner, writer, report, tally, batch_size=batch_size,
                         num_workers=num_workers, progress=progress)
        _summarise(report, writer.counts, tally)
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
        _summarise(report, writer.counts, tally)
        report.write_or_warn(report_path(out))
        raise
    with _interrupt_after_block():
        try:
            writer.finalize()
        except BaseException:
            writer.close()
            _summarise(report, writer.counts, tally)
            report.write_or_warn(report_path(out))
            raise
        report.complete = True
        report.write_or_warn(report_path(out))  # the captions are complete either way
    for entry in report.empty_classes:
        log.warning("class %s (%s) has no captions: %s", entry["id"], entry["name"], entry["reason"])
    return report


@dataclass
class _Tally:
    """How far a run got: images read (captioned or skipped) since `start`."""

    processed: int = 0
    start: float = field(default_factory=time.perf_counter)
    input_wait_s: float = 0.0  # the main process waiting for decoded images (the device idle meanwhile)


def _caption_batches(
    todo: list[ImageRef], batches: list[list[int]] | None, collection: ImageCollection, captioner: Captioner,
    writer: CaptionStoreWriter, report: CaptionReport, tally: _Tally, *, batch_size: int, num_workers: int,
    progress: bool, desc: str = "captioning", rank: int | None = None,
) -> None:
    """Caption `todo` into `writer`: in consecutive batches of `batch_size`, or in the given `batches` (lists of
    indices into `todo`). Skipped images go to the report (with `rank`, if given)."""
    if batches is None:
        batches = [list(range(start, min(start + batch_size, len(todo)))) for start in range(0, len(todo), batch_size)]
    plan = plan_workers(num_workers if todo else 0, lambda w: -(-batch_size // w) * _pixel_bytes(captioner),
                        held=lambda w: w + 1, what="caption: decoding images",
                        fewer="a smaller --batch-size")
    shares, shares_per_batch = worker_shares(batches, batch_size, plan.workers)
    loader = DataLoader(
        _DecodedImages(todo, captioner.preprocessor),
        batch_sampler=shares,
        collate_fn=SharedCollate(_collate),
        pin_memory=captioner.device.type == "cuda",
        **plan.loader_options(),
    )

    def joined_batches():
        arriving = iter(loader)
        for count in shares_per_batch:
            waited = time.perf_counter()
            batch_shares = [next(arriving) for _ in range(count)]
            tally.input_wait_s += time.perf_counter() - waited
            yield _Batch.join(batch_shares, captioner.device)

    def skip(i: int, reason: str) -> None:
        # Said as it happens too, by the rank that met it: under torchrun the report comes only at the end.
        log.warning("%sskipped %s of %s: %s", "" if rank is None else f"rank {rank}: ", todo[i].key,
                    collection.source, reason)
        report.skipped.append(_skipped_entry(todo[i], reason, collection, rank))

    with tqdm(total=len(todo), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch in joined_batches():
            for i, reason in batch.failed:
                skip(i, reason)
            if batch.pixels is not None:
                texts = captioner.caption(batch.pixels)
                with _interrupt_after_block():
                    for i, text in zip(batch.indices, texts):
                        if text:
                            writer.add(todo[i].class_index, text, todo[i].key)
                            report.captioned_this_run += 1
                        else:
                            skip(i, "the captioner returned an empty caption")
            tally.processed += len(batch.indices) + len(batch.failed)
            bar.update(len(batch.indices) + len(batch.failed))


# ----- several ranks (torchrun): one part per rank, merged into one store ------------------------------------------


def parts_folder(store: str | os.PathLike) -> Path:
    """Where the ranks of a distributed run keep their parts until the merge: `{store}.parts` beside the store."""
    store = Path(store)
    return store.with_name(f"{store.name}.parts")


def _part_path(parts: Path, rank: int) -> Path:
    return parts / f"part-{rank:05d}.lmdb"


def _merging_path(store: Path) -> Path:
    return store.with_name(f".{store.name}.merging")


def listing_digest(collection: ImageCollection) -> str:
    """A digest of what `--images` lists (classes, image keys and their classes, unusable entries): every rank of a
    job must see the same listing, or their shares would overlap or leave gaps."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([collection.layout, collection.class_ids]).encode())
    for image in collection.images:
        h.update(f"{image.class_index}\0{image.key}\0".encode("utf-8", "surrogateescape"))
    for skipped in collection.unusable:
        h.update(f"!{skipped.key}\0".encode("utf-8", "surrogateescape"))
    return f"{len(collection.images)} images, digest {h.hexdigest()}"


def rank_batches(num_images: int, batch_size: int, rank: int, world: int) -> list[range]:
    """The batches of rank `rank`: the listing cut into consecutive batches of `batch_size` images, as one process
    batches it, dealt round-robin (batch j to rank j mod world). Each batch therefore holds the very images it holds
    in a single-process run, so a batch-dependent model (fp16 kernels choose by shape) still captions alike."""
    return [range(start, min(start + batch_size, num_images))
            for start in range(rank * batch_size, num_images, world * batch_size)]


def _caption_ranks(
    collection: ImageCollection, out: Path, captioner: Captioner, ranks: Ranks, classes: list[tuple[str, str]],
    extra: dict, *, batch_size: int, num_workers: int, resume: bool, commit_every: int, progress: bool,
) -> CaptionReport:
    """Caption with every rank of a job: one store, the same as a single process makes.

    1. Every rank lists `--images` itself; the listings must agree (a digest is compared).
    2. Rank r captions the batches r, r + W, ... of the listing (`rank_batches`) into its own part,
       `{out}.parts/part-{r}.lmdb`, a resumable store that is never marked complete. On `--resume` an image that any
       part holds is not captioned again, so a job resumes per rank, on any number of ranks.
    3. When every rank is done, rank 0 writes the store from the parts in listing order (the order, and so the
       caption indices, of an uninterrupted single-process run) under a hidden name, marks it complete and renames
       it to `out`: no reader ever sees a partial store. Then the parts are removed.
    A rank that fails (a full disk) or is interrupted keeps what it committed; the others finish their share; every
    rank then ends with the same error naming the failed rank, and `--resume` continues.
    """
    parts = parts_folder(out)
    kept = f"every rank's committed captions are kept in {parts} for --resume"
    # What every rank lists, and what is on disk before any rank writes: all decide on rank 0's view of the disk.
    states = ranks.gather({"listing": listing_digest(collection), "store": (out / "data.mdb").exists()
                           or (out.exists() and not out.is_dir()), "parts": parts.exists()})
    differing = [r for r, state in enumerate(states) if state["listing"] != states[0]["listing"]]
    if differing:
        raise RankError(f"--images {collection.source} lists other images on rank {differing[0]} "
                        f"({states[differing[0]]['listing']}) than on rank 0 ({states[0]['listing']}): every rank must "
                        "see the same images (a shared file system, or identical copies at the same path)")
    if states[0]["store"]:
        if not resume:
            raise FileExistsError(f"{out} already exists: pass --resume to continue it, or choose a new output path "
                                  "(streamsynth never overwrites captions)")
        return _finished_ranks(collection, out, captioner.name, extra, ranks)
    if states[0]["parts"] and not resume:
        raise FileExistsError(f"{parts} holds the parts of an interrupted run: continue it with --resume, or remove "
                              "it to start afresh")

    # Which of this rank's images are still to caption: those that no part holds (parts are only read here).
    error, todo, batches, done = None, [], [], 0
    try:
        parts.mkdir(parents=True, exist_ok=True)
        mine = rank_batches(len(collection.images), batch_size, ranks.rank, ranks.world)
        readers = _open_parts(parts, captioner.name, extra)
        try:
            for block in mine:
                left = [i for i in block if not any(r.has(collection.images[i].key) for r in readers)]
                done += len(block) - len(left)
                if left:
                    batches.append(list(range(len(todo), len(todo) + len(left))))
                    todo.extend(collection.images[i] for i in left)
        finally:
            for reader in readers:
                reader.close()
    except Exception as err:
        error = err
    ranks.agree(error)

    report = CaptionReport(
        store=str(out), source=collection.source, model=captioner.name, complete=False,
        images_found=len(collection.images), captions_in_store=0, already_in_store=done,
    )
    if resume and done:
        log.info("%s: resuming %s: %d of this rank's images already captioned", ranks.label, out, done)
    tally, writer, error, counts = _Tally(), None, None, [0] * len(classes)
    try:
        if todo:
            writer = CaptionStoreWriter(_part_path(parts, ranks.rank), classes, captioner=captioner.name,
                                        source=collection.source, resume=True, commit_every=commit_every, extra=extra)
        desc = f"captioning ({ranks.label})" if ranks.distributed else "captioning"
        _caption_batches(todo, batches, collection, captioner, writer, report, tally, batch_size=batch_size,
                         num_workers=num_workers, progress=progress and ranks.is_main, desc=desc,
                         rank=ranks.rank if ranks.distributed else None)
    except KeyboardInterrupt:
        if writer is not None:
            with _interrupt_after_block():
                writer.close_keeping()
        raise  # the other ranks are stopped too (torchrun), or notice this one's end at their next sync
    except Exception as err:
        error = err
    if writer is not None:
        with _interrupt_after_block():
            commit_error = writer.close_keeping()
        error = error or commit_error
        counts = writer.counts
    _summarise(report, counts, tally)
    outcomes = ranks.outcomes(error, captioned=report.captioned_this_run, already=report.already_in_store,
                              processed=tally.processed, elapsed_s=report.elapsed_s, skipped=report.skipped,
                              input_wait_s=report.input_wait_s, device=str(captioner.device))

    # Rank 0 writes the report and, if every rank succeeded, the store; the others learn the result.
    report = CaptionReport(**ranks.from_main(lambda: _merge_and_report(
        collection, out, parts, classes, captioner.name, extra, outcomes, kept, commit_every)))
    for entry in report.empty_classes if ranks.is_main else ():
        log.warning("class %s (%s) has no captions: %s", entry["id"], entry["name"], entry["reason"])
    return report


def _open_parts(parts: Path, model: str, extra: dict) -> list[StorePart]:
    """Readers of every part in `parts` that holds data; a part made with other settings is refused."""
    readers: list[StorePart] = []
    try:
        for path in sorted(parts.glob("part-*.lmdb")):
            if not (path / "data.mdb").exists():
                continue  # created by a rank that died before its first commit
            reader = StorePart(path)
            readers.append(reader)
            made_by = {"captioner": reader.meta.get("captioner"), "extra": reader.meta.get("extra", {})}
            if made_by != {"captioner": model, "extra": extra}:
                raise ValueError(f"cannot resume {parts}: {path.name} was captioned with {made_by}, this run uses "
                                 f"{ {'captioner': model, 'extra': extra} }; resume with the same model and settings, "
                                 "or remove the folder to start afresh")
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def _merge_and_report(collection: ImageCollection, out: Path, parts: Path, classes: list[tuple[str, str]],
                      model: str, extra: dict, outcomes: list[dict], kept: str, commit_every: int) -> dict:
    """Rank 0's last step: the report of every rank, and, if none failed, the merged store. Returns the report
    as a dict (for the broadcast); raises the `RankError` of the ranks that failed, if any."""
    report = CaptionReport(
        store=str(out), source=collection.source, model=model, complete=False,
        images_found=len(collection.images), captions_in_store=0,
        captioned_this_run=sum(o["captioned"] for o in outcomes),
        already_in_store=sum(o["already"] for o in outcomes),
        elapsed_s=max(o["elapsed_s"] for o in outcomes),
        input_wait_s=max(o["input_wait_s"] for o in outcomes),
        skipped=[_skipped_entry(s, s.reason, collection) for s in collection.unusable]
        + [entry for o in outcomes for entry in o["skipped"]],
        ranks=[{"rank": o["rank"], "host": o["host"], "device": o["device"], "captioned_this_run": o["captioned"],
                "already_in_store": o["already"], "skipped": len(o["skipped"]), "elapsed_s": o["elapsed_s"],
                "images_per_s": round(o["processed"] / o["elapsed_s"], 2) if o["elapsed_s"] > 0 else 0.0,
                "input_wait_s": o["input_wait_s"], "error": o["error"]} for o in outcomes],
    )
    if report.elapsed_s > 0:
        report.images_per_s = round(sum(o["processed"] for o in outcomes) / report.elapsed_s, 2)
    failed = [o for o in outcomes if o["error"]]
    if failed:
        report.write_or_warn(report_path(out))
        raise_failures(outcomes, kept)
    counts = _merge_parts(collection, out, parts, classes, model, extra, commit_every)
    report.captions_in_store = sum(counts)
    report.empty_classes = _empty_classes(counts, classes, collection)
    report.complete = True
    report.write_or_warn(report_path(out))
    return asdict(report)


def _merge_parts(collection: ImageCollection, out: Path, parts: Path, classes: list[tuple[str, str]], model: str,
                 extra: dict, commit_every: int) -> list[int]:
    """Write the store `out` from the parts, in listing order, under a hidden name, then rename it into place; the
    parts are removed once the store is there. Returns the captions per class."""
    merging = _merging_path(out)
    shutil.rmtree(merging, ignore_errors=True)  # left by a merge that was killed
    readers = _open_parts(parts, model, extra)
    try:
        writer = CaptionStoreWriter(merging, classes, captioner=model, source=collection.source,
                                    commit_every=max(commit_every, 4096), extra=extra)
        try:
            for image in collection.images:
                for reader in readers:
                    found = reader.caption_of(image.key)
                    if found is not None:
                        writer.add(image.class_index, found[1], image.key)
                        break
            counts = writer.counts
            if sum(counts) == 0:
                raise RuntimeError(f"no image under {collection.source} could be captioned: the reasons are in "
                                   f"{report_path(out)}")
            writer.finalize()
        except BaseException:
            writer.close()
            raise
    except BaseException:
        shutil.rmtree(merging, ignore_errors=True)
        raise
    finally:
        for reader in readers:
            reader.close()
    os.rename(merging, out)
    fsync_folder(out.parent)
    shutil.rmtree(parts, ignore_errors=True)
    return counts


def _finished_ranks(collection: ImageCollection, out: Path, model: str, extra: dict, ranks: Ranks) -> CaptionReport:
    """`--resume` of a distributed run whose store is already merged (killed while it removed its parts or wrote its
    report): rank 0 writes the report again and removes the parts; every rank returns that report."""
    def rewrite_report() -> dict:
        report = _finished_run(collection, out, model, extra)
        if report is None:
            raise CaptionStoreError(f"{out} is an incomplete store of a single-process run: resume it with one "
                                    "process (without torchrun), or caption into a new --out")
        shutil.rmtree(parts_folder(out), ignore_errors=True)
        return asdict(report)

    return CaptionReport(**ranks.from_main(rewrite_report))


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


def _skipped_entry(image: ImageRef | Skipped, reason: str, collection: ImageCollection,
                   rank: int | None = None) -> dict:
    entry = {"key": image.key, "reason": reason}
    if isinstance(image, ImageRef):
        entry["class"] = collection.class_ids[image.class_index]
    if rank is not None:
        entry["rank"] = rank  # which rank of a distributed run met it (its log says more)
    return entry


def _summarise(report: CaptionReport, counts: list[int], tally: _Tally) -> None:
    report.elapsed_s = round(time.perf_counter() - tally.start, 3)
    report.images_per_s = round(tally.processed / report.elapsed_s, 2) if report.elapsed_s > 0 else 0.0
    report.captions_in_store = sum(counts)
    report.input_wait_s = round(tally.input_wait_s, 3)


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
