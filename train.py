"""Train an image classifier on an endless stream of Caption-in-Prompt synthetic images.

    python train.py --online-synthesis                       # embedded default: tiny random generator, CPU-sized run
    python train.py --online-synthesis --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --captions imagenet-captions.lmdb --val-dir /data/imagenet/val --arch resnet50 --steps 100000 \
        --synth-devices auto --replay 4
    torchrun --nproc_per_node=4 train.py --online-synthesis ...   # DDP: each rank has its own synthesis workers

One file, top to bottom: arguments, the data, the model, the loop, checkpoints, the evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from streamsynth import SynthesisConfig, SyntheticStream
from streamsynth.defaults import embedded_captions, embedded_model
from streamsynth.stream import cached_dataset
from streamsynth.stream.dataset import IMAGENET_MEAN, IMAGENET_STD
from streamsynth.stream.devices import synthesis_devices
from streamsynth.stream.feedback import ClassFeedback
from streamsynth.synth import derive_seed
from streamsynth.synth.fast import FastPathOptions

log = logging.getLogger("train")

# With no --sd-model and no --captions the run uses the embedded default; these settings make it a CPU smoke run
# of a couple of minutes. Every one of them can still be set on the command line.
EMBEDDED_PRESET = {"arch": "resnet18", "steps": 20, "batch_size": 16, "image_size": 32, "workers": 1}
REAL_PRESET = {"arch": "resnet50", "steps": 100_000, "batch_size": 256, "image_size": 224, "workers": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--online-synthesis", action="store_true",
                      help="train on images synthesised on the fly (optionally mixed with --from-cache)")
    data.add_argument("--sd-model", help="Stable Diffusion hub id or diffusers folder (default: embedded tiny random model)")
    data.add_argument("--captions", help="caption store (LMDB) (default: embedded illustrative Imagenette captions)")
    data.add_argument("--prompt", default="cip", help="cip, basic, or a template with {name} and {caption}")
    data.add_argument("--replay", type=int, default=1, help="times each synthetic image is used (fresh augmentation)")
    data.add_argument("--epoch-size", type=int, help="trainer samples per virtual epoch (default: one per caption)")
    data.add_argument("--cache", help="also write every synthetic image to WebDataset shards in this folder")
    data.add_argument("--from-cache", help="train from the WebDataset shards in this folder (resampled, endless)")
    data.add_argument("--fresh-ratio", type=float, default=0.5,
                      help="with --online-synthesis and --from-cache: share of batches that are fresh")
    data.add_argument("--feedback-sampling", action="store_true",
                      help="draw more samples of the classes with high training loss (weights change per epoch)")
    data.add_argument("--feedback-floor", type=float, default=0.5,
                      help="share of every epoch spread evenly over all classes under --feedback-sampling")
    synth = p.add_argument_group("synthesis")
    synth.add_argument("--synth-devices", help="'auto' (every GPU no rank trains on) or a comma-separated list "
                                               "(default: the trainer's device)")
    synth.add_argument("--workers", type=int, help="synthesis worker processes per rank")
    synth.add_argument("--prefetch", type=int, default=2, help="batches each worker may hold ready")
    synth.add_argument("--synth-batch-size", type=int, default=8, help="images per UNet batch in a worker")
    synth.add_argument("--num-inference-steps", type=int, default=50)
    synth.add_argument("--guidance-scale", type=float, default=1.5)
    synth.add_argument("--scheduler", help="scheduler name (default: the model's own, PNDM for SD1.5)")
    synth.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="synthesis dtype (default: fp16 on CUDA)")
    synth.add_argument("--safety-checker", action="store_true", help="redraw images the model's safety checker flags")
    synth.add_argument("--fast", action="store_true",
                       help="fast path: Triton GroupNorm+SiLU/GEGLU, fused guidance+scheduler step, fused resize, "
                            "probed attention backend (see kernels/README.md)")
    train = p.add_argument_group("training")
    train.add_argument("--arch", help="torchvision classification model name")
    train.add_argument("--steps", type=int, help="optimizer steps")
    train.add_argument("--batch-size", type=int, help="images per step per rank")
    train.add_argument("--image-size", type=int, help="classifier input side, in pixels")
    train.add_argument("--lr", type=float, default=0.1, help="peak learning rate for batch 256 (scaled linearly)")
    train.add_argument("--weight-decay", type=float, default=5e-5)
    train.add_argument("--warmup-steps", type=int, default=None, help="default: 2%% of --steps")
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the classifier's device")
    train.add_argument("--seed", type=int, default=0, help="run seed: fixes every synthetic sample and the init")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/latest", help="folder for checkpoints and logs")
    out.add_argument("--val-dir", help="real ImageFolder to report top-1 on; class folders named by class id")
    out.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    out.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    out.add_argument("--log-every", type=int, default=10)
    out.add_argument("--log-sample-ids", action="store_true", help="write the sample ids of every fresh batch")
    args = p.parse_args(argv)

    if not args.online_synthesis and not args.from_cache:
        p.error("choose a data source: --online-synthesis, --from-cache DIR, or both")
    args.embedded_default = args.sd_model is None and args.captions is None
    preset = EMBEDDED_PRESET if args.embedded_default else REAL_PRESET
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 50)
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


def train_transform(image_size: int):
    """Standard ImageNet training augmentation, applied afresh to every (re)use of a synthetic image."""
    from torchvision.transforms import v2

    return v2.Compose([
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
        transform=train_transform(args.image_size), cache=args.cache,
        return_sample_ids=True,
    )


def endless(loader) -> Iterator:
    while True:
        yield from loader


def cached_batches(args: argparse.Namespace, rank: int) -> Iterator:
    dataset = cached_dataset(args.from_cache, train_transform(args.image_size), seed=args.seed + rank)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=max(1, args.workers))
    return endless(loader)


def build_classifier(arch: str, num_classes: int) -> torch.nn.Module:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise SystemExit(f"--arch {arch!r} is not a torchvision classification model; try resnet18 or resnet50")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def learning_rate(step: int, args: argparse.Namespace, peak: float) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < args.warmup_steps:
        return peak * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def save_checkpoint(path: Path, **state) -> None:
    """Written aside and renamed, so a crash mid-write never destroys the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def check_val_dir(val_dir: str, class_ids: list[str]) -> None:
    """Fail before training, not after, when the validation folder does not fit the caption store."""
    folder = Path(val_dir)
    if not folder.is_dir():
        raise SystemExit(f"--val-dir {val_dir} does not exist")
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in set(class_ids))
    if unknown:
        raise SystemExit(f"--val-dir {val_dir}: class folders {unknown[:5]} are not classes of the caption store")


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, val_dir: str, class_ids: list[str], image_size: int,
                  device: torch.device, batch_size: int) -> tuple[float, int]:
    """Top-1 on a real ImageFolder whose class folders are named by the caption store's class ids."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.ToImage(), v2.Resize(int(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    folder = ImageFolder(val_dir, transform=transform)
    to_store_label = torch.tensor([class_ids.index(c) for c in folder.classes])
    model.eval()
    correct = total = 0
    for images, targets in torch.utils.data.DataLoader(folder, batch_size=batch_size, num_workers=2):
        predictions = model(images.to(device)).argmax(1).cpu()
        correct += (predictions == to_store_label[targets]).sum().item()
        total += len(targets)
    model.train()
    return correct / max(1, total), total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world, local_rank, local_world, device = setup_distributed(args.device)
    is_main = rank == 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # ----- data: fresh synthetic batches, cached ones, or a fixed mix of both --------------------------------------
    devices = synthesis_devices(args.synth_devices, str(device), local_rank, local_world)
    stream = build_stream(args, devices)
    class_ids = [c.id for c in stream.store.classes]
    if args.val_dir and is_main:
        check_val_dir(args.val_dir, class_ids)
    feedback = ClassFeedback(stream.num_classes, floor=args.feedback_floor) if args.feedback_sampling else None
    loader = stream.loader(args.batch_size, num_workers=args.workers, prefetch_factor=args.prefetch,
                           pin_memory=device.type == "cuda", feedback=feedback)
    fresh = endless(loader) if args.online_synthesis else None
    cached = cached_batches(args, rank) if args.from_cache else None
    fresh_ratio = args.fresh_ratio if fresh and cached else float(fresh is not None)
    if is_main:
        print(f"data: {stream.num_classes} classes, prompt {stream.sampler.template.template!r}, "
              f"{args.num_inference_steps} steps, guidance {args.guidance_scale}, replay {args.replay}, "
              f"{world} rank(s) x {args.workers} worker(s) on {devices}, fresh share {fresh_ratio:.0%}; "
              f"classifier {args.arch} at {args.image_size}px on {device}", flush=True)
        (out / "run.json").write_text(json.dumps({"args": vars(args), "stream": stream.describe()}, indent=2))

    # ----- model and optimizer --------------------------------------------------------------------------------------
    model = build_classifier(args.arch, stream.num_classes).to(device)
    peak_lr = args.lr * args.batch_size * world / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    checkpoint_path = out / "checkpoint.pt"
    step = 0
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if len(state["loaders"]) != world:
            raise SystemExit(f"{checkpoint_path} was written by {len(state['loaders'])} ranks, this run has {world}: "
                             "resume with the same number of ranks")
        loader.load_state_dict(state["loaders"][rank])
        if is_main:
            print(f"resumed from {checkpoint_path} at step {step}", flush=True)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    raw_model = model.module if world > 1 else model

    def checkpoint() -> None:
        loaders = [None] * world
        if world > 1:
            dist.all_gather_object(loaders, loader.state_dict())
        else:
            loaders = [loader.state_dict()]
        if is_main:
            save_checkpoint(checkpoint_path, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                            step=step, arch=args.arch, num_classes=stream.num_classes, class_ids=class_ids,
                            loaders=loaders, args=vars(args), stream=stream.describe())

    # ----- logs -----------------------------------------------------------------------------------------------------
    log_file = open(out / "log.csv", "a", newline="") if is_main else None
    log_writer = csv.writer(log_file) if log_file else None
    if log_writer and log_file.tell() == 0:
        log_writer.writerow(["step", "loss", "lr", "images_per_s", "data_wait_share", "queue_depth",
                             "synth_images_per_s", "restarts"])
    ids_file = open(out / f"sample_ids-rank{rank}.csv", "a") if args.log_sample_ids else None

    # ----- the loop -------------------------------------------------------------------------------------------------
    progress = tqdm(initial=step, total=args.steps, desc="train", disable=not is_main, dynamic_ncols=True)
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    while step < args.steps:
        wait_start = time.perf_counter()
        from_fresh = derive_seed(args.seed, "mix", step) / 2**63 < fresh_ratio
        batch = next(fresh) if from_fresh else next(cached)
        window_wait += time.perf_counter() - wait_start
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if ids_file and from_fresh:
            ids_file.write(f"{step}," + " ".join(str(i) for i in batch[2].tolist()) + "\n")
        lr = learning_rate(step, args, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = F.cross_entropy(model(images), targets, label_smoothing=args.label_smoothing, reduction="none")
        loss = losses.mean()
        if feedback and from_fresh:
            feedback.update(losses, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window_images += len(images) * world
        progress.update(1)
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - window_start
            rate, wait_share = window_images / elapsed, window_wait / elapsed
            metrics = loader.metrics()
            synth_rate = sum(w["images_per_s"] for w in metrics["workers"])
            progress.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.1f}", wait=f"{wait_share:.0%}",
                                 queue=metrics["queue_depth"])
            if log_writer:
                log_writer.writerow([step, f"{loss.item():.4f}", f"{lr:.5f}", f"{rate:.2f}", f"{wait_share:.3f}",
                                     metrics["queue_depth"], f"{synth_rate:.2f}", metrics["restarts"]])
                log_file.flush()
            window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        if ids_file:
            ids_file.flush()
        if step % args.checkpoint_every == 0 and step < args.steps:
            checkpoint()
    progress.close()
    checkpoint()
    if is_main:
        print(f"saved {checkpoint_path} after {step} steps", flush=True)
        if args.val_dir:
            top1, count = evaluate_top1(raw_model, args.val_dir, class_ids, args.image_size, device, args.batch_size)
            print(f"val top-1: {top1:.2%} on {count} images of {args.val_dir}", flush=True)
            with open(out / "results.json", "w") as f:
                json.dump({"val_top1": top1, "val_images": count, "val_dir": args.val_dir}, f, indent=2)
        log_file.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
