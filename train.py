r"""Train an image classifier on an endless stream of Caption-in-Prompt synthetic images.

    python train.py --online-synthesis                       # embedded default: tiny digits generator, CPU-sized run
    python train.py --online-synthesis --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --captions imagenet-captions.lmdb --arch resnet50 --steps 100000 --synth-devices auto --replay 4 \
        --val-dir /data/imagenet/val --r-dir /data/imagenet-r --a-dir /data/imagenet-a
    python train.py --train-dir /data/imagenet/train --val-dir /data/imagenet/val   # the real-data baseline
    torchrun --nproc_per_node=4 train.py --online-synthesis ...   # DDP: each rank has its own synthesis workers

One file, top to bottom: arguments, the data, the model, the loop, checkpoints, the evaluation.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from streamsynth import SynthesisConfig, SyntheticStream
from streamsynth.captions import CaptionStore, CaptionStoreError
from streamsynth.classifier import build_classifier, classifier_checkpoint
from streamsynth.defaults import EMBEDDED_DEFAULT_NOTICE, embedded_captions, embedded_model
from streamsynth.digits import report_held_out_digits
from streamsynth.evaluate import (LabelledImageFolder, class_folders, eval_transform, evaluate_suites, format_results,
                                  suite_folder_labels, write_results)
from streamsynth.stream import CachedBatches, RealBatches, ResumableBatches
from streamsynth.stream.dataset import IMAGENET_MEAN, IMAGENET_STD
from streamsynth.stream.devices import synthesis_devices
from streamsynth.stream.feedback import ClassFeedback
from streamsynth.synth import ModelLoadError, derive_seed
from streamsynth.synth.fast import FastPathOptions

log = logging.getLogger("train")

# With no --sd-model, --captions or --train-dir the run uses the embedded default (the tiny digits generator and its
# captions); these settings train a classifier on its digits in a minute or two on a 2-core CPU and score it on
# held-out real digits. Every one of them can still be set on the command line.
EMBEDDED_PRESET = {"arch": "test_resnet", "steps": 200, "batch_size": 32, "image_size": 16, "workers": 2, "replay": 4,
                   "num_inference_steps": 20, "synth_batch_size": 32}
REAL_PRESET = {"arch": "resnet50", "steps": 100_000, "batch_size": 256, "image_size": 224, "workers": 4, "replay": 1,
               "num_inference_steps": 50, "synth_batch_size": 8}
EVAL_SUITES = {"val_dir": "imagenet-val", "v2_dir": "imagenet-v2", "sketch_dir": "imagenet-sketch",
               "r_dir": "imagenet-r", "a_dir": "imagenet-a"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data (any combination of the three sources, mixed by --mix)")
    data.add_argument("--online-synthesis", action="store_true", help="images synthesised on the fly, never stored")
    data.add_argument("--from-cache", help="WebDataset shards written by --cache (endless seeded passes)")
    data.add_argument("--train-dir", help="a real ImageFolder (the real-data baseline, or real + synthetic)")
    data.add_argument("--mix", help="weights of the sources, e.g. 'synthetic=3,real=1' (default: equal)")
    data.add_argument("--sd-model", help="Stable Diffusion hub id or diffusers folder (default: embedded tiny digits model)")
    data.add_argument("--captions", help="caption store (LMDB) (default: embedded digits captions)")
    data.add_argument("--prompt", default="cip", help="cip, basic, name, clip, or a template with {name} and {caption}")
    data.add_argument("--replay", type=int, help="times each synthetic image is used (fresh augmentation; default 1)")
    data.add_argument("--epoch-size", type=int, help="trainer samples per virtual epoch (default: one per caption)")
    data.add_argument("--cache", help="also write every synthetic image to WebDataset shards in this folder")
    data.add_argument("--feedback-sampling", action="store_true",
                      help="draw more samples of the classes with high training loss (weights change per epoch)")
    data.add_argument("--feedback-floor", type=float, default=0.5,
                      help="share of every epoch spread evenly over all classes under --feedback-sampling")
    synth = p.add_argument_group("synthesis")
    synth.add_argument("--synth-devices", help="'auto' (every GPU no rank trains on) or a comma-separated list "
                                               "(default: the trainer's device)")
    synth.add_argument("--workers", type=int, help="loader worker processes per rank (synthesis or decoding)")
    synth.add_argument("--prefetch", type=int, default=2, help="batches each worker may hold ready")
    synth.add_argument("--worker-timeout", type=float, default=1800,
                       help="seconds without a batch after which a synthesis worker counts as hung and is restarted")
    synth.add_argument("--synth-batch-size", type=int, help="images per UNet batch in a worker (default 8)")
    synth.add_argument("--num-inference-steps", type=int, help="denoising steps (default 50)")
    synth.add_argument("--guidance-scale", type=float, default=1.5, help="low guidance (1.5-2) helps diversity")
    synth.add_argument("--scheduler", help="scheduler name (default: the model's own, PNDM for SD1.5)")
    synth.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="synthesis dtype (default: fp16 on CUDA)")
    synth.add_argument("--safety-checker", action="store_true", help="redraw images the model's safety checker flags")
    synth.add_argument("--fast", action="store_true",
                       help="fast path: Triton GroupNorm+SiLU/GEGLU, fused guidance+scheduler step, fused resize, "
                            "probed attention backend (see kernels/README.md)")
    train = p.add_argument_group("training")
    train.add_argument("--arch", help="torchvision (or, if installed, timm) classification model name")
    train.add_argument("--steps", type=int, help="optimizer steps")
    train.add_argument("--batch-size", type=int, help="images per micro-batch per rank")
    train.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--image-size", type=int, help="classifier input side, in pixels")
    train.add_argument("--lr", type=float, default=0.1, help="peak learning rate for batch 256 (scaled linearly)")
    train.add_argument("--lr-schedule", choices=["cosine", "step"], default="cosine",
                       help="after warmup: cosine to zero, or x0.1 at 1/3, 2/3 and 8/9 of the steps")
    train.add_argument("--weight-decay", type=float, default=5e-5)
    train.add_argument("--warmup-steps", type=int, default=None, help="default: 2%% of --steps")
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast (default: bf16 on CUDA, none on CPU)")
    train.add_argument("--channels-last", action="store_true", help="NHWC activations (faster convolutions on GPUs)")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the classifier's device")
    train.add_argument("--seed", type=int, default=0, help="run seed: fixes every synthetic sample and the init")
    out = p.add_argument_group("output and evaluation")
    out.add_argument("--out", default="runs/latest", help="folder for checkpoints and logs")
    for flag, suite in EVAL_SUITES.items():
        out.add_argument("--" + flag.replace("_", "-"), help=f"real ImageFolder scored as {suite}")
    out.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: at the end only)")
    out.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    out.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    out.add_argument("--log-every", type=int, default=10)
    out.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    out.add_argument("--log-sample-ids", action="store_true",
                     help="write what every micro-batch held to OUT/sample_ids-rankR.csv as step,micro,source,keys: "
                          "sample ids (synthetic), shard/key (cache), image indices (real)")
    args = p.parse_args(argv)

    if not (args.online_synthesis or args.from_cache or args.train_dir):
        p.error("choose a data source: --online-synthesis, --from-cache DIR and/or --train-dir DIR")
    args.embedded_default = not (args.sd_model or args.captions or args.train_dir)
    preset = EMBEDDED_PRESET if args.embedded_default else REAL_PRESET
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 50)
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


def train_transform(image_size: int, from_pil: bool = False):
    """Standard ImageNet training augmentation, applied afresh to every (re)use of an image."""
    from torchvision.transforms import v2

    return v2.Compose([
        *([v2.ToImage()] if from_pil else []),
        v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_stream(args: argparse.Namespace, devices: list[str]) -> SyntheticStream:
    return SyntheticStream(
        args.captions or str(embedded_captions()), args.sd_model or str(embedded_model()),
        prompt=args.prompt, seed=args.seed, epoch_size=args.epoch_size, replay=args.replay,
        image_size=args.image_size, devices=devices, dtype=args.dtype, scheduler=args.scheduler,
        synthesis=SynthesisConfig(args.num_inference_steps, args.guidance_scale, safety_check=args.safety_checker),
        synth_batch_size=args.synth_batch_size, fast=FastPathOptions() if args.fast else None,
        transform=train_transform(args.image_size), cache=args.cache, return_sample_ids=True,
    )


def endless(loader) -> Iterator:
    while True:
        yield from loader


def cached_batches(args: argparse.Namespace, rank: int, world: int) -> CachedBatches:
    """The cache in seeded passes, this rank's share of each; resumes exactly from a batch count."""
    return CachedBatches(args.from_cache, train_transform(args.image_size), args.batch_size, seed=args.seed,
                         rank=rank, world=world, num_workers=args.workers)


def real_batches(args: argparse.Namespace, class_ids: list[str], rank: int, world: int) -> RealBatches:
    """A real ImageFolder, its class folders mapped to the classifier's labels, reshuffled every epoch as
    `DistributedSampler` does; resumes exactly from a batch count."""
    folder_labels, skipped = suite_folder_labels(args.train_dir, class_ids, None, "--train-dir")
    if skipped and rank == 0:
        log.warning("--train-dir: %d class folders are not classes of the caption store and are not used: %s",
                    len(skipped), skipped[:5])
    transform = train_transform(args.image_size, from_pil=True)
    dataset = LabelledImageFolder(args.train_dir, folder_labels, transform=transform)
    return RealBatches(dataset, args.batch_size, seed=args.seed, rank=rank, world=world, num_workers=args.workers)


def sample_keys(keys: torch.Tensor | list[str]) -> list:
    """A batch's sample ids or image indices (collated into a tensor) or cache keys (a list of strings)."""
    return keys.tolist() if isinstance(keys, torch.Tensor) else keys


def parse_mix(spec: str | None, sources: list[str]) -> list[float]:
    """Per-source weights, normalised; a step draws its batch from source s with probability w_s."""
    weights = dict.fromkeys(sources, 1.0)
    for part in (spec.split(",") if spec else []):
        name, _, value = part.partition("=")
        if name.strip() not in weights:
            raise SystemExit(f"--mix names {name.strip()!r}, but the enabled sources are {sources}")
        weights[name.strip()] = float(value)
    total = sum(weights.values())
    if total <= 0:
        raise SystemExit(f"--mix {spec!r} gives every source weight zero")
    return [weights[s] / total for s in sources]


def learning_rate(step: int, args: argparse.Namespace, peak: float) -> float:
    if step < args.warmup_steps:
        return peak * (step + 1) / args.warmup_steps
    if args.lr_schedule == "step":
        return peak * 0.1 ** sum(step >= args.steps * f for f in (1 / 3, 2 / 3, 8 / 9))
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def save_checkpoint(path: Path, state: dict) -> None:
    """Written aside and renamed, so a crash mid-write never destroys the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world, local_rank, local_world, device = setup_distributed(args.device)
    if device.type == "cpu" and args.online_synthesis and args.workers:
        # Synthesis workers run one thread each on these cores: a trainer that also takes every core makes its
        # threads wait on each other (measured: 4x the CPU time of the embedded default on 2 cores).
        torch.set_num_threads(max(1, torch.get_num_threads() - args.workers))
    is_main = rank == 0
    if is_main and args.embedded_default:
        print(EMBEDDED_DEFAULT_NOTICE, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    suites = {suite: getattr(args, flag) for flag, suite in EVAL_SUITES.items() if getattr(args, flag)}
    try:
        for suite, folder in [*suites.items(), *([("--train-dir", args.train_dir)] if args.train_dir else [])]:
            class_folders(folder, suite)  # a wrong path fails now, not after training
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None

    # ----- data: fresh synthetic batches, cached ones, real ones, mixed by fixed weights ---------------------------
    stream = loader = feedback = None
    if args.online_synthesis:
        devices = synthesis_devices(args.synth_devices, str(device), local_rank, local_world)
        stream = build_stream(args, devices)
        class_ids = [c.id for c in stream.store.classes]
        feedback = ClassFeedback(stream.num_classes, floor=args.feedback_floor) if args.feedback_sampling else None
        loader = stream.loader(args.batch_size, num_workers=args.workers, prefetch_factor=args.prefetch,
                               pin_memory=device.type == "cuda", feedback=feedback, timeout=args.worker_timeout)
    elif args.from_cache:  # cached labels index the caption store's classes; no generator is needed
        class_ids = [c.id for c in CaptionStore(args.captions or str(embedded_captions())).classes]
    else:
        class_ids = class_folders(args.train_dir)
    sources = {}
    if args.online_synthesis:
        sources["synthetic"] = endless(loader)
    try:
        if args.from_cache:
            sources["cache"] = cached_batches(args, rank, world)
        if args.train_dir:
            sources["real"] = real_batches(args, class_ids, rank, world)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    # The cache and real sources resume from a batch count saved per rank beside the synthetic loader's state.
    resumable = {name: source for name, source in sources.items() if isinstance(source, ResumableBatches)}
    names = list(sources)
    mix = parse_mix(args.mix, names)
    mix_cumulative = [sum(mix[:i + 1]) for i in range(len(mix))]
    if is_main:
        if stream is not None:
            print(f"synthesis: prompt {stream.sampler.template.template!r}, {args.num_inference_steps} steps, "
                  f"guidance {args.guidance_scale}, replay {args.replay}, {world} rank(s) x {args.workers} worker(s) "
                  f"on {stream.devices}", flush=True)
        print(f"data: {len(class_ids)} classes from {', '.join(f'{n} {w:.0%}' for n, w in zip(names, mix))}; "
              f"classifier {args.arch} at {args.image_size}px on {device}, amp {args.amp}", flush=True)
        (out / "run.json").write_text(json.dumps(
            {"args": vars(args), "stream": stream.describe() if stream else None, "class_ids": class_ids}, indent=2))

    # ----- model, optimizer, resume ---------------------------------------------------------------------------------
    try:
        model = build_classifier(args.arch, len(class_ids)).to(device)
    except ValueError as err:
        raise SystemExit(f"--arch: {err}") from None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    peak_lr = args.lr * args.batch_size * args.accum_steps * world / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
                if args.amp != "none" else nullcontext())
    checkpoint_path = out / "checkpoint.pt"
    step = 0
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["class_ids"] != class_ids:
            raise SystemExit(f"{checkpoint_path} was trained on other classes than this run's data")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        if len(state["loaders"]) != world:
            raise SystemExit(f"{checkpoint_path} was written by {len(state['loaders'])} ranks, this run has "
                             f"{world}: resume with the same number of ranks")
        saved_sources = state["sources"][rank] if "sources" in state else {}
        try:  # a changed setting or changed data is a ValueError that says what changed
            if loader is not None:
                loader.load_state_dict(state["loaders"][rank])
            for name, source in resumable.items():
                if name in saved_sources:
                    source.load_state_dict(saved_sources[name])
                else:  # a checkpoint from before sources were saved, or a source added since
                    log.warning("%s holds no position of the %s source: it starts from its first batch",
                                checkpoint_path, name)
        except ValueError as err:
            raise SystemExit(f"error: cannot resume from {checkpoint_path}: {err}") from None
        if is_main:
            print(f"resumed from {checkpoint_path} at step {step}", flush=True)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    raw_model = model.module if world > 1 else model

    # ----- logs -----------------------------------------------------------------------------------------------------
    log_file = open(out / "log.csv", "a", newline="") if is_main else None
    log_writer = csv.writer(log_file) if log_file else None
    if log_writer and log_file.tell() == 0:
        log_writer.writerow(["step", "loss", "lr", "images_per_s", "data_wait_share", "queue_depth",
                             "synth_images_per_s", "restarts"])
    tb = None
    if args.tensorboard and is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(out / "tensorboard")
    ids_file = open(out / f"sample_ids-rank{rank}.csv", "a") if args.log_sample_ids else None

    def checkpoint() -> None:
        rank_state = (loader.state_dict() if loader is not None else None,
                      {name: source.state_dict() for name, source in resumable.items()})
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rank_state)
        else:
            states = [rank_state]
        if is_main:
            save_checkpoint(checkpoint_path, classifier_checkpoint(
                raw_model, args.arch, class_ids, image_size=args.image_size, step=step,
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), loaders=[s[0] for s in states],
                sources=[s[1] for s in states], args=vars(args), stream=stream.describe() if stream else None))

    def evaluate(tag: str) -> None:
        if not (is_main and suites):
            return
        results = evaluate_suites(raw_model, suites, class_ids, eval_transform(args.image_size), device,
                                  batch_size=args.batch_size, workers=min(4, os.cpu_count() or 1))
        print(f"evaluation at step {step}:\n{format_results(results)}", flush=True)
        write_results(results, out / f"results-{tag}", metadata={"step": step, "arch": args.arch})
        for r in results:
            if r.top1 is not None and tb:
                tb.add_scalar(f"eval/{r.suite}/top1", r.top1, step)

    # ----- the loop -------------------------------------------------------------------------------------------------
    progress = tqdm(initial=step, total=args.steps, desc="train", disable=not is_main, dynamic_ncols=True)
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    while step < args.steps:
        lr = learning_rate(step, args, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(args.accum_steps):
            # The source of each micro-batch is a coin seeded by (seed, step, micro): resume replays the same mix.
            u = derive_seed(args.seed, "mix", step, micro) / 2**63
            source = names[min(bisect.bisect_right(mix_cumulative, u), len(names) - 1)]
            wait_start = time.perf_counter()
            batch = next(sources[source])
            window_wait += time.perf_counter() - wait_start
            images = batch[0].to(device, non_blocking=True)
            targets = batch[1].to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if ids_file:
                ids_file.write(f"{step},{micro},{source}," + " ".join(map(str, sample_keys(batch[2]))) + "\n")
            sync = micro == args.accum_steps - 1 or world == 1
            with autocast, (nullcontext() if sync else model.no_sync()):
                losses = F.cross_entropy(model(images), targets, label_smoothing=args.label_smoothing,
                                         reduction="none")
                scaler.scale(losses.mean() / args.accum_steps).backward()
            if feedback is not None and source == "synthetic":
                feedback.update(losses.float(), targets)
            window_images += len(images) * world
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        if step % args.log_every == 0 or step == args.steps:
            loss = losses.mean().item()
            elapsed = time.perf_counter() - window_start
            rate, wait_share = window_images / elapsed, window_wait / elapsed
            metrics = loader.metrics() if loader is not None else {"queue_depth": 0, "workers": [], "restarts": 0}
            synth_rate = sum(w["images_per_s"] for w in metrics["workers"])
            progress.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}", wait=f"{wait_share:.0%}",
                                 queue=metrics["queue_depth"])
            if log_writer:
                log_writer.writerow([step, f"{loss:.4f}", f"{lr:.5f}", f"{rate:.2f}", f"{wait_share:.3f}",
                                     metrics["queue_depth"], f"{synth_rate:.2f}", metrics["restarts"]])
                log_file.flush()
            if tb:
                for key, value in {"loss": loss, "lr": lr, "images_per_s": rate, "data_wait_share": wait_share,
                                   "synth_images_per_s": synth_rate, "queue_depth": metrics["queue_depth"]}.items():
                    tb.add_scalar(f"train/{key}", value, step)
            window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        if ids_file:
            ids_file.flush()
        if step % args.checkpoint_every == 0 and step < args.steps:
            checkpoint()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(f"step{step}")
    progress.close()
    checkpoint()
    if is_main:
        print(f"saved {checkpoint_path} after {step} steps", flush=True)
    evaluate("final")
    if is_main and args.embedded_default:  # the embedded default's classes are the digits: score held-out real ones
        report_held_out_digits(raw_model, args.image_size, device, class_ids)
    if log_file:
        log_file.close()
    if tb:
        tb.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (CaptionStoreError, ModelLoadError) as err:  # a wrong path or input: the message says what to do
        raise SystemExit(f"train.py: error: {err}") from None
