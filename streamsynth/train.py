r"""Train an image classifier on an endless stream of Caption-in-Prompt synthetic images.

    python train.py --online-synthesis                       # embedded default: tiny digits generator, CPU-sized run
    python train.py --online-synthesis --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --captions imagenet-captions.lmdb --model resnet50 --steps 100000 --synth-devices auto --replay 4 \
        --imagenet-val /data/imagenet/val --imagenet-r /data/imagenet-r --imagenet-a /data/imagenet-a
    python train.py --train-dir /data/imagenet/train --imagenet-val /data/imagenet/val   # the real-data baseline
    python train.py ... --out runs/r50 --resume       # continue from runs/r50/checkpoint.pt
    torchrun --nproc_per_node=4 train.py --online-synthesis ...   # DDP: each rank has its own synthesis workers

One file, top to bottom: arguments, the data, the model, the loop, checkpoints, the evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from streamsynth import GeneratorConfig, StreamLoader, SyntheticStream
from streamsynth.captions import CaptionStore
from streamsynth.classifier.checkpoints import check_checkpoint_room, load_resume_checkpoint, save_checkpoint
from streamsynth.classifier.models import build_classifier, classifier_checkpoint, learning_rate, sgd_optimizer
from streamsynth.commands.args import ArgumentParser, add_eval_suites, add_version, eval_suites, resolve_device
from streamsynth.classifier.evaluate import (LabelledImageFolder, check_eval_folder, class_folders, eval_transform,
                                             evaluate_suites, format_results, suite_folder_labels, write_results)
from streamsynth.digits.data import CLASS_IDS as DIGIT_CLASS_IDS, report_held_out_digits
from streamsynth.digits.embedded import EMBEDDED_DEFAULT_NOTICE, embedded_captions, embedded_model
from streamsynth.errors import StreamsynthError, one_line
from streamsynth.stream import CachedBatches, EpochsInARow, MixedBatches, RealBatches, mix_weights
from streamsynth.stream.devices import synthesis_devices
from streamsynth.stream.feedback import ClassFeedback
from streamsynth.synth.fast import add_fast_path_argument, fast_path_for
from streamsynth.synth.speed import add_sampler_arguments, fill_from_speed_preset, sampler_settings
from streamsynth.transforms import BatchAugment, train_transform

log = logging.getLogger("train")

# With no --sd-model, --captions or --train-dir the run uses the embedded default (the tiny digits generator and its
# captions); these settings train a classifier on its digits in a minute or two on a 2-core CPU and score it on
# held-out real digits. Every one of them can still be set on the command line.
EMBEDDED_PRESET = {"model": "test_resnet", "steps": 200, "batch_size": 32, "image_size": 16, "workers": 2, "replay": 4,
                   "num_inference_steps": 20, "synth_batch_size": 32}
REAL_PRESET = {"model": "resnet50", "steps": 100_000, "batch_size": 256, "image_size": 224, "workers": 4, "replay": 1,
               "num_inference_steps": 50, "synth_batch_size": 8}
CHECKPOINT_FORMAT = 2  # 2: one data state per rank under "data" (the synthetic stream's is the same on every rank)


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__, epilog="The flags of train.py and of every streamsynth command: README, "
                       "\"Command-line vocabulary\". Defaults marked 'preset' are the embedded default's small CPU run "
                       "when no --sd-model, --captions or --train-dir is given, else the full run's.")
    add_version(p)
    data = p.add_argument_group("data (any combination of the three sources, mixed by --mix)")
    data.add_argument("--online-synthesis", action="store_true", help="images synthesised on the fly, never stored")
    data.add_argument("--from-cache", help="WebDataset shards written by --cache (endless seeded passes)")
    data.add_argument("--train-dir", help="a real ImageFolder (the real-data baseline, or real + synthetic)")
    data.add_argument("--mix", help="weights of the sources, e.g. 'synthetic=3,real=1' (default: equal)")
    data.add_argument("--sd-model",
                      help="Stable Diffusion hub id or diffusers folder (default: the embedded tiny digits model)")
    data.add_argument("--captions", help="caption store (LMDB) (default: the embedded digits captions)")
    data.add_argument("--prompt", default="cip",
                      help="prompt strategy: cip, basic, name, clip, or a template with {name} and {caption}")
    data.add_argument("--replay", type=int,
                      help="times each synthetic image is used (fresh augmentation; default: 1, 4 for the embedded default)")
    data.add_argument("--epoch-size", type=int, help="trainer samples per virtual epoch (default: one per caption)")
    data.add_argument("--cache", help="also write every synthetic image to WebDataset shards in this folder")
    data.add_argument("--feedback-sampling", action="store_true",
                      help="draw more samples of the classes with high training loss (weights change per epoch)")
    data.add_argument("--feedback-floor", type=float, default=0.5,
                      help="share of every epoch spread evenly over all classes under --feedback-sampling")
    synth = p.add_argument_group("synthesis")
    synth.add_argument("--synth-devices", help="'auto' (every GPU no rank trains on) or a comma-separated list "
                                               "(default: the trainer's device)")
    synth.add_argument("--workers", type=int,
                       help="loader worker processes per rank, synthesis or decoding (default, preset: 1 or 4)")
    synth.add_argument("--prefetch", type=int, default=2, help="batches each worker may hold ready")
    synth.add_argument("--worker-timeout", type=float, default=1800,
                       help="seconds without a batch after which a synthesis worker counts as hung and is restarted")
    synth.add_argument("--synth-batch-size", type=int,
                       help="images per UNet batch in a worker (default: 8, 32 for the embedded default)")
    add_sampler_arguments(synth, default_steps="50, 20 for the embedded default")
    synth.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="synthesis dtype (default: fp16 on CUDA)")
    synth.add_argument("--safety-checker", action="store_true", help="redraw images the model's safety checker flags")
    add_fast_path_argument(synth)
    train = p.add_argument_group("training")
    train.add_argument("--model", help="the classifier: a torchvision (or, if installed, timm) model name "
                       "(default, preset: resnet18 or resnet50)")
    train.add_argument("--steps", type=int, help="optimizer steps (default, preset: 20 or 100000)")
    train.add_argument("--batch-size", type=int, help="images per micro-batch per rank (default, preset: 16 or 256)")
    train.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--image-size", type=int, help="classifier input side, in pixels (default, preset: 32 or 224)")
    train.add_argument("--lr", type=float, default=0.1, help="peak learning rate for batch 256 (scaled linearly)")
    train.add_argument("--lr-schedule", choices=["cosine", "step"], default="cosine",
                       help="after warmup: cosine to zero, or x0.1 at 1/3, 2/3 and 8/9 of the steps")
    train.add_argument("--weight-decay", type=float, default=5e-5, help="SGD weight decay")
    train.add_argument("--warmup-steps", type=int, default=None,
                       help="steps of linear learning-rate warmup (default: 2%% of --steps)")
    train.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    train.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast (default: bf16 on CUDA, none on CPU)")
    train.add_argument("--channels-last", action="store_true", help="NHWC activations (faster convolutions on GPUs)")
    train.add_argument("--device", help="the classifier's device: cpu, cuda, cuda:N (default: cuda if available, "
                       "else cpu; under torchrun each rank's cuda:LOCAL_RANK)")
    train.add_argument("--seed", type=int, default=0, help="run seed: fixes every synthetic sample and the init")
    out = p.add_argument_group("output and evaluation")
    out.add_argument("--out", default="runs/latest", metavar="DIR",
                     help="folder for the run: OUT/checkpoint.pt, OUT/log.csv, OUT/run.json, OUT/results-*.json|csv")
    add_eval_suites(out)
    out.add_argument("--eval-every", type=int, default=0,
                     help="steps between evaluations (default: 0, at the end only)")
    out.add_argument("--resume", nargs="?", const="", metavar="PATH",
                     help="continue an interrupted run: from PATH, or without one from OUT/checkpoint.pt if it exists "
                     "(checkpoints are written to OUT/checkpoint.pt either way)")
    out.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    out.add_argument("--log-every", type=int, default=10, help="steps between log lines (OUT/log.csv, TensorBoard)")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="streamsynth's debug log: what each synthesis worker's fast path chose, kernel fallbacks")
    out.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    out.add_argument("--log-sample-ids", action="store_true",
                     help="write what every micro-batch held to OUT/sample_ids-rankR.csv as step,micro,source,keys: "
                          "sample ids (synthetic), shard/key (cache), image indices (real)")
    return p


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)

    if not (args.online_synthesis or args.from_cache or args.train_dir):
        p.error("choose a data source: --online-synthesis, --from-cache DIR and/or --train-dir DIR")
    if args.resume and not Path(args.resume).is_file():  # a named checkpoint must exist; bare --resume may start anew
        p.error(f"--resume {args.resume}: no such checkpoint file")
    args.embedded_default = not (args.sd_model or args.captions or args.train_dir)
    fill_from_speed_preset(args)  # before the presets below: --speed picks the sampler's steps
    preset = EMBEDDED_PRESET if args.embedded_default else REAL_PRESET
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 50)
    args.device = resolve_device(args.device)
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    return args


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


def build_data(args: argparse.Namespace, rank: int, world: int, local_rank: int, local_world: int,
               device: torch.device) -> tuple[MixedBatches, StreamLoader | None]:
    """The enabled sources, their classes checked against each other, mixed by --mix; and the synthetic loader."""
    sources, class_ids, loader = {}, None, None
    if args.online_synthesis:
        devices = synthesis_devices(args.synth_devices, str(device), local_rank, local_world)
        generator = GeneratorConfig(
            args.sd_model or embedded_model(), image_size=args.image_size, dtype=args.dtype, devices=devices,
            **sampler_settings(args, args.num_inference_steps),
            batch_size=args.synth_batch_size, fast=fast_path_for(args.fast, devices))
        stream = SyntheticStream(args.captions or embedded_captions(), generator, prompt=args.prompt, seed=args.seed,
                                 epoch_size=args.epoch_size, batch_size=args.batch_size, replay=args.replay,
                                 transform=BatchAugment(args.image_size), cache=args.cache, return_sample_ids=True)
        # Workers hand over each group once, as uint8; its replayed uses are augmented on the classifier's device.
        loader = StreamLoader(stream, args.workers, prefetch_factor=args.prefetch, pin_memory=device.type == "cuda",
                              timeout=args.worker_timeout, augment_device=device,
                              feedback=ClassFeedback(stream.num_classes, args.feedback_floor)
                              if args.feedback_sampling else None)
        sources["synthetic"], class_ids = EpochsInARow(loader), stream.class_ids
    if args.from_cache:  # the cache records its classes; a caption store given as well must agree with them
        given = class_ids or ([c.id for c in CaptionStore(args.captions).classes] if args.captions else None)
        sources["cache"] = CachedBatches(args.from_cache, train_transform(args.image_size), args.batch_size,
                                         seed=args.seed, rank=rank, world=world, num_workers=args.workers,
                                         class_ids=given)
        class_ids = sources["cache"].class_ids
    if args.train_dir:  # real class folders are mapped onto the classes above, or define them when alone
        class_ids = class_ids or class_folders(args.train_dir)
        folder_labels, skipped = suite_folder_labels(args.train_dir, class_ids, None, "--train-dir")
        if skipped and rank == 0:
            log.warning("--train-dir: %d class folders are not classes of the caption store and are not used: %s",
                        len(skipped), skipped[:5])
        images = LabelledImageFolder(args.train_dir, folder_labels, transform=train_transform(args.image_size, True))
        sources["real"] = RealBatches(images, args.batch_size, seed=args.seed, rank=rank, world=world,
                                      num_workers=args.workers)
    return MixedBatches(sources, mix_weights(args.mix, list(sources)), args.seed, class_ids), loader


class RunLog:
    """What the run reports: the progress bar, OUT/log.csv and TensorBoard on rank 0, and every rank's sample ids."""

    COLUMNS = ["step", "loss", "lr", "images_per_s", "data_wait_share", "queue_depth", "synth_images_per_s",
               "restarts"]

    def __init__(self, args: argparse.Namespace, out: Path, rank: int, first_step: int):
        is_main = rank == 0
        self.progress = tqdm(initial=first_step, total=args.steps, desc="train", disable=not is_main,
                             dynamic_ncols=True)
        self.csv_file = open(out / "log.csv", "a", newline="") if is_main else None
        self.csv = csv.writer(self.csv_file) if self.csv_file else None
        if self.csv and self.csv_file.tell() == 0:
            self.csv.writerow(self.COLUMNS)
        self.tb = None
        if args.tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(out / "tensorboard")
        self.ids = open(out / f"sample_ids-rank{rank}.csv", "a") if args.log_sample_ids else None
        self._reset_window()

    def _reset_window(self) -> None:
        self.window_start, self.window_images, self.window_wait = time.perf_counter(), 0, 0.0

    def batch(self, step: int, micro: int, source: str, keys, images: int, waited: float) -> None:
        self.window_images, self.window_wait = self.window_images + images, self.window_wait + waited
        if self.ids:
            keys = keys.tolist() if isinstance(keys, torch.Tensor) else keys
            self.ids.write(f"{step},{micro},{source}," + " ".join(map(str, keys)) + "\n")

    def step(self, step: int, loss: torch.Tensor, lr: float, metrics: dict, report: bool) -> None:
        self.progress.update(1)
        if self.ids:
            self.ids.flush()
        if not report:
            return
        elapsed = time.perf_counter() - self.window_start
        values = {"loss": loss.mean().item(), "lr": lr, "images_per_s": self.window_images / elapsed,
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

    def close(self) -> None:
        self.progress.close()
        for handle in (self.csv_file, self.tb, self.ids):
            if handle:
                handle.close()


def resume(path: Path, args: argparse.Namespace, holders: dict, data: MixedBatches, rank: int, world: int,
           device: torch.device) -> int:
    """Restore the model, optimizer and scaler (`holders`) and this rank's data from a checkpoint; return its step.

    The checkpoint is checked against this run first (damaged, another --model, --image-size or classes: one line)."""
    state = load_resume_checkpoint(path, args.model, args.image_size, data.class_ids, map_location=device,
                                   required=("model", "arch", "num_classes", "class_ids", "step", "optimizer"),
                                   **holders)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} was written by an older streamsynth and cannot be resumed exactly: "
                         "start a new run in another --out (its weights still load with streamsynth evaluate)")
    data_states = state["data"]
    if len(data_states) != world and set(data.names) != {"synthetic"}:
        raise SystemExit(f"error: {path} was written by {len(data_states)} rank(s), this run has {world}: the cache "
                         "and real sources resume only on the same number of ranks (the synthetic stream alone "
                         "resumes on any number with the same global batch size)")
    try:  # a changed setting or changed data is a ValueError that says what changed
        data.load_state_dict(data_states[rank] if len(data_states) == world else data_states[0])
    except ValueError as err:
        raise SystemExit(f"error: cannot resume from {path}: {err}") from None
    return state["step"]


def main(argv: list[str] | None = None, prog: str = "train.py") -> None:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("streamsynth").setLevel(logging.DEBUG)
    rank, world, local_rank, local_world, device = setup_distributed(args.device)
    if device.type == "cpu" and args.online_synthesis and args.workers:
        # Synthesis workers run one thread each on these cores: a trainer that also takes every core makes its
        # threads wait on each other (measured: 4x the CPU time of the embedded default on 2 cores).
        torch.set_num_threads(max(1, torch.get_num_threads() - args.workers))
    is_main = rank == 0
    if is_main and args.embedded_default and args.online_synthesis:  # say what the generator is before it runs
        print(EMBEDDED_DEFAULT_NOTICE, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    suites = eval_suites(args)

    # ----- data: fresh synthetic batches, cached ones, real ones, mixed by fixed weights ---------------------------
    try:  # a wrong path or an empty or unmatched class folder fails now, not after training
        for suite, folder in [*suites.items(), *([("--train-dir", args.train_dir)] if args.train_dir else [])]:
            check_eval_folder(folder, suite)
        data, loader = build_data(args, rank, world, local_rank, local_world, device)
        for suite, folder in suites.items():
            check_eval_folder(folder, suite, data.class_ids)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {one_line(err)}") from None
    stream = loader.stream if loader is not None else None
    if is_main:
        if stream is not None:
            print(f"synthesis: prompt {stream.sampler.template.template!r}, {args.num_inference_steps} steps, "
                  f"guidance {args.guidance_scale}, replay {args.replay}, {world} rank(s) x {args.workers} worker(s) "
                  f"on {list(stream.generator.devices)}", flush=True)
        print(f"data: {len(data.class_ids)} classes from "
              f"{', '.join(f'{n} {w:.0%}' for n, w in zip(data.names, data.weights))}; "
              f"classifier {args.model} at {args.image_size}px on {device}, amp {args.amp}", flush=True)
        (out / "run.json").write_text(json.dumps(
            {"args": vars(args), "stream": stream.describe() if stream else None, "class_ids": data.class_ids},
            indent=2))

    # ----- model, optimizer, resume ---------------------------------------------------------------------------------
    try:
        model = build_classifier(args.model, len(data.class_ids)).to(device)
    except ValueError as err:
        raise SystemExit(f"--model: {err}") from None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    peak_lr = args.lr * args.batch_size * args.accum_steps * world / 256
    optimizer = sgd_optimizer(model, peak_lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
                if args.amp != "none" else nullcontext())
    checkpoint_path = out / "checkpoint.pt"
    resume_path = Path(args.resume) if args.resume else checkpoint_path  # --resume PATH, or bare: OUT/checkpoint.pt
    step = 0
    if args.resume is not None and resume_path.exists():
        step = resume(resume_path, args, {"model": model, "optimizer": optimizer, "scaler": scaler}, data, rank,
                      world, device)
        if is_main:
            print(f"resumed from {resume_path} at step {step}", flush=True)
    if is_main:  # two checkpoints must fit while one replaces the other: say so now, not at the first checkpoint
        check_checkpoint_room(checkpoint_path, model, optimizer)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    raw_model = model.module if world > 1 else model
    feedback = loader.feedback if loader is not None else None

    # ----- logs, checkpoints, evaluation --------------------------------------------------------------------------
    run_log = RunLog(args, out, rank, step)
    no_synthesis = {"queue_depth": 0, "workers": [], "restarts": 0}

    def checkpoint() -> None:
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, data.state_dict())
        else:
            states = [data.state_dict()]
        if is_main:
            save_checkpoint(checkpoint_path, classifier_checkpoint(
                raw_model, args.model, data.class_ids, image_size=args.image_size, step=step, format=CHECKPOINT_FORMAT,
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), data=states, args=vars(args),
                stream=stream.describe() if stream else None))

    def evaluate(tag: str) -> None:
        if is_main and suites:
            results = evaluate_suites(raw_model, suites, data.class_ids, eval_transform(args.image_size), device,
                                      batch_size=args.batch_size, workers=min(4, os.cpu_count() or 1))
            print(f"evaluation at step {step}:\n{format_results(results)}", flush=True)
            write_results(results, out / f"results-{tag}", metadata={"step": step, "arch": args.model})
            for r in results:
                if r.top1 is not None and run_log.tb:
                    run_log.tb.add_scalar(f"eval/{r.suite}/top1", r.top1, step)
        if world > 1 and suites:
            dist.barrier()  # the other ranks wait here instead of in the next gradient all-reduce

    # ----- the loop -------------------------------------------------------------------------------------------------
    while step < args.steps:
        lr = learning_rate(step, args.steps, peak_lr, args.warmup_steps, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(args.accum_steps):
            wait_start = time.perf_counter()
            source, (images, targets, keys) = next(data)
            run_log.batch(step, micro, source, keys, len(images) * world, time.perf_counter() - wait_start)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = micro == args.accum_steps - 1 or world == 1
            with autocast, (nullcontext() if sync else model.no_sync()):
                losses = F.cross_entropy(model(images), targets, label_smoothing=args.label_smoothing,
                                         reduction="none")
                scaler.scale(losses.mean() / args.accum_steps).backward()
            if feedback is not None and source == "synthetic":
                feedback.update(losses.float(), targets)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run_log.step(step, losses, lr, loader.metrics() if loader is not None else no_synthesis,
                     report=step % args.log_every == 0 or step == args.steps)
        if step % args.checkpoint_every == 0 and step < args.steps:
            checkpoint()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(f"step{step}")
    run_log.close()
    checkpoint()
    if is_main:
        print(f"saved {checkpoint_path} after {step} steps", flush=True)
    evaluate("final")
    if is_main and args.embedded_default and data.class_ids == list(DIGIT_CLASS_IDS):
        # Trained on the embedded default's digits (synthetic, or a cache of them): score it on held-out real ones.
        report_held_out_digits(raw_model, args.image_size, device, data.class_ids)
    if world > 1:
        dist.destroy_process_group()


def cli(argv: list[str] | None = None, prog: str = "train.py") -> None:
    """`python train.py ...` and `streamsynth train ...`: the run, with a user's error as one line."""
    try:
        main(argv, prog)
    except (StreamsynthError, OSError) as err:  # the message names the thing and says what to do
        raise SystemExit(f"{prog}: error: {one_line(err)}") from None


if __name__ == "__main__":
    cli()
