"""`streamsynth generate`: write the very images the stream makes to WebDataset shards (or an ImageFolder), offline,
on one process or on every rank of a torchrun job.

What is made is a set of the stream's sample ids, and each is made by the stream's own code
(`SyntheticStream.make_samples`: the same sampler, prompts, seeds and generator loop), so sample id i offline is the
image the stream makes online for i (bitwise when the generator batches it alike, else within float rounding):

- `--passes P` (default 1): sample ids 0 .. P·N−1 for N captions, one image per caption per pass, exactly the first
  P·N samples an online run (replay 1, no class weights) makes;
- `--images-per-class N`: for each class, the first N sample ids of the stream's sequence that fall in that class
  (`CaptionSampler.class_sample_ids`): every caption of the class serves N // n or N // n + 1 images, and each
  image is still the stream's image for its id. They are stored in class-interleaved order (the j-th image of every
  class, then the (j+1)-th), so every shard is class-balanced.

The ids, in that order, are cut into units of `--shard-size`; unit k is one shard named by run seed and first sample
id, written by `stream.cache.write_group` exactly as the online cache writes its shards (under a hidden name, renamed
when complete). Rank r of W writes units r, r + W, ...; within a rank, units are dealt to one worker process per
synthesis device. A unit whose shard exists is never made again, so a killed run resumes (`--resume`) on any number
of ranks without rewriting a finished shard. `OUT/generate.json` records what the set is made of (seed, prompt,
model, synthesis options, selection, shard size); a resume with other settings is refused. In ImageFolder form a unit
is `OUT/{class id}/{sample id}.png|jpg` files and a `metadata-{first id}.jsonl` of their records, written last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import StreamsynthError, one_line
from . import options
from .args import positive_int
from ..ranks import RankError, Ranks, raise_failures, ranks_from_environment
from ..safeio import atomic_write, atomic_write_text, disk_full_error, is_full_errno, output_folder
from ..stream.cache import CLASSES_FILE, shard_name, write_cache_classes, write_group
from ..stream.dataset import SyntheticStream
from ..stream.devices import rank_share
from ..stream.sampling import CaptionSampler, SampleSpec
from ..synth.loading import resolve_dtype
from ..synth.tiny import RANDOM_WEIGHTS_NOTICE

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "imagefolder")
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
MANIFEST = "generate.json"
REPORT = "generate-report.json"
MANIFEST_VERSION = 1
DEFAULT_SHARD_SIZE = 1000


class GenerateError(StreamsynthError, RuntimeError):
    """An offline generation run cannot start or continue; the message names the folder or setting and the fix."""


# ----- which sample ids, in which order, in which units ------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The sample ids an offline run makes, in their stored order, cut into units of `unit_size` (shards)."""

    ids: Sequence[int]
    unit_size: int
    describe: dict  # how the ids were chosen, for the manifest
    empty_classes: tuple[str, ...] = ()  # classes without captions, hence without images

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_units(self) -> int:
        return -(-len(self.ids) // self.unit_size)

    def unit(self, k: int) -> Sequence[int]:
        return self.ids[k * self.unit_size:(k + 1) * self.unit_size]

    def rank_units(self, rank: int, world: int) -> range:
        """Unit indices of rank `rank` of `world`: dealt round-robin, so no two ranks share one."""
        return range(rank, self.num_units, world)


def select_passes(num_captions: int, passes: int, unit_size: int) -> Selection:
    """One image per caption per pass: the stream's sample ids 0 .. passes·N − 1."""
    if passes < 1:
        raise ValueError(f"--passes must be at least 1, got {passes}")
    return Selection(range(passes * num_captions), unit_size, {"passes": passes})


def select_per_class(sampler: CaptionSampler, class_ids: Sequence[str], images_per_class: int,
                     unit_size: int) -> Selection:
    """`images_per_class` images of every class that has captions: each class's first sample ids of the stream's
    sequence, stored class-interleaved (image j of every class, then image j + 1)."""
    if images_per_class < 1:
        raise ValueError(f"--images-per-class must be at least 1, got {images_per_class}")
    per_class = [sampler.class_sample_ids(c, images_per_class) for c in range(len(class_ids))]
    empty = tuple(cid for cid, ids in zip(class_ids, per_class) if not ids)
    ids = [ids[j] for j in range(images_per_class) for ids in per_class if ids]
    return Selection(ids, unit_size, {"images_per_class": images_per_class}, empty)


# ----- writing one unit --------------------------------------------------------------------------------------------


def unit_marker(out: Path, fmt: str, seed: int, first_id: int) -> Path:
    """The file whose presence says unit (first sample id) is complete: its shard, or its ImageFolder metadata."""
    if fmt == "webdataset":
        return out / shard_name(seed, first_id)
    return out / f"metadata-{first_id:012d}.jsonl"


def _write_imagefolder(out: Path, class_ids: Sequence[str], specs: Sequence[SampleSpec], images: torch.Tensor,
                       image_format: str, marker: Path) -> None:
    """One unit as image files under OUT/{class id}/, each written all or nothing, then its metadata (last, so that
    its presence means every image of the unit is there). A class id that is not a plain folder name, or a class
    folder that is a symbolic link, is refused before anything is written (`safeio.output_folder`): nothing lands
    outside OUT."""
    from io import BytesIO

    from PIL import Image

    extension = "jpg" if image_format == "jpeg" else "png"
    folders = {label: output_folder(out, class_ids[label]) for label in sorted({spec.label for spec in specs})}
    records = []
    for spec, image in zip(specs, images):
        path = folders[spec.label] / f"{spec.sample_id:012d}.{extension}"
        buffer = BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(
            buffer, IMAGE_FORMATS[image_format], **({"quality": 95} if image_format == "jpeg" else {}))
        atomic_write(path, lambda f, data=buffer.getvalue(): f.write(data), what="generated image",
                     kept="the units written before are kept", fix="free some space and continue with --resume")
        records.append({"file": path.relative_to(out).as_posix(), "sample_id": spec.sample_id, "seed": spec.seed,
                        "prompt": spec.prompt, "caption": spec.caption, "class_id": class_ids[spec.label],
                        "label": spec.label})
    atomic_write_text(marker, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                      what="generated metadata", kept="the units written before are kept",
                      fix="free some space and continue with --resume")


@dataclass
class _Job:
    """What a worker needs to make and write units: picklable, so it crosses into spawned (CUDA) workers."""

    stream: SyntheticStream
    out: str
    fmt: str
    image_format: str
    units: list[tuple[int, list[int]]]  # (unit index, sample ids)


class _Units(IterableDataset):
    """Worker w of W makes units w, w + W, ... of its rank's list, and yields one record per unit (or an error,
    as a value, after which it stops)."""

    def __init__(self, job: _Job):
        self.job = job

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        job, out = self.job, Path(self.job.out)
        stream = job.stream
        for k, ids in job.units[worker::workers]:
            marker = unit_marker(out, job.fmt, stream.layout.seed, ids[0])
            try:
                specs, images = stream.make_samples(ids, worker)
                if job.fmt == "webdataset":
                    write_group(out, stream.class_ids, specs, images, stream.layout.seed)
                else:
                    _write_imagefolder(out, stream.class_ids, specs, images, job.image_format, marker)
            except Exception as err:
                yield {"error": f"making {marker.name} ({len(ids)} samples from id {ids[0]}): {one_line(err)}"}
                return
            yield {"unit": k, "images": len(ids)}


def _remove_temporaries(out: Path, names: set[str]) -> None:
    """Hidden temporary files of these shards left by a killed writer (`.{shard}.{host}-{pid}.tmp`, named by the
    process that wrote it, so never reused: `safeio.temporary_path`): this rank owns the shards now, so nothing else is writing them. (The temporary
    files of an ImageFolder's files have fixed names and are overwritten when their unit is made again.)"""
    try:
        entries = os.listdir(out)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(".") and entry.endswith(".tmp") and entry[1:-4].rsplit(".", 1)[0] in names:
            try:
                os.unlink(out / entry)
            except OSError:
                pass


# ----- the run ------------------------------------------------------------------------------------------------------


@dataclass
class GenerateSummary:
    """What a run wrote, over all ranks; written to OUT/generate-report.json."""

    out: str
    format: str
    images_in_set: int
    units_in_set: int
    images_written: int = 0
    units_written: int = 0
    units_already_there: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    ranks: list[dict] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


def generate(stream: SyntheticStream, out: str | os.PathLike, selection: Selection, *, fmt: str = "webdataset",
             image_format: str = "png", resume: bool = False, ranks: Ranks | None = None, progress: bool = True,
             manifest_extra: dict | None = None) -> GenerateSummary:
    """Make the `selection` of `stream`'s samples into `out`, this rank's share of it (every rank calls this with
    the same arguments). Returns the summary over all ranks."""
    ranks = ranks or Ranks()
    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {FORMATS}")
    manifest = {
        "version": MANIFEST_VERSION, "format": fmt, "image_format": image_format if fmt == "imagefolder" else "png",
        "seed": stream.layout.seed, "prompt": stream.sampler.template.template,
        "generator": stream.generator.identity(),
        "captions": {"class_ids": stream.class_ids, "num_captions": stream.sampler.num_captions,
                     "captioner": stream.store.meta.get("captioner"), "created": stream.store.meta.get("created")},
        "selection": selection.describe, "shard_size": selection.unit_size, "num_samples": len(selection),
        **(manifest_extra or {}),
    }
    manifest = json.loads(json.dumps(manifest))  # as a resume reads it back (tuples become lists)

    # 1. Every rank means the same set, and all decide on rank 0's view of the folder, before anyone writes.
    states = ranks.gather({"manifest": manifest, "found": _folder_state(out)})
    if any(state["manifest"] != states[0]["manifest"] for state in states):
        bad = next(r for r, state in enumerate(states) if state["manifest"] != states[0]["manifest"])
        raise RankError(f"rank {bad} was started with other settings than rank 0 "
                        f"({_differences(states[0]['manifest'], states[bad]['manifest'])}): start every rank with "
                        "the same command")
    found = states[0]["found"]
    error = None
    try:
        _check_folder(out, found, manifest, resume)
        if ranks.is_main:
            _write_folder_files(out, manifest, stream.class_ids)
    except Exception as err:
        error = err
    ranks.agree(error)
    if not (out / MANIFEST).exists():  # a folder local to this node: each node records the set too
        _write_folder_files(out, manifest, stream.class_ids)

    # 2. This rank's units that are not there yet.
    seed = stream.layout.seed
    mine = selection.rank_units(ranks.rank, ranks.world)
    units = [(k, list(selection.unit(k))) for k in mine]
    todo = [(k, ids) for k, ids in units if not unit_marker(out, fmt, seed, ids[0]).exists()]
    _remove_temporaries(out, {unit_marker(out, fmt, seed, ids[0]).name for _, ids in todo})
    images_todo = sum(len(ids) for _, ids in todo)
    if resume and len(todo) < len(units):
        log.info("%s: %d of this rank's %d units are already in %s", ranks.label, len(units) - len(todo), len(units),
                 out)

    devices = rank_share(stream.generator.devices)  # one worker process per device of this rank
    workers = min(len(devices), len(todo)) if len(devices) > 1 else 0
    jobs = _Units(_Job(stream, str(out), fmt, image_format, todo))
    records = jobs if workers == 0 else DataLoader(
        jobs, batch_size=None, num_workers=workers,
        multiprocessing_context="spawn" if stream.generator.uses_cuda else None)
    start, written, images, error = time.perf_counter(), 0, 0, None
    desc = f"generate ({ranks.label})" if ranks.distributed else "generate"
    from tqdm.auto import tqdm

    try:
        with tqdm(total=images_todo, unit="img", desc=desc, disable=not (progress and ranks.is_main),
                  dynamic_ncols=True) as bar:
            for record in records:
                if "error" in record:
                    error = GenerateError(record["error"])
                    break
                written += 1
                images += record["images"]
                bar.update(record["images"])
    except KeyboardInterrupt:
        raise  # finished units are on disk; the others are redone by --resume
    except Exception as err:
        error = err
    elapsed = time.perf_counter() - start
    outcomes = ranks.outcomes(error, units=len(units), written=written, images=images, already=len(units) - len(todo),
                              elapsed_s=round(elapsed, 3), devices=list(devices))
    summary = GenerateSummary(
        out=str(out), format=fmt, images_in_set=len(selection), units_in_set=selection.num_units,
        images_written=sum(o["images"] for o in outcomes), units_written=sum(o["written"] for o in outcomes),
        units_already_there=sum(o["already"] for o in outcomes), elapsed_s=max(o["elapsed_s"] for o in outcomes),
        ranks=[{k: o[k] for k in ("rank", "host", "devices", "units", "written", "images", "elapsed_s", "error")}
               | {"images_per_s": round(o["images"] / o["elapsed_s"], 2) if o["elapsed_s"] > 0 else 0.0}
               for o in outcomes],
        empty_classes=list(selection.empty_classes),
    )
    if summary.elapsed_s > 0:
        summary.images_per_s = round(summary.images_written / summary.elapsed_s, 2)
    if ranks.is_main:
        try:
            atomic_write_text(out / REPORT, json.dumps(asdict(summary), indent=1) + "\n", what="generate report")
        except Exception as err:
            log.warning("%s could not be written: %s", out / REPORT, err)
    kept = f"what is finished is kept in {out}: continue with the same command and --resume"
    if ranks.distributed:
        raise_failures(outcomes, kept)
    elif error is not None:
        raise GenerateError(f"{one_line(error)}; {kept}") from error
    return summary


def _folder_state(out: Path) -> dict:
    """What `out` holds now: its manifest (None if none) and whether it holds shards or images without one."""
    state = {"exists": out.exists(), "manifest": None, "other": False}
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            state["manifest"] = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            state["manifest"] = {"unreadable": f"{err}"}
    elif out.is_dir():
        try:
            state["other"] = any(not name.startswith(".") and name not in (CLASSES_FILE, REPORT)
                                 for name in os.listdir(out))
        except OSError as err:
            state["other"] = f"cannot list it ({err.strerror or err})"
    return state


def _differences(saved: dict, now: dict) -> str:
    keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return ", ".join(f"{k} was {json.dumps(saved.get(k))[:80]}, now {json.dumps(now.get(k))[:80]}" for k in keys)


def _check_folder(out: Path, found: dict, manifest: dict, resume: bool) -> None:
    if found["manifest"] is not None:
        if not resume:
            raise GenerateError(f"{out} already holds a generated set: continue it with --resume, or choose a new "
                                "--out")
        if found["manifest"] != manifest:
            raise GenerateError(f"cannot resume {out}: it was generated with other settings "
                                f"({_differences(found['manifest'], manifest)}); resume with the same settings, or "
                                "choose a new --out")
    elif found["other"]:
        what = found["other"] if isinstance(found["other"], str) else "it holds files that generate did not write"
        raise GenerateError(f"--out {out}: {what}; give an empty or new folder")


def _write_folder_files(out: Path, manifest: dict, class_ids: Sequence[str]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MANIFEST).exists():  # several ranks may write it at once (each node's into a node-local --out)
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                              what="generated set", shared=True)
        write_cache_classes(out, class_ids)  # what train.py --from-cache labels by
    except OSError as err:
        if is_full_errno(err):
            raise disk_full_error(out, "generated set") from None
        raise


# ----- the command --------------------------------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="write the images the stream makes to WebDataset shards or an ImageFolder, offline, on any number of "
             "ranks (torchrun)",
        description="Make a fixed synthetic dataset: the stream's own samples (the same flags and defaults as "
                    "train.py, so the same seed, prompt, model and synthesis options give the same images), one image "
                    "per caption per pass or N per class, as WebDataset shards (train with `train.py --from-cache "
                    "OUT`) or an ImageFolder. Under torchrun the ranks split the shards; a killed run continues with "
                    "--resume.",
    )
    options.add_config_options(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the shards (or the ImageFolder tree) and generate-report.json")
    options.add_source_options(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--passes", type=positive_int, default=1,
                       help="images per caption: sample ids 0 .. passes x captions - 1")
    which.add_argument("--images-per-class", type=positive_int, metavar="N",
                       help="N images of every class: its first N sample ids of the stream (captions cycled)")
    p.add_argument("--format", choices=FORMATS, default="webdataset",
                   help="webdataset: tar shards as train.py --cache writes them; imagefolder: OUT/{class id}/*.png")
    p.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), default="png",
                   help="file format of an ImageFolder (shards always hold PNG)")
    p.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                   help="samples per shard (per unit of work)")
    options.add_sampler_options(p)
    options.add_generator_options(p, devices_help="'auto' (every local GPU, split among local ranks) or a "
                                  "comma-separated list, one worker process each (default: this rank's GPU, else the "
                                  "CPU)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate, parser=p)


def _generate(args: argparse.Namespace) -> int:
    args = options.resolve(args)
    if args.print_config:
        options.print_config(args)
        return 0
    with ranks_from_environment() as ranks:
        model, captions = options.source_paths(args)
        generator = options.generator_config(args, model, options.node_devices(args.synth_devices))
        devices = rank_share(generator.devices)
        stream = SyntheticStream(captions, generator, prompt=args.prompt, seed=args.seed, rank=0, world_size=1)
        if args.images_per_class:
            selection = select_per_class(stream.sampler, stream.class_ids, args.images_per_class, args.shard_size)
        else:
            selection = select_passes(stream.sampler.num_captions, args.passes, args.shard_size)
        if ranks.is_main:
            for cid in selection.empty_classes:
                log.warning("class %s has no captions: no image of it is generated", cid)
        try:
            summary = generate(stream, args.out, selection, fmt=args.format, image_format=args.image_format,
                               resume=args.resume, ranks=ranks, progress=not args.no_progress,
                               manifest_extra={"dtype": _dtype_name(args.dtype, devices[0])})
        except KeyboardInterrupt:
            print(f"interrupted: the finished units are kept in {args.out}; continue with the same command and "
                  "--resume", file=sys.stderr)
            return 130
        if ranks.is_main:
            per_rank = ", ".join(f"rank {r['rank']}: {r['images_per_s']}/s on {','.join(r['devices'])}"
                                 for r in summary.ranks)
            print(f"wrote {summary.images_written} images in {summary.units_written} "
                  f"{'shards' if args.format == 'webdataset' else 'units'} to {args.out} "
                  f"({summary.units_already_there} of {summary.units_in_set} were there already) in "
                  f"{summary.elapsed_s:.1f} s: {summary.images_per_s} images/s"
                  + (f" ({per_rank})" if ranks.distributed else f" on {','.join(devices)}"))
            if args.format == "webdataset":
                print(f"train on them: python train.py --from-cache {args.out} --seed {args.seed} ...")
            if generator.random_weights:
                print(f"NOTE: {RANDOM_WEIGHTS_NOTICE}")
    return 0


def _dtype_name(dtype: str | None, device: str) -> str:
    """The dtype the images are made in (part of what the set is): fp16 on CUDA and fp32 elsewhere by default."""
    return str(resolve_dtype(dtype, torch.device(device))).removeprefix("torch.")
