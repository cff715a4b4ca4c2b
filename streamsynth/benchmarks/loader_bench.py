"""`streamsynth loader-bench`: images/s the stream hands a trainer, against plain diffusers and against the limit.

Two baselines run in the same process and the same run. The plain loop is what a user would write without
streamsynth: the model's diffusers pipeline (`StableDiffusionPipeline` for SD1.5) in the trainer's process with
per-sample generators, its output resized and handed to the consumer. The limit is a plain `DataLoader` over
pre-made uint8 images in memory with the same augmentation and batch size: what any loader costs when generation is
free. Each streamsynth configuration (loader workers x replay x where the augmentation runs) is timed over the same
number of batches after its first (model loading and worker start-up are reported apart), optionally with a
classifier step per batch as the consumer. Reported: delivered and generated images/s, the CPU milliseconds spent per
delivered image (process CPU time of the loader workers plus the trainer's own time inside the loader, not wall
time), the share of time the consumer waited, and peak memory.

Times are wall-clock (`benchtools.Timer(clock="wall")`): the trainer waits on other processes. Peak memory is
benchtools' one measure: the trainer's process for the plain loop and the limit, the largest worker for the stream.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import benchtools
from ..commands import options
from ..commands.args import add_device, comma_list, list_metavar, positive_int, resolve_device


AUGMENTS = ("batched", "per-image")
REPORT_FILE, CHART_FILE = "loader-bench.json", "loader-bench.png"  # written inside --out


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "loader-bench", help="images/s delivered by the stream (workers x replay) against a plain diffusers loop",
        description=__doc__.split("\n\n")[1],
    )
    options.add_config_options(p)
    options.add_source_options(p)
    add_device(p, "the synthesis device and the consumer's")
    p.add_argument("-b", "--batch-size", type=positive_int, default=8, help="images per batch")
    p.add_argument("--batches", type=positive_int, default=6,
                   help="timed batches per configuration (rounded up to whole generation groups of replay batches)")
    options.add_sampler_options(p)
    options.add_generator_options(p, devices_help=None)
    p.add_argument("-j", "--workers", type=comma_list(positive_int), default="1,2", metavar=list_metavar("N"),
                   help="comma-separated loader worker counts to try")
    p.add_argument("--replay", type=comma_list(positive_int), default="1,4", metavar=list_metavar("N"),
                   help="comma-separated replay factors to try")
    p.add_argument("--augment", type=comma_list(choices=AUGMENTS), default="batched",
                   metavar=list_metavar("WHERE", AUGMENTS),
                   help="comma-separated: batched (BatchAugment, in the trainer), per-image (torchvision v2 image by "
                   "image, in the workers)")
    p.add_argument("--consumer", choices=["none", "resnet18", "resnet50"], default="none",
                   help="what eats the batches: nothing, or a torchvision ResNet training step on --device")
    p.add_argument("--out", metavar="DIR",
                   help=f"also write the results to OUT/{REPORT_FILE} and a chart of delivered images/s, OUT/{CHART_FILE}")
    p.set_defaults(func=run, parser=p)


def _plain_diffusers(model: str, args, specs: list, consume) -> dict:
    from ..synth.loading import load_pipeline, model_family
    from ..synth.postprocess import resize_to_uint8

    device = torch.device(args.device)
    with benchtools.Timer() as startup:
        # The same sampler as the stream's (with --scheduler), in the family's own diffusers pipeline's loop.
        pipe = load_pipeline(model, device, args.dtype, scheduler=args.scheduler)
    family = model_family(model)
    size = family.native_size(pipe)
    benchtools.reset_peak_memory(device)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = specs[i * args.batch_size:(i + 1) * args.batch_size]
        generators = [torch.Generator().manual_seed(s.seed) for s in part]
        images = pipe([s.prompt for s in part], height=size, width=size,
                      num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                      generator=generators, output_type="pt", **family.reference_call_options).images
        return resize_to_uint8(images, args.image_size).float().cpu(), torch.tensor([s.label for s in part])

    consume(*batch(0))  # warm-up, as the stream's first batch is excluded too
    with benchtools.Timer(clock="wall") as total:
        waited, cpu = _consume_loop(lambda i: batch(i + 1), consume, args.batches)
    seconds = total.seconds
    images = args.batches * args.batch_size
    peak = benchtools.peak_memory(device)
    return {"config": "plain diffusers loop", "startup_s": startup.seconds, "images_delivered_per_s": images / seconds,
            "images_generated_per_s": images / waited, "consumer_wait_share": waited / seconds,
            "cpu_ms_per_image": 1000 * cpu / images,
            "peak_memory_bytes": peak.bytes, "peak_memory_kind": peak.kind + " (the trainer's process)"}


def _consume_loop(next_batch, consume, batches: int) -> tuple[float, float]:
    """Run `batches` rounds of `next_batch(i)` then `consume(images, labels)`; return (seconds waited for batches,
    the CPU seconds the trainer's process (all its threads) spent getting them)."""
    waited = cpu = 0.0
    for i in range(batches):
        cpu_start = time.process_time()
        with benchtools.Timer(clock="wall") as wait:
            images, labels = next_batch(i)[:2]
        cpu += time.process_time() - cpu_start
        waited += wait.seconds
        consume(images, labels)
    return waited, cpu


def _consumer(kind: str, num_classes: int, device: str | torch.device):
    """A training step on `device`, taking batches wherever the loader left them (CPU or `device`), as a trainer does.
    On CUDA it waits for its step to finish: the wait share then counts none of the consumer's own GPU time."""
    if kind == "none":
        return lambda images, labels: None
    import torchvision

    device = torch.device(device)
    model = getattr(torchvision.models, kind)(num_classes=num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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


def _stream_run(model: str, captions: str, args, workers: int, replay: int, augment: str) -> dict:
    from ..stream.dataset import SyntheticStream
    from ..stream.loader import StreamLoader

    needed = (-(-args.batches // replay) + 1) * replay * args.batch_size
    generator = options.generator_config(args, model, [args.device])
    stream = SyntheticStream(captions, generator, prompt=args.prompt, seed=args.seed, replay=replay,
                             batch_size=args.batch_size,
                             epoch_size=needed * workers * 2, transform=_augmentation(augment, args.image_size))
    loader = StreamLoader(stream, workers, augment_device=args.device)
    consume = _consumer(args.consumer, stream.num_classes, args.device)
    with benchtools.Timer(clock="wall") as startup:
        batches = iter(loader)
        images, labels = next(batches)[:2]
    consume(images, labels)
    _consume_loop(lambda i: next(batches), consume, replay - 1)  # the rest of the first group: time whole groups
    timed = -(-args.batches // replay) * replay
    before = loader.metrics()["workers"]
    with benchtools.Timer(clock="wall") as total:
        waited, trainer_cpu = _consume_loop(lambda i: next(batches), consume, timed)
    seconds = total.seconds
    metrics, deadline = loader.metrics(), time.monotonic() + 600
    while sum(w["images"] for w in metrics["workers"]) == sum(w["images"] for w in before):
        if time.monotonic() > deadline:
            raise RuntimeError("loader-bench: no worker made a group in 10 minutes after the timed window")
        time.sleep(0.05)  # every group of the window was made before it: wait for the next one's rate
        metrics = loader.metrics()
    # Workers record their CPU time as each group is made, and run ahead of the trainer by the prefetched groups,
    # so the window's worker CPU is taken per image made in it, times the images the delivered batches needed.
    made = sum(w["images"] for w in metrics["workers"]) - sum(w["images"] for w in before)
    worker_cpu_per_image = (sum(w["cpu_s"] for w in metrics["workers"]) - sum(w["cpu_s"] for w in before)) / made
    generated = sum(w["images_per_s"] for w in metrics["workers"])
    batches = None  # ends the loader's workers
    delivered = timed * args.batch_size
    return {"config": f"streamsynth, {workers} worker(s), replay {replay}, {augment}", "workers": workers,
            "replay": replay, "augment": augment, "startup_s": startup.seconds,
            "images_delivered_per_s": delivered / seconds, "images_generated_per_s": generated,
            "cpu_ms_per_image": 1000 * (worker_cpu_per_image * delivered / replay + trainer_cpu) / delivered,
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
    with benchtools.Timer(clock="wall") as startup:
        images, labels = next(batches)
    consume(images, labels)
    cpu_before = sum(cpu_seconds)
    with benchtools.Timer(clock="wall") as total:
        waited, trainer_cpu = _consume_loop(lambda i: next(batches), consume, args.batches)
    seconds = total.seconds
    peak = benchtools.peak_memory("cpu")
    delivered = args.batches * args.batch_size
    return {"config": f"limit: in-memory DataLoader, {workers} worker(s), per-image", "workers": workers,
            "startup_s": startup.seconds, "images_delivered_per_s": delivered / seconds,
            "images_generated_per_s": 0.0, "consumer_wait_share": waited / seconds,
            "cpu_ms_per_image": 1000 * (sum(cpu_seconds) - cpu_before + trainer_cpu) / delivered,
            "peak_memory_bytes": peak.bytes, "peak_memory_kind": peak.kind + " (the trainer's process)"}


def run(args: argparse.Namespace) -> int:
    from ..stream.dataset import SyntheticStream
    from ..synth.tiny import RANDOM_WEIGHTS_NOTICE, has_random_weights

    args = options.resolve(args)
    args.device = resolve_device(args.device)
    if args.print_config:
        options.print_config(args)
        return 0
    model, captions = options.source_paths(args)
    probe = SyntheticStream(captions, options.generator_config(args, model, [args.device]), prompt=args.prompt,
                            seed=args.seed, epoch_size=10**6)
    specs = [probe.spec(i) for i in range((args.batches + 1) * args.batch_size)]
    results = [_plain_diffusers(model, args, specs, _consumer(args.consumer, probe.num_classes, args.device))]
    pool = torch.randint(0, 256, (max(4 * args.batch_size, 256), 3, args.image_size, args.image_size),
                         dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool_labels = torch.arange(len(pool)) % probe.num_classes
    for workers in args.workers:
        consume = _consumer(args.consumer, probe.num_classes, args.device)
        results.append(_in_memory_limit(args, pool, pool_labels, workers, consume))
    for workers in args.workers:
        for replay in args.replay:
            for augment in args.augment:
                results.append(_stream_run(model, captions, args, workers, replay, augment))
    device_name = benchtools.device_name(args.device)
    report = {"benchmark": "loader-bench", "device": device_name, "model": model,
              "random_weights": has_random_weights(model),
              "settings": options.recorded(args),
              "environment": benchtools.environment(args.device), "results": results}
    print(f"{'configuration':<56}{'start-up s':>11}{'delivered img/s':>17}{'generated img/s':>17}"
          f"{'CPU ms/img':>12}{'wait':>7}{'peak MiB':>10}")
    for r in results:
        wait = f"{r['consumer_wait_share']:.0%}"
        cpu = f"{r['cpu_ms_per_image']:.2f}" if "cpu_ms_per_image" in r else "-"
        print(f"{r['config']:<56}{r['startup_s']:>11.1f}{r['images_delivered_per_s']:>17.2f}"
              f"{r['images_generated_per_s']:>17.2f}{cpu:>12}{wait:>7}{r['peak_memory_bytes'] / 2**20:>10.0f}")
    print(f"device: {device_name}; {args.batches} timed batches of {args.batch_size}, {args.num_inference_steps} "
          f"steps, guidance {args.guidance_scale}, consumer {args.consumer}")
    if report["random_weights"]:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTICE}")
    if args.out:
        path = benchtools.write_json(Path(args.out) / REPORT_FILE, report)
        chart = benchtools.bar_chart(Path(args.out) / CHART_FILE, [r["config"] for r in results],
                                     [r["images_delivered_per_s"] for r in results], "images/s delivered",
                                     f"loader-bench on {device_name}: {args.batches} batches of {args.batch_size}, "
                                     f"{args.num_inference_steps} steps, consumer {args.consumer}")
        print(f"wrote {path} and {chart}")
    return 0
