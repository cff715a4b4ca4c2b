"""`streamsynth loader-bench`: images/s the stream hands a trainer, against plain diffusers and against the limit.

Two baselines run in the same process and the same run. The plain loop is what a user would write without
streamsynth: diffusers' `StableDiffusionPipeline` in the trainer's process with per-sample generators, its output
resized and handed to the consumer. The limit is a plain `DataLoader` over pre-made uint8 images in memory with the
same augmentation and batch size: what any loader costs when generation is free. Each streamsynth configuration
(loader workers x replay x where the augmentation runs) is timed over the same number of batches after its first
(model loading and worker start-up are reported apart), optionally with a classifier step per batch as the
consumer. Reported: delivered and generated images/s, the CPU milliseconds spent per delivered image (process CPU
time of the loader workers plus the trainer's own time inside the loader, not wall time), the share of time the
consumer waited, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..synth.config import GeneratorConfig, SynthesisConfig
from .metrics import peak_memory_bytes, peak_memory_kind


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "loader-bench", help="images/s delivered by the stream (workers x replay) against a plain diffusers loop",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--sd-model", help="diffusers folder or hub id (default: the embedded digits model)")
    p.add_argument("--captions", help="caption store (default: the embedded digits captions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="synthesis device")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=6,
                   help="timed batches per configuration (rounded up to whole generation groups of replay batches)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="comma-separated loader worker counts to try")
    p.add_argument("--replay", default="1,4", help="comma-separated replay factors to try")
    p.add_argument("--augment", default="batched", help="comma-separated: batched (BatchAugment, in the trainer), "
                   "per-image (torchvision v2 image by image, in the workers)")
    p.add_argument("--consumer", choices=["none", "resnet18"], default="none",
                   help="what eats the batches: nothing, or a resnet18 training step on the CPU")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=run)


def _plain_diffusers(model: str, args, specs: list, consume) -> dict:
    from diffusers import StableDiffusionPipeline

    from ..synth.loading import quiet_hf_progress, resolve_dtype
    from ..synth.postprocess import resize_to_uint8

    quiet_hf_progress()
    device = torch.device(args.device)
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=resolve_dtype(args.dtype, device),
                                                   safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    startup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = specs[i * args.batch_size:(i + 1) * args.batch_size]
        generators = [torch.Generator().manual_seed(s.seed) for s in part]
        images = pipe([s.prompt for s in part], num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=generators, output_type="pt").images
        return resize_to_uint8(images, args.image_size).float().cpu(), torch.tensor([s.label for s in part])

    consume(*batch(0))  # warm-up, as the stream's first batch is excluded too
    waited, started, cpu_started = 0.0, time.perf_counter(), time.process_time()
    for i in range(1, args.batches + 1):
        wait_start = time.perf_counter()
        images, labels = batch(i)
        waited += time.perf_counter() - wait_start
        consume(images, labels)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    images = args.batches * args.batch_size
    return {"config": "plain diffusers loop", "startup_s": startup_s, "images_delivered_per_s": images / seconds,
            "images_generated_per_s": images / waited, "consumer_wait_share": waited / seconds,
            "cpu_ms_per_image": 1000 * cpu / images,
            "peak_memory_bytes": peak_memory_bytes(device),
            "peak_memory_kind": peak_memory_kind(device) + " (the trainer's process)"}


def _consumer(kind: str, num_classes: int):
    if kind == "none":
        return lambda images, labels: None
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _augmentation(kind: str, size: int):
    """The same crop, flip and normalisation either way: batched (`BatchAugment`) or a torchvision v2 pipeline."""
    from ..transforms import BatchAugment

    augment = BatchAugment(size)
    if kind == "batched":
        return augment
    if kind != "per-image":
        raise ValueError(f"unknown augmentation {kind!r}: use batched or per-image")
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=augment.scale, ratio=augment.ratio, antialias=False),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(augment.mean, augment.std)])


def _timed(batches, consume, count: int) -> tuple[float, float, float]:
    """(wall seconds, seconds waited on the loader, the trainer thread's CPU seconds inside the loader)."""
    waited = cpu = 0.0
    started = time.perf_counter()
    for _ in range(count):
        wait_start, cpu_start = time.perf_counter(), time.thread_time()
        images, labels = next(batches)[:2]
        cpu += time.thread_time() - cpu_start
        waited += time.perf_counter() - wait_start
        consume(images, labels)
    return time.perf_counter() - started, waited, cpu


def _stream_run(model: str, captions: str, args, workers: int, replay: int, augment: str) -> dict:
    from .dataset import SyntheticStream
    from .loader import StreamLoader

    needed = (-(-args.batches // replay) + 1) * replay * args.batch_size
    generator = GeneratorConfig(model, synthesis=SynthesisConfig(args.steps, args.guidance), image_size=args.image_size,
                                devices=(args.device,), dtype=args.dtype, batch_size=args.batch_size)
    stream = SyntheticStream(captions, generator, replay=replay, batch_size=args.batch_size,
                             epoch_size=needed * workers * 2, transform=_augmentation(augment, args.image_size))
    loader = StreamLoader(stream, workers, augment_device=args.device)
    consume = _consumer(args.consumer, stream.num_classes)
    started = time.perf_counter()
    batches = iter(loader)
    images, labels = next(batches)
    startup_s = time.perf_counter() - started
    consume(images, labels)
    _timed(batches, consume, replay - 1)  # the rest of the first group: the timed window holds whole groups
    timed = -(-args.batches // replay) * replay
    cpu_before = sum(w["cpu_s"] for w in loader.metrics()["workers"])
    seconds, waited, trainer_cpu = _timed(batches, consume, timed)
    metrics = loader.metrics()
    worker_cpu = sum(w["cpu_s"] for w in metrics["workers"]) - cpu_before
    generated = sum(w["images_per_s"] for w in metrics["workers"])
    del batches
    delivered = timed * args.batch_size
    return {"config": f"streamsynth, {workers} worker(s), replay {replay}, {augment}", "workers": workers,
            "replay": replay, "augment": augment, "startup_s": startup_s,
            "images_delivered_per_s": delivered / seconds, "images_generated_per_s": generated,
            "cpu_ms_per_image": 1000 * (worker_cpu + trainer_cpu) / delivered,
            "consumer_wait_share": waited / seconds,
            "peak_memory_bytes": max(w["peak_memory_bytes"] for w in metrics["workers"]),
            "peak_memory_kind": metrics["workers"][0]["peak_memory_kind"] + " (largest worker)", "loader": metrics}


class _InMemoryImages(torch.utils.data.Dataset):
    """Pre-made uint8 images with a per-image transform; each worker records its process CPU time as it goes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform, cpu_seconds):
        self.images, self.labels, self.transform, self.cpu_seconds = images, labels, transform, cpu_seconds

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = torch.utils.data.get_worker_info()
        item = self.transform(self.images[index]), self.labels[index]
        if info is not None:
            self.cpu_seconds[info.id] = time.process_time()
        return item


def _in_memory_limit(args, images: torch.Tensor, labels: torch.Tensor, workers: int, consume) -> dict:
    """A plain DataLoader over pre-made uint8 images, augmented image by image as a user's loader would."""
    import multiprocessing as mp

    cpu_seconds = mp.get_context().Array("d", max(1, workers), lock=False)
    dataset = _InMemoryImages(images, labels, _augmentation("per-image", args.image_size), cpu_seconds)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)

    def endless():
        while True:
            yield from loader

    batches = endless()
    started = time.perf_counter()
    consume(*next(batches))
    startup_s = time.perf_counter() - started
    cpu_before = sum(cpu_seconds)
    seconds, waited, trainer_cpu = _timed(batches, consume, args.batches)
    delivered = args.batches * args.batch_size
    return {"config": f"limit: in-memory DataLoader, {workers} worker(s), per-image", "workers": workers,
            "startup_s": startup_s, "images_delivered_per_s": delivered / seconds,
            "images_generated_per_s": 0.0, "consumer_wait_share": waited / seconds,
            "cpu_ms_per_image": 1000 * (sum(cpu_seconds) - cpu_before + trainer_cpu) / delivered,
            "peak_memory_bytes": peak_memory_bytes(torch.device("cpu")),
            "peak_memory_kind": peak_memory_kind("cpu") + " (the trainer's process)"}


def run(args: argparse.Namespace) -> int:
    from ..defaults import embedded_captions, embedded_model
    from ..synth.tiny import RANDOM_WEIGHTS_NOTICE, has_random_weights
    from .dataset import SyntheticStream

    model = args.sd_model or str(embedded_model())
    captions = args.captions or str(embedded_captions())
    probe = SyntheticStream(captions, GeneratorConfig(model, devices=(args.device,)), epoch_size=10**6)
    specs = [probe.spec(i) for i in range((args.batches + 1) * args.batch_size)]
    results = [_plain_diffusers(model, args, specs, _consumer(args.consumer, probe.num_classes))]
    pool = torch.randint(0, 256, (max(4 * args.batch_size, 256), 3, args.image_size, args.image_size),
                         dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool_labels = torch.arange(len(pool)) % probe.num_classes
    worker_counts = [int(w) for w in args.workers.split(",")]
    for workers in worker_counts:
        results.append(_in_memory_limit(args, pool, pool_labels, workers, _consumer(args.consumer, probe.num_classes)))
    for workers in worker_counts:
        for replay in (int(r) for r in args.replay.split(",")):
            for augment in args.augment.split(","):
                results.append(_stream_run(model, captions, args, workers, replay, augment))
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    report = {"device": device_name, "model": model, "random_weights": has_random_weights(model),
              "settings": {k: v for k, v in vars(args).items() if k != "func"}, "results": results}
    print(f"{'configuration':<56}{'start-up s':>11}{'delivered img/s':>17}{'generated img/s':>17}"
          f"{'CPU ms/img':>12}{'wait':>7}{'peak MiB':>10}")
    for r in results:
        wait = f"{r['consumer_wait_share']:.0%}"
        cpu = f"{r['cpu_ms_per_image']:.2f}" if "cpu_ms_per_image" in r else "-"
        print(f"{r['config']:<56}{r['startup_s']:>11.1f}{r['images_delivered_per_s']:>17.2f}"
              f"{r['images_generated_per_s']:>17.2f}{cpu:>12}{wait:>7}{r['peak_memory_bytes'] / 2**20:>10.0f}")
    print(f"device: {device_name}; {args.batches} timed batches of {args.batch_size}, {args.steps} steps, "
          f"guidance {args.guidance}, consumer {args.consumer}")
    if report["random_weights"]:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTICE}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0
