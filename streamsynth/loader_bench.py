"""`streamsynth loader-bench`: images/s the stream hands a trainer, against plain diffusers in the same run.

The baseline is what a user would write without streamsynth: a loop in the trainer's process that calls diffusers'
`StableDiffusionPipeline` with per-sample generators, resizes its output and hands it to the consumer. Each streamsynth configuration
(loader workers x replay) is timed over the same number of batches after its first batch (model loading and worker
start-up are reported apart), optionally with a classifier step per batch as the consumer, and reports delivered
images/s, generated images/s, the share of time the consumer waited, and the metrics of `StreamLoader`.

Times are wall-clock (`benchtools.Timer()`): the trainer waits on other processes. Peak memory is benchtools'
one measure: the trainer's process for the plain loop, the largest worker for the stream.
"""

from __future__ import annotations

import argparse

import torch

from . import benchtools
from .synth.config import GeneratorConfig, SynthesisConfig


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "loader-bench", help="images/s delivered by the stream (workers x replay) against a plain diffusers loop",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--sd-model", help="diffusers folder or hub id (default: the embedded tiny random model)")
    p.add_argument("--captions", help="caption store (default: the embedded illustrative captions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="synthesis device")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=6, help="timed batches per configuration")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="comma-separated loader worker counts to try")
    p.add_argument("--replay", default="1,4", help="comma-separated replay factors to try")
    p.add_argument("--consumer", choices=["none", "resnet18"], default="none",
                   help="what eats the batches: nothing, or a resnet18 training step on the CPU")
    p.add_argument("--out", help="write the results as JSON here (and a chart of delivered images/s beside it, .png)")
    p.set_defaults(func=run)


def _plain_diffusers(model: str, args, specs: list, consume) -> dict:
    from diffusers import StableDiffusionPipeline

    from .synth.loading import loading_options, quiet_hf_progress, resolve_dtype
    from .synth.postprocess import resize_to_uint8

    quiet_hf_progress()
    device = torch.device(args.device)
    with benchtools.Timer() as startup:
        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=resolve_dtype(args.dtype, device),
                                                       safety_checker=None, requires_safety_checker=False,
                                                       **loading_options()).to(device)
        pipe.set_progress_bar_config(disable=True)
    benchtools.reset_peak_memory(device)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = specs[i * args.batch_size:(i + 1) * args.batch_size]
        generators = [torch.Generator().manual_seed(s.seed) for s in part]
        images = pipe([s.prompt for s in part], num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=generators, output_type="pt").images
        return resize_to_uint8(images, args.image_size).float().cpu(), torch.tensor([s.label for s in part])

    consume(*batch(0))  # warm-up, as the stream's first batch is excluded too
    seconds, waited = _consume_loop(lambda i: batch(i + 1), consume, args.batches)
    images = args.batches * args.batch_size
    peak = benchtools.peak_memory(device)
    return {"config": "plain diffusers loop", "startup_s": startup.seconds, "images_delivered_per_s": images / seconds,
            "images_generated_per_s": images / waited, "consumer_wait_share": waited / seconds,
            "peak_memory_bytes": peak.bytes, "peak_memory_kind": peak.kind + " (the trainer's process)"}


def _consume_loop(next_batch, consume, batches: int) -> tuple[float, float]:
    """(seconds, seconds waited for batches) of `batches` rounds of `next_batch(i)` then `consume(images, labels)`."""
    waited = 0.0
    with benchtools.Timer() as total:
        for i in range(batches):
            with benchtools.Timer() as wait:
                images, labels = next_batch(i)
            waited += wait.seconds
            consume(images, labels)
    return total.seconds, waited


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


def _stream_run(model: str, captions: str, args, workers: int, replay: int) -> dict:
    from .stream.dataset import SyntheticStream
    from .stream.loader import StreamLoader

    needed = (args.batches + 1) * args.batch_size
    generator = GeneratorConfig(model, synthesis=SynthesisConfig(args.steps, args.guidance), image_size=args.image_size,
                                devices=(args.device,), dtype=args.dtype, batch_size=args.batch_size)
    stream = SyntheticStream(captions, generator, replay=replay, batch_size=args.batch_size,
                             epoch_size=needed * workers * 2)
    loader = StreamLoader(stream, workers)
    consume = _consumer(args.consumer, stream.num_classes)
    with benchtools.Timer() as startup:
        batches = iter(loader)
        images, labels = next(batches)
    consume(images, labels)
    seconds, waited = _consume_loop(lambda i: next(batches), consume, args.batches)
    metrics = loader.metrics()
    generated = sum(w["images_per_s"] for w in metrics["workers"])
    batches = None  # ends the loader's workers
    return {"config": f"streamsynth, {workers} worker(s), replay {replay}", "workers": workers, "replay": replay,
            "startup_s": startup.seconds, "images_delivered_per_s": args.batches * args.batch_size / seconds,
            "images_generated_per_s": generated, "consumer_wait_share": waited / seconds,
            "peak_memory_bytes": max(w["peak_memory_bytes"] for w in metrics["workers"]),
            "peak_memory_kind": metrics["workers"][0]["peak_memory_kind"] + " (largest worker)", "loader": metrics}


def run(args: argparse.Namespace) -> int:
    from .defaults import embedded_captions, embedded_model
    from .stream.dataset import SyntheticStream
    from .synth.tiny import RANDOM_WEIGHTS_NOTICE, has_random_weights

    model = args.sd_model or str(embedded_model())
    captions = args.captions or str(embedded_captions())
    probe = SyntheticStream(captions, GeneratorConfig(model, devices=(args.device,)), epoch_size=10**6)
    specs = [probe.spec(i) for i in range((args.batches + 1) * args.batch_size)]
    results = [_plain_diffusers(model, args, specs, _consumer(args.consumer, probe.num_classes))]
    for workers in (int(w) for w in args.workers.split(",")):
        for replay in (int(r) for r in args.replay.split(",")):
            results.append(_stream_run(model, captions, args, workers, replay))
    device_name = benchtools.device_name(args.device)
    report = {"benchmark": "loader-bench", "device": device_name, "model": model,
              "random_weights": has_random_weights(model),
              "settings": {k: v for k, v in vars(args).items() if k != "func"},
              "environment": benchtools.environment(args.device), "results": results}
    print(f"{'configuration':<40}{'start-up s':>11}{'delivered img/s':>17}{'generated img/s':>17}{'wait':>7}"
          f"{'peak MiB':>10}")
    for r in results:
        wait = f"{r['consumer_wait_share']:.0%}"
        print(f"{r['config']:<40}{r['startup_s']:>11.1f}{r['images_delivered_per_s']:>17.2f}"
              f"{r['images_generated_per_s']:>17.2f}{wait:>7}{r['peak_memory_bytes'] / 2**20:>10.0f}")
    print(f"device: {device_name}; {args.batches} timed batches of {args.batch_size}, {args.steps} steps, "
          f"guidance {args.guidance}, consumer {args.consumer}")
    if report["random_weights"]:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTICE}")
    if args.out:
        benchtools.write_json(args.out, report)
        chart = benchtools.bar_chart(str(args.out).removesuffix(".json") + ".png", [r["config"] for r in results],
                                     [r["images_delivered_per_s"] for r in results], "images/s delivered",
                                     f"loader-bench on {device_name}: {args.batches} batches of {args.batch_size}, "
                                     f"{args.steps} steps, consumer {args.consumer}")
        print(f"wrote {args.out} and {chart}")
    return 0
