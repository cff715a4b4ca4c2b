"""Train an image classifier on an endless stream of Caption-in-Prompt synthetic images.

    python train.py --online-synthesis                       # embedded default: tiny random generator, CPU-sized run
    python train.py --online-synthesis --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --captions imagenet-captions.lmdb --val-dir /data/imagenet/val --arch resnet50 --steps 100000
    torchrun --nproc_per_node=4 train.py --online-synthesis ...   # DDP: each rank has its own synthesis workers

One file, top to bottom: arguments, the stream, the model, the loop, the checkpoint, the evaluation.
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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from streamsynth import SynthesisConfig, SyntheticStream
from streamsynth.defaults import embedded_captions, embedded_model
from streamsynth.stream.dataset import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("train")

# With no --sd-model and no --captions the run uses the embedded default; these settings make it a CPU smoke run
# of a couple of minutes. Every one of them can still be set on the command line.
EMBEDDED_PRESET = {"arch": "resnet18", "steps": 20, "batch_size": 16, "image_size": 32, "workers": 1}
REAL_PRESET = {"arch": "resnet50", "steps": 100_000, "batch_size": 256, "image_size": 224, "workers": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--online-synthesis", action="store_true", required=True,
                   help="train on images synthesised on the fly (the only data source in this version)")
    p.add_argument("--sd-model", help="Stable Diffusion hub id or diffusers folder (default: embedded tiny random model)")
    p.add_argument("--captions", help="caption store (LMDB) (default: embedded illustrative Imagenette captions)")
    p.add_argument("--prompt", default="cip", help="cip, basic, or a template with {name} and {caption}")
    p.add_argument("--val-dir", help="real ImageFolder to report top-1 on; class folders named by class id")
    p.add_argument("--arch", help="torchvision classification model name")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="images per step per rank")
    p.add_argument("--image-size", type=int, help="classifier input side, in pixels")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate for batch 256 (scaled linearly)")
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 2%% of --steps")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the classifier's device")
    p.add_argument("--synth-devices", help="comma-separated devices for synthesis workers (default: the trainer's)")
    p.add_argument("--workers", type=int, help="synthesis worker processes per rank")
    p.add_argument("--synth-batch-size", type=int, default=8, help="images per UNet batch in a worker")
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--scheduler", help="scheduler name (default: the model's own, PNDM for SD1.5)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="synthesis dtype (default: fp16 on CUDA)")
    p.add_argument("--safety-checker", action="store_true", help="redraw images the model's safety checker flags")
    p.add_argument("--epoch-size", type=int, help="samples per virtual epoch (default: one per caption)")
    p.add_argument("--seed", type=int, default=0, help="run seed: fixes every synthetic sample and the init")
    p.add_argument("--out", default="runs/latest", help="folder for checkpoints and logs")
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)

    args.embedded_default = args.sd_model is None and args.captions is None
    preset = EMBEDDED_PRESET if args.embedded_default else REAL_PRESET
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 50)
    return args


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Under torchrun: one process per rank, NCCL on GPUs, gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        return rank, world, torch.device(device)
    return 0, 1, torch.device(device)


def build_stream(args: argparse.Namespace) -> SyntheticStream:
    from torchvision.transforms import v2

    model = args.sd_model or str(embedded_model())
    captions = args.captions or str(embedded_captions())
    # Standard ImageNet training augmentation, applied fresh to every synthetic image.
    transform = v2.Compose([
        v2.RandomResizedCrop(args.image_size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    synth_devices = args.synth_devices.split(",") if args.synth_devices else [str(args.device)]
    return SyntheticStream(
        captions, model, prompt=args.prompt, seed=args.seed, epoch_size=args.epoch_size,
        image_size=args.image_size, devices=synth_devices, dtype=args.dtype, scheduler=args.scheduler,
        synthesis=SynthesisConfig(args.num_inference_steps, args.guidance_scale, safety_check=args.safety_checker),
        synth_batch_size=args.synth_batch_size, transform=transform,
    )


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
    label_of = {cid: i for i, cid in enumerate(class_ids)}
    unknown = [c for c in folder.classes if c not in label_of]
    if unknown:
        raise SystemExit(f"--val-dir {val_dir}: class folders {unknown[:5]} are not classes of the caption store")
    to_store_label = torch.tensor([label_of[c] for c in folder.classes])
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
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    out = Path(args.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed + rank)

    stream = build_stream(args)
    loader = stream.loader(args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    if is_main:
        print(f"stream: {stream.num_classes} classes, prompt {stream.sampler.template.template!r}, "
              f"{args.num_inference_steps} steps, guidance {args.guidance_scale}, {world} rank(s) x {args.workers} "
              f"worker(s) on {stream.devices}; classifier {args.arch} at {args.image_size}px on {device}", flush=True)
        (out / "run.json").write_text(json.dumps({"args": vars(args), "stream": stream.describe()}, indent=2))

    model = build_classifier(args.arch, stream.num_classes).to(device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    peak_lr = args.lr * args.batch_size * world / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)

    log_file = open(out / "log.csv", "a", newline="") if is_main else None
    log_writer = csv.writer(log_file) if log_file else None
    if log_writer and log_file.tell() == 0:
        log_writer.writerow(["step", "loss", "lr", "images_per_s", "data_wait_share"])

    step, epoch = 0, 0
    progress = tqdm(total=args.steps, desc="train", disable=not is_main, dynamic_ncols=True)
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    while step < args.steps:
        stream.set_epoch(epoch)
        batches = iter(loader)
        while step < args.steps:
            wait_start = time.perf_counter()
            try:
                images, targets = next(batches)
            except StopIteration:
                break
            window_wait += time.perf_counter() - wait_start
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            lr = learning_rate(step, args, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(images), targets, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            window_images += len(images) * world
            progress.update(1)
            if step % args.log_every == 0 or step == args.steps:
                elapsed = time.perf_counter() - window_start
                rate, wait_share = window_images / elapsed, window_wait / elapsed
                progress.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.1f}", wait=f"{wait_share:.0%}")
                if log_writer:
                    log_writer.writerow([step, f"{loss.item():.4f}", f"{lr:.5f}", f"{rate:.2f}", f"{wait_share:.3f}"])
                    log_file.flush()
                window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        epoch += 1
    progress.close()

    raw_model = model.module if world > 1 else model
    class_ids = [c.id for c in stream.store.classes]
    if is_main:
        checkpoint = out / "checkpoint.pt"
        save_checkpoint(checkpoint, model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                        epoch=epoch, arch=args.arch, num_classes=stream.num_classes, class_ids=class_ids,
                        args=vars(args), stream=stream.describe())
        print(f"saved {checkpoint} after {step} steps", flush=True)
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
