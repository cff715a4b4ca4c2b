r"""Train an image classifier on an endless stream of Caption-in-Prompt synthetic images.

    python train.py --online-synthesis                       # embedded default: tiny digits generator, CPU-sized run
    python train.py --online-synthesis --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --captions imagenet-captions.lmdb --model resnet50 --epochs 90 --synth-devices auto --speed fast --replay 4 \
        --imagenet-val /data/imagenet/val --imagenet-r /data/imagenet-r --imagenet-a /data/imagenet-a
    python train.py --train-dir /data/imagenet/train --imagenet-val /data/imagenet/val   # the real-data baseline
    python train.py ... --out runs/r50 --resume       # continue from runs/r50/checkpoint.pt
    python train.py --config runs/r50/run.json --out runs/r50-again   # the same run again
    torchrun --nproc_per_node=4 train.py --online-synthesis ...   # DDP: each rank has its own synthesis workers

One file, top to bottom: arguments, the data, the model, the loop, checkpoints, the evaluation. Also installed as
`streamsynth train`.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from streamsynth import StreamLoader, SyntheticStream
from streamsynth.captions import CaptionStore
from streamsynth.classifier.checkpoints import check_checkpoint_room, load_resume_checkpoint, save_checkpoint
from streamsynth.classifier.evaluate import (LabelledImageFolder, check_eval_folder, class_folders, eval_transform,
                                             evaluate_suites, format_results, suite_folder_labels, write_results)
from streamsynth.classifier.models import (build_classifier, classifier_checkpoint, default_warmup, learning_rate,
                                          sgd_optimizer)
from streamsynth.classifier.recipe import DEFAULT_LABEL_SMOOTHING, DEFAULT_WEIGHT_DECAY
from streamsynth.commands import options
from streamsynth.commands.args import (ArgumentParser, add_eval_suites, add_version, device_name, eval_suites, fraction,
                                       nonnegative_float, nonnegative_int, positive_float, positive_int, resolve_device,
                                       version)
from streamsynth.digits.data import CLASS_IDS as DIGIT_CLASS_IDS, report_held_out_digits
from streamsynth.digits.embedded import EMBEDDED_DEFAULT_NOTICE
from streamsynth.errors import StreamsynthError, one_line
from streamsynth.safeio import atomic_write, atomic_write_text, open_append
from streamsynth.stream import CachedBatches, EpochsInARow, MixedBatches, RealBatches, mix_weights
from streamsynth.stream.devices import synthesis_devices
from streamsynth.stream.feedback import PREFER, ClassFeedback
from streamsynth.stream.selection import SCORES, UncertaintySelection
from streamsynth.stream.steering import CaptionFeedback, Steering
from streamsynth.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, train_transform

log = logging.getLogger("train")

CHECKPOINT_FORMAT = 2  # 2: one data state per rank under "data" (the synthetic stream's is the same on every rank)
# Settings a resumed run may change: how it runs, logs and is scored, and how long; any other change would make the
# rest of the run another run than the one the checkpoint began, and is refused.
RESUME_MAY_CHANGE = {"steps", "epochs", "warmup_steps", "workers", "prefetch", "worker_timeout",
                     "synth_devices", "synth_batch_size", "device", "amp", "channels_last", "fast", "checkpoint_every",
                     "log_every", "log_images_every", "eval_every", "verbose", "tensorboard", "log_sample_ids", "out",
                     "imagenet_val", "imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a"}


class RunError(StreamsynthError, RuntimeError):
    """The run cannot start or go on; the message says why and what to do."""


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__, epilog="Defaults marked 'on the embedded default' apply when "
                       "no --sd-model, --captions or --train-dir is given (a small CPU run on the digits). Every flag "
                       "of train.py and of each streamsynth command: docs/cli.md.")
    add_version(p)
    options.add_config_options(p)
    data = p.add_argument_group("data (any combination of the three sources, mixed by --mix)")
    data.add_argument("--online-synthesis", action="store_true", help="images synthesised on the fly, never stored")
    data.add_argument("--from-cache", metavar="DIR", help="WebDataset shards written by --cache (endless seeded passes)")
    data.add_argument("--train-dir", metavar="DIR", help="a real ImageFolder (the real-data baseline, or real + "
                      "synthetic)")
    data.add_argument("--mix", help="weights of the sources, e.g. 'synthetic=3,real=1' (default: equal)")
    options.add_source_options(data)
    data.add_argument("--replay", type=positive_int, metavar="K",
                      help=f"times each synthetic image is used, each freshly augmented "
                      f"{options.run_default_help('replay')}")
    data.add_argument("--epoch-size", type=positive_int, metavar="N",
                      help="trainer samples per virtual epoch of the stream (default: one per caption)")
    data.add_argument("--cache", metavar="DIR", help="also write every synthetic image to WebDataset shards here")
    steer = p.add_argument_group("steering: the learner tells the generator what to make next (docs/steering.md)")
    steer.add_argument("--feedback-sampling", action="store_true",
                       help="class level: draw more samples of the classes with high training loss (weights change "
                       "per epoch)")
    steer.add_argument("--steering", choices=["caption", "sample"],
                       help="caption level: draw more often the captions whose images the learner gets wrong; sample "
                       "level: make --steer-pool candidates per sample and hand over the one the learner is least sure "
                       "of (costs --steer-pool times the generation); not with --feedback-sampling")
    steer.add_argument("--feedback-floor", type=fraction, default=0.5,
                       help="share of the samples spread evenly over all classes (--feedback-sampling) or captions "
                       "(--steering caption)")
    steer.add_argument("--steer-every", type=positive_int, default=8, metavar="GROUPS",
                       help="under --steering, generation groups (global batches of new images) between hand-overs "
                       "of the learner's state to the synthesis workers")
    steer.add_argument("--steer-lag", type=nonnegative_int, default=4, metavar="GROUPS",
                       help="under --steering, groups the workers make ahead under the previous hand-over (at least "
                       "--workers x --prefetch, or they wait for the trainer at each hand-over)")
    steer.add_argument("--steer-pool", type=positive_int, default=4, metavar="N",
                       help="under --steering sample, candidates generated per sample handed over")
    steer.add_argument("--steer-score", choices=SCORES, default="entropy",
                       help="under --steering sample, the learner's uncertainty about a candidate: the entropy of its "
                       "prediction, or its margin")
    steer.add_argument("--steer-toward", choices=PREFER, default="hard",
                       help="what steering prefers: what the learner finds hard, or (a negative control) what it "
                       "already knows")
    synth = p.add_argument_group("synthesis")
    options.add_sampler_options(synth)
    options.add_generator_options(synth, devices_help="'auto' (every GPU no rank trains on) or a comma-separated "
                                  "list, split among a node's ranks (default: each rank's own device)")
    loading = p.add_argument_group("loading")
    loading.add_argument("-j", "--workers", type=nonnegative_int, metavar="N",
                         help=f"loader worker processes per rank, synthesis or decoding "
                         f"{options.run_default_help('workers')}")
    loading.add_argument("--prefetch", type=positive_int, default=2, help="batches each worker may hold ready")
    loading.add_argument("--worker-timeout", type=positive_float, default=1800, metavar="SECONDS",
                         help="seconds without progress after which a synthesis worker counts as hung and is "
                         "replaced")
    train = p.add_argument_group("training")
    train.add_argument("--model", help=f"the classifier: a torchvision or timm model name "
                       f"{options.run_default_help('model')}")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help=f"optimizer steps {options.run_default_help('steps')}")
    length.add_argument("--epochs", type=positive_float,
                        help="train for this many epochs instead of --steps: passes over the stream's virtual epoch "
                        "(or, without synthesis, over the cache or the real images)")
    train.add_argument("-b", "--batch-size", type=positive_int, metavar="N",
                       help=f"images per micro-batch per rank {options.run_default_help('batch_size')}")
    train.add_argument("--accum-steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=positive_float,
                       help="peak learning rate (default: --lr-base x the global batch / 256)")
    train.add_argument("--lr-base", type=positive_float, default=0.1,
                       help="peak learning rate per 256 images of global batch, used when --lr is not given")
    train.add_argument("--lr-schedule", choices=["cosine", "step"], default="cosine",
                       help="after warmup: cosine to zero, or x0.1 at 1/3, 2/3 and 8/9 of the steps")
    train.add_argument("--weight-decay", type=nonnegative_float, default=DEFAULT_WEIGHT_DECAY, help="SGD weight decay")
    train.add_argument("--warmup-steps", type=nonnegative_int,
                       help="steps of linear learning-rate warmup (default: 2%% of the steps, at least 1)")
    train.add_argument("--label-smoothing", type=fraction, default=DEFAULT_LABEL_SMOOTHING,
                       help="cross-entropy label smoothing")
    train.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast (default: bf16 on CUDA, none on CPU)")
    train.add_argument("--channels-last", action="store_true", help="NHWC activations (faster convolutions on GPUs)")
    train.add_argument("--device", type=device_name, help="the classifier's device: cpu, cuda, cuda:N (default: cuda "
                       "if available, else cpu; under torchrun each rank's cuda:LOCAL_RANK)")
    out = p.add_argument_group("output and evaluation")
    out.add_argument("--out", default="runs/latest", metavar="DIR",
                     help="folder of the run: checkpoint.pt, log.csv, curves.png, run.json, results-*.json|csv")
    add_eval_suites(out)
    out.add_argument("--eval-every", type=nonnegative_int, default=0,
                     help="steps between evaluations (0: at the end only)")
    out.add_argument("--resume", nargs="?", const="", metavar="PATH",
                     help="continue an interrupted run: from PATH, or without one from OUT/checkpoint.pt if it exists "
                     "(checkpoints are written to OUT/checkpoint.pt either way)")
    out.add_argument("--checkpoint-every", type=positive_int, default=1000, help="steps between checkpoints")
    out.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines (log.csv, TensorBoard)")
    out.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    out.add_argument("--log-images-every", type=nonnegative_int, default=500, metavar="STEPS",
                     help="steps between TensorBoard grids of the batch the classifier is fed (0: never; only with "
                     "--tensorboard)")
    out.add_argument("--log-sample-ids", action="store_true",
                     help="write what every micro-batch held to OUT/sample_ids-rankR.csv as step,micro,source,keys: "
                          "sample ids (synthetic), shard/key (cache), image indices (real)")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="streamsynth's debug log: what each synthesis worker's fast path chose, kernel fallbacks")
    return p


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> argparse.Namespace:
    """The flags, with every default filled in (`streamsynth.commands.options.resolve`): what the run uses."""
    p = build_parser(prog)
    args = options.parse(p, argv)
    if not (args.online_synthesis or args.from_cache or args.train_dir):
        p.error("choose a data source: --online-synthesis, --from-cache DIR and/or --train-dir DIR")
    if args.steering and args.feedback_sampling:
        p.error(f"--steering {args.steering} and --feedback-sampling both steer the stream: choose one")
    if args.resume and not Path(args.resume).is_file():  # a named checkpoint must exist; bare --resume may start anew
        p.error(f"--resume {args.resume}: no such checkpoint file")
    args = options.resolve(args)
    if args.epochs is not None:
        args.steps = None  # decided by the data's epoch (`steps_of_epochs`), not by the run's default
    elif args.warmup_steps is None:
        args.warmup_steps = default_warmup(args.steps)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device; leave --device out to train on the CPU")
    args.device = resolve_device(args.device)
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    return args


def warn_about_cost(args: argparse.Namespace) -> None:
    """Sizes far beyond any recipe's start anyway, with a word on what they cost (a typo's extra zero, say)."""
    costly = []
    if args.online_synthesis and args.num_inference_steps > 200:
        costly.append(f"--num-inference-steps {args.num_inference_steps} makes each image cost "
                      f"{args.num_inference_steps / 50:.0f}x the reference recipe's 50 denoising steps")
    if args.image_size > 1024:
        costly.append(f"--image-size {args.image_size} gives the classifier {(args.image_size / 224) ** 2:.0f}x the "
                      "pixels of ImageNet's 224 per image")
    if args.device == "cpu" and args.batch_size * args.image_size ** 2 > 4096 * 224 ** 2:
        costly.append(f"-b {args.batch_size} at {args.image_size} px is more than 4,096 ImageNet-sized images per "
                      "batch on the CPU")
    for what in costly:
        log.warning("%s: expect a very slow run (or a typo)", what)


def setup_distributed(device: str) -> tuple[int, int, int, int, torch.device]:
    """Under torchrun: one process per rank, NCCL on GPUs, gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0, 1, torch.device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), local_rank, local_world, torch.device(device)


def build_data(args: argparse.Namespace, rank: int, world: int, local_world: int,
               device: torch.device) -> tuple[MixedBatches, StreamLoader | None, int]:
    """The enabled sources, their classes checked against each other, mixed by --mix; the synthetic loader; and the
    samples in one epoch of the run (the stream's virtual epoch, else one pass over the cache or the real images)."""
    sources, class_ids, loader, epoch_samples = {}, None, None, 0
    if args.online_synthesis:
        model, captions = options.source_paths(args)
        generator = options.generator_config(args, model, synthesis_devices(args.synth_devices, str(device),
                                                                            local_world))
        stream = SyntheticStream(captions, generator, prompt=args.prompt, seed=args.seed, epoch_size=args.epoch_size,
                                 batch_size=args.batch_size, replay=args.replay, transform=BatchAugment(args.image_size),
                                 cache=args.cache, return_sample_ids=True)
        # Workers hand over each group once, as uint8; its replayed uses are augmented on the classifier's device.
        loader = StreamLoader(stream, args.workers, prefetch_factor=args.prefetch, pin_memory=device.type == "cuda",
                              timeout=args.worker_timeout, augment_device=device,
                              feedback=ClassFeedback(stream.num_classes, args.feedback_floor, prefer=args.steer_toward)
                              if args.feedback_sampling else None, steering=steering_of(args))
        sources["synthetic"], class_ids = EpochsInARow(loader), stream.class_ids
        epoch_samples = stream.layout.epoch_size
    if args.from_cache:  # the cache records its classes; a caption store given as well must agree with them
        given = class_ids or ([c.id for c in CaptionStore(args.captions).classes] if args.captions else None)
        sources["cache"] = CachedBatches(args.from_cache, train_transform(args.image_size), args.batch_size,
                                         seed=args.seed, rank=rank, world=world, num_workers=args.workers,
                                         class_ids=given)
        class_ids = sources["cache"].class_ids
        epoch_samples = epoch_samples or sources["cache"].order.samples_per_pass
    if args.train_dir:  # real class folders are mapped onto the classes above, or define them when alone
        class_ids = class_ids or class_folders(args.train_dir)
        folder_labels, skipped = suite_folder_labels(args.train_dir, class_ids, None, "--train-dir")
        if skipped and rank == 0:
            log.warning("--train-dir: %d class folders are not classes of the caption store and are not used: %s",
                        len(skipped), skipped[:5])
        images = LabelledImageFolder(args.train_dir, folder_labels, transform=train_transform(args.image_size, True))
        sources["real"] = RealBatches(images, args.batch_size, seed=args.seed, rank=rank, world=world,
                                      num_workers=args.workers)
        epoch_samples = epoch_samples or len(images)
    return MixedBatches(sources, mix_weights(args.mix, list(sources)), args.seed, class_ids), loader, epoch_samples


def steering_of(args: argparse.Namespace) -> Steering | None:
    """The caption- or sample-level steering the flags ask for (class level is --feedback-sampling's ClassFeedback)."""
    if args.steering == "caption":
        return CaptionFeedback(args.steer_every, args.steer_lag, floor=args.feedback_floor, prefer=args.steer_toward)
    if args.steering == "sample":
        return UncertaintySelection(args.steer_pool, args.steer_every, args.steer_lag, score=args.steer_score,
                                    prefer=args.steer_toward)
    return None


class RunFolder:
    """The run's folder, held by one run at a time: a lock, and the refusal to start afresh over a run's checkpoint.

    The lock is an `flock` on OUT/.lock, released by the kernel when the process ends however it ends, so a killed
    run never leaves a stale lock behind."""

    def __init__(self, out: Path, resuming: bool):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = os.fdopen(os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as err:
            raise RunError(f"cannot take {out / '.lock'} ({err.strerror or err}): a run holds its folder with this file;"
                           " remove whatever is there, or give another --out") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "another process"
            raise RunError(f"{out} is in use by another run ({owner}): wait for it, or give this run another --out")
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._lock.flush()
        checkpoint = out / "checkpoint.pt"
        if checkpoint.exists() and not resuming:
            raise RunError(f"{out} holds a run's checkpoint ({checkpoint}): continue it with --resume, or give a new "
                           "run another --out (nothing was changed)")


def open_log(path: Path, fresh: bool):
    """A log file of the run, opened for appending (started anew with a fresh run), never through a link."""
    if fresh and not path.is_symlink():
        path.unlink(missing_ok=True)
    return open_append(path, what="run log")


def record_run(out: Path, args: argparse.Namespace, stream: SyntheticStream | None, class_ids: list[str],
               first_step: int, argv: list[str]) -> None:
    """OUT/run.json: the resolved flags (`--config OUT/run.json` reruns the run) and what the data is; a resumed run
    adds its part to the record and keeps the first part's."""
    path = out / "run.json"
    part = {"first_step": first_step, "argv": argv, "streamsynth": version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    config = options.recorded(args)
    if first_step > 0 and path.is_file():
        record = json.loads(path.read_text())
        changed = {k: v for k, v in config.items() if record.get("config", {}).get(k) != v}
        record.setdefault("parts", []).append({**part, "changed": changed})
    else:
        record = {"config": config, "parts": [part], "stream": stream.describe() if stream else None,
                  "class_ids": class_ids}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n", what="run record")


def check_resumable_settings(path: Path, saved: dict | None, saved_world: int, args: argparse.Namespace,
                             world: int) -> None:
    """A resumed run may change only `RESUME_MAY_CHANGE`, and its batch size and accumulation only as long as the
    global batch stays the same (another number of ranks): anything else would make it another run."""
    if saved is None:
        log.warning("%s records no settings (written by an older streamsynth): they are not checked", path)
        return
    now = options.recorded(args)
    may_change = set(RESUME_MAY_CHANGE)
    if saved["batch_size"] * saved["accum_steps"] * saved_world == args.batch_size * args.accum_steps * world:
        may_change |= {"batch_size", "accum_steps"}
    changed = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if k not in may_change and saved.get(k) != now.get(k)]
    if changed:
        raise RunError(f"cannot resume from {path}: {'; '.join(changed)}. Resume with the settings the run began "
                       "with (`--config OUT/run.json --resume` takes them), or start a new run in another --out")


class RunLog:
    """What the run reports: the progress bar, OUT/log.csv, OUT/curves.png and TensorBoard on rank 0, and every
    rank's sample ids."""

    COLUMNS = ["step", "loss", "lr", "images_per_s", "data_wait_share", "queue_depth", "synth_images_per_s",
               "restarts"]

    def __init__(self, args: argparse.Namespace, out: Path, rank: int, first_step: int):
        is_main, fresh = rank == 0, first_step == 0
        self.out, self.args = out, args
        self.progress = tqdm(initial=first_step, total=args.steps, desc="train", disable=not is_main,
                             dynamic_ncols=True)
        self.csv_file = open_log(out / "log.csv", fresh) if is_main else None
        self.csv = csv.writer(self.csv_file) if self.csv_file else None
        if self.csv and self.csv_file.tell() == 0:
            self.csv.writerow(self.COLUMNS)
        self.tb = None
        if args.tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.out / "tensorboard")
        self.ids = open_log(out / f"sample_ids-rank{rank}.csv", fresh) if args.log_sample_ids else None
        self.evaluations: list[tuple[int, str, float]] = []  # (step, suite, top-1) for the curves
        self._reset_window()

    def _reset_window(self) -> None:
        self.window_start, self.window_images, self.window_wait = time.perf_counter(), 0, 0.0

    def batch(self, step: int, micro: int, source: str, keys, images: torch.Tensor, world: int,
              waited: float) -> None:
        self.window_images, self.window_wait = self.window_images + len(images) * world, self.window_wait + waited
        if self.ids:
            keys = keys.tolist() if isinstance(keys, torch.Tensor) else keys
            self.ids.write(f"{step},{micro},{source}," + " ".join(map(str, keys)) + "\n")
        every = self.args.log_images_every
        if self.tb and every and micro == 0 and step % every == 0:  # what the classifier eats, as it eats it
            from torchvision.utils import make_grid

            mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
            shown = (images[:64].float() * std + mean).clamp(0, 1)
            self.tb.add_image(f"batch/{source}", make_grid(shown, nrow=8), step)

    def step(self, step: int, loss: float | None, lr: float, metrics: dict) -> None:
        self.progress.update(1)
        if self.ids:
            self.ids.flush()
        if loss is None:
            return
        elapsed = time.perf_counter() - self.window_start
        values = {"loss": loss, "lr": lr, "images_per_s": self.window_images / elapsed,
                  "data_wait_share": self.window_wait / elapsed, "queue_depth": metrics["queue_depth"],
                  "synth_images_per_s": sum(w["images_per_s"] for w in metrics["workers"])}
        self.progress.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{values['images_per_s']:.1f}",
                                  wait=f"{values['data_wait_share']:.0%}", queue=metrics["queue_depth"])
        if self.csv:
            self.csv.writerow([step, *(f"{values[c]:.4g}" for c in self.COLUMNS[1:-1]), metrics["restarts"]])
            self.csv_file.flush()
        for key, value in values.items() if self.tb else ():
            self.tb.add_scalar(f"train/{key}", value, step)
        self._reset_window()

    def evaluation(self, step: int, results) -> None:
        for r in results:
            if r.top1 is not None:
                self.evaluations.append((step, r.suite, r.top1))
                if self.tb:
                    self.tb.add_scalar(f"eval/{r.suite}/top1", r.top1, step)

    def draw_curves(self) -> None:
        """OUT/curves.png: the training loss (from log.csv, every part of a resumed run) and each evaluation's
        top-1 against the step."""
        if self.csv_file is None:
            return
        from matplotlib.figure import Figure

        with open(self.out / "log.csv", newline="") as handle:
            rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]
        fig = Figure(figsize=(9 if self.evaluations else 4.5, 3.5))
        axes = fig.subplots(1, 2 if self.evaluations else 1, squeeze=False)[0]
        axes[0].plot([s for s, _ in rows], [v for _, v in rows])
        axes[0].set(xlabel="step", ylabel="training loss", title="loss")
        if self.evaluations:
            for suite in sorted({suite for _, suite, _ in self.evaluations}):
                points = [(s, t) for s, name, t in self.evaluations if name == suite]
                axes[1].plot(*zip(*points), marker="o", label=suite)
            axes[1].legend()
            axes[1].set(xlabel="step", ylabel="top-1 %", title="evaluation")
        fig.tight_layout()
        picture = io.BytesIO()
        fig.savefig(picture, format="png", dpi=80)
        atomic_write(self.out / "curves.png", lambda file: file.write(picture.getvalue()), what="loss curves")

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()
        for handle in (self.csv_file, self.tb, self.ids):
            if handle:
                handle.close()


def resume(path: Path, args: argparse.Namespace, holders: dict, data: MixedBatches, rank: int, world: int,
           device: torch.device) -> int:
    """Restore the model, optimizer and scaler (`holders`) and this rank's data from a checkpoint; return its step.

    The checkpoint is checked against this run first (damaged, another --model, --image-size, classes or setting
    that changes the samples: one line)."""
    state = load_resume_checkpoint(path, args.model, args.image_size, data.class_ids, map_location=device,
                                   required=("model", "arch", "num_classes", "class_ids", "step", "optimizer"),
                                   **holders)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} was written by an older streamsynth and cannot be resumed exactly: start a new run "
                       "in another --out (its weights still load with streamsynth evaluate)")
    data_states = state["data"]
    check_resumable_settings(path, state.get("config"), len(data_states), args, world)
    if len(data_states) != world and set(data.names) != {"synthetic"}:
        raise RunError(f"{path} was written by {len(data_states)} rank(s), this run has {world}: the cache and real "
                       "sources resume only on the same number of ranks (the synthetic stream alone resumes on any "
                       "number with the same global batch size)")
    try:  # a changed setting or changed data is a ValueError that says what changed
        data.load_state_dict(data_states[rank] if len(data_states) == world else data_states[0])
    except ValueError as err:
        raise RunError(f"cannot resume from {path}: {err}") from None
    return state["step"]


def steps_of_epochs(epochs: float, epoch_samples: int, global_batch: int) -> int:
    """Optimizer steps in `epochs` epochs of `epoch_samples` samples, at `global_batch` images per step."""
    return max(1, math.ceil(epochs * epoch_samples / global_batch))


def main(argv: list[str] | None = None, prog: str = "train.py") -> None:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("streamsynth").setLevel(logging.DEBUG)
    embedded = options.run_kind(args) == options.EMBEDDED
    warn_about_cost(args)
    rank, world, local_rank, local_world, device = (setup_distributed(args.device) if not args.print_config
                                                    else (0, 1, 0, 1, torch.device(args.device)))
    is_main = rank == 0
    out = Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    resume_path = Path(args.resume) if args.resume else checkpoint_path  # --resume PATH, or bare: OUT/checkpoint.pt
    resuming = args.resume is not None and resume_path.exists()
    # One run per folder, held until this process ends; a finished run is continued, never overwritten.
    run_folder = RunFolder(out, args.resume is not None) if is_main and not args.print_config else None  # noqa: F841
    if device.type == "cpu" and args.online_synthesis and args.workers:
        # Synthesis workers run one thread each on these cores: a trainer that also takes every core makes its
        # threads wait on each other (measured: 4x the CPU time of the embedded default on 2 cores).
        torch.set_num_threads(max(1, torch.get_num_threads() - args.workers))
    if is_main and embedded and args.online_synthesis and not args.print_config:  # say what the generator is first
        print(EMBEDDED_DEFAULT_NOTICE, flush=True)
    torch.manual_seed(args.seed)
    suites = eval_suites(args)

    # ----- data: fresh synthetic batches, cached ones, real ones, mixed by fixed weights ---------------------------
    try:  # a wrong path or an empty or unmatched class folder fails now, not after training
        for suite, path in [*suites.items(), *([("--train-dir", args.train_dir)] if args.train_dir else [])]:
            check_eval_folder(path, suite)
        data, loader, epoch_samples = build_data(args, rank, world, local_world, device)
        for suite, path in suites.items():
            check_eval_folder(path, suite, data.class_ids)
    except (FileNotFoundError, ValueError) as err:
        raise RunError(one_line(err)) from None
    global_batch = args.batch_size * args.accum_steps * world
    if args.steps is None:
        args.steps = steps_of_epochs(args.epochs, epoch_samples, global_batch)
    if args.warmup_steps is None:
        args.warmup_steps = default_warmup(args.steps)
    if args.lr is None:
        args.lr = args.lr_base * global_batch / 256
    if args.print_config:  # every value the run would use, the data's included; nothing is written
        options.print_config(args)
        return
    stream = loader.stream if loader is not None else None
    if is_main:
        if stream is not None:
            print(f"synthesis: prompt {stream.sampler.template.template!r}, {args.num_inference_steps} steps, "
                  f"guidance {args.guidance_scale}, replay {args.replay}, {world} rank(s) x {args.workers} worker(s)",
                  flush=True)
        print(f"data: {len(data.class_ids)} classes from "
              f"{', '.join(f'{n} {w:.0%}' for n, w in zip(data.names, data.weights))}; "
              f"classifier {args.model} at {args.image_size}px on {device}, amp {args.amp}; {args.steps} steps of "
              f"{global_batch} images, peak lr {args.lr:.4g}", flush=True)

    # ----- model, optimizer, resume ---------------------------------------------------------------------------------
    try:
        model = build_classifier(args.model, len(data.class_ids)).to(device)
    except ValueError as err:
        raise RunError(f"--model: {err}") from None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = sgd_optimizer(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
                if args.amp != "none" else nullcontext())
    step = 0
    if resuming:
        step = resume(resume_path, args, {"model": model, "optimizer": optimizer, "scaler": scaler}, data, rank,
                      world, device)
        if is_main:
            print(f"resumed from {resume_path} at step {step}", flush=True)
    if is_main:  # two checkpoints must fit while one replaces the other: say so now, not at the first checkpoint
        check_checkpoint_room(checkpoint_path, model, optimizer)
        record_run(out, args, stream, data.class_ids, step, list(sys.argv[1:] if argv is None else argv))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    raw_model = model.module if world > 1 else model
    # What the learner tells the generator: per-sample losses (class and caption level), its weights (sample level).
    feedback = (loader.feedback or loader.steering) if loader is not None else None
    if loader is not None and loader.steering is not None:
        loader.steering.watch(raw_model)

    # ----- logs, checkpoints, evaluation --------------------------------------------------------------------------
    run_log = RunLog(args, out, rank, step)
    no_synthesis = {"queue_depth": 0, "workers": [], "restarts": 0}

    def checkpoint(this_rank_data: dict | None = None) -> None:
        """Every rank's data state and rank 0's model, optimizer and settings to OUT/checkpoint.pt, atomically;
        weights that are no longer finite never replace the last good checkpoint."""
        states = [None] * world
        mine = data.state_dict() if this_rank_data is None else this_rank_data
        if world > 1:
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        if is_main:
            if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
                raise RunError(f"the classifier's weights are no longer finite at step {step}: lower --lr or --lr-base; "
                               f"{checkpoint_path} (the last good checkpoint) is kept")
            save_checkpoint(checkpoint_path, classifier_checkpoint(
                raw_model, args.model, data.class_ids, image_size=args.image_size, step=step, format=CHECKPOINT_FORMAT,
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), data=states,
                config=options.recorded(args), stream=stream.describe() if stream else None))
            run_log.draw_curves()

    def evaluate(tag: str) -> None:
        if is_main and suites:
            results = evaluate_suites(raw_model, suites, data.class_ids, eval_transform(args.image_size), device,
                                      batch_size=args.batch_size, workers=min(4, os.cpu_count() or 1))
            print(f"evaluation at step {step}:\n{format_results(results)}", flush=True)
            write_results(results, out / f"results-{tag}", metadata={"step": step, "arch": args.model})
            run_log.evaluation(step, results)
        if world > 1 and suites:
            dist.barrier()  # the other ranks wait here instead of in the next gradient all-reduce

    # ----- the loop -------------------------------------------------------------------------------------------------
    # Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary: the run is saved as it was when the
    # step in progress began (that step is made again on --resume) and exits 130. A second one stops at once.
    interrupts = Interrupts()
    step_start_data = data.state_dict()
    with interrupts, run_log:  # the progress bar ends its line however the loop ends, before any message
        while step < args.steps and not interrupts.requested:
            lr = learning_rate(step, args.steps, args.lr, args.warmup_steps, args.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(args.accum_steps):
                wait_start = time.perf_counter()
                try:
                    source, (images, targets, keys) = next(data)
                except Exception:
                    if interrupts.requested:  # a loader's worker took the same Ctrl-C
                        break
                    raise
                run_log.batch(step, micro, source, keys, images, world, time.perf_counter() - wait_start)
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sync = micro == args.accum_steps - 1 or world == 1
                with autocast, (nullcontext() if sync else model.no_sync()):
                    losses = F.cross_entropy(model(images), targets, label_smoothing=args.label_smoothing,
                                             reduction="none")
                    scaler.scale(losses.mean() / args.accum_steps).backward()
                if feedback is not None and source == "synthetic":
                    feedback.update(losses.float(), targets, keys)
                if interrupts.requested:
                    break
            if interrupts.requested:
                break
            report = (step + 1) % args.log_every == 0 or step + 1 == args.steps
            loss = losses.mean().item() if report else None
            if loss is not None and not math.isfinite(loss):  # before the update, and before any checkpoint
                raise RunError(f"the training loss became {loss} at step {step + 1} (learning rate {lr:.4g}): lower "
                               f"--lr or --lr-base, or check the data; {checkpoint_path} (the last good checkpoint) is "
                               "kept")
            with interrupts.held():  # an update is never cut in half
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_start_data = data.state_dict()
            run_log.step(step, loss, lr, loader.metrics() if loader is not None else no_synthesis)
            if step % args.checkpoint_every == 0 and step < args.steps:
                checkpoint()
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                evaluate(f"step{step}")
    if interrupts.requested:
        if world > 1:  # the other ranks may be gone already: no collective to gather their data states
            raise KeyboardInterrupt(f"interrupted at step {step}: the last checkpoint is kept; continue with --resume")
        checkpoint(step_start_data)
        raise KeyboardInterrupt(f"interrupted: saved {checkpoint_path} at step {step}; continue with the same command "
                                "and --resume")
    checkpoint()
    if is_main:
        print(f"saved {checkpoint_path} after {step} steps", flush=True)
    evaluate("final")
    if is_main and embedded and data.class_ids == list(DIGIT_CLASS_IDS):
        # Trained on the embedded default's digits (synthetic, or a cache of them): score it on held-out real ones.
        top1 = report_held_out_digits(raw_model, args.image_size, device, data.class_ids)
        run_log.evaluations.append((step, "held-out real digits", top1))
        run_log.draw_curves()
    if world > 1:
        dist.destroy_process_group()


class Interrupts:
    """The first SIGINT or SIGTERM becomes a request the loop honours at its next step boundary; a second one stops
    at once, unless it comes inside `held()` (the optimizer's update), which is always finished first."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self._holding, self._previous = False, False, {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():  # where Python lets a handler be set
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and not self._holding:
            raise KeyboardInterrupt("interrupted twice: stopped at once; the last checkpoint is kept")
        self.requested = True

    @contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False


def cli(argv: list[str] | None = None, prog: str = "train.py") -> None:
    """`python train.py ...` and `streamsynth train ...`: the run, with a user's error as one line (exit 2), an
    interruption as one line (exit 130), and a bug as one line pointing at `-v` for its traceback (exit 1)."""
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        main(argv, prog)
    except KeyboardInterrupt as err:
        print(f"{prog}: {err or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except (StreamsynthError, OSError, ValueError) as err:  # the message names the thing and says what to do
        if verbose:
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # a bug: still one line, and the way to the traceback
        if verbose:
            raise
        print(f"{prog}: error: unexpected {type(err).__name__}: {one_line(err)} (run `{prog} -v ...` for the "
              "traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
