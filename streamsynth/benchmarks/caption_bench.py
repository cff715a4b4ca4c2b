"""`streamsynth caption-bench`: captioning images/s of streamsynth's run against plain `model.generate`, same run.

Both sides caption the same JPEG files with the same model, dtype and decoding (greedy, `max_new_tokens`):
- baseline: the reference script's loop: batches of 65 decoded with PIL in the main process, the processor, then
  `model.generate`, then `batch_decode`;
- streamsynth: `caption_images`, the code path of `streamsynth caption` (workers, large batches, LMDB writes), for
  each batch size and KV-cache kind asked for; `streamsynth` in the result is the fastest of them, and `stages`
  splits one of its batches into the model's stages (`stage_breakdown`).
Times are wall-clock with the device synchronised (`benchtools.Timer(device, "wall")`: decoding on the CPU is part of
the cost); peak memory is benchtools' one measure, on the captioning device, per run.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..captions.architectures import BLIP2_ARCHITECTURES, random_blip2
from ..captions.captioners import (
    DECODE_ATTENTIONS, FP32_MATMULS, KV_CACHES, REFERENCE_MAX_NEW_TOKENS, Captioner, default_device,
    fp32_matmul_precision, load_captioner, resolve_dtype,
)
from ..captions.captioning import caption_images, default_batch_size, default_num_workers
from ..captions.graphed import image_features, query_features
from ..captions.images import ImageCollection, find_images
from ..captions.store import CaptionStore
from ..commands.args import comma_list, list_metavar, positive_int
from ..commands.captions import add_run_arguments
from ..kernels.decode_attention import decode_attention
from ..kernels.dispatch import runs_triton
from . import benchtools

# The reference captioning script's batch size.
REFERENCE_BATCH_SIZE = 65
# ImageNet's training images average about 400x350 pixels and 110 KB as JPEG.
_SAMPLE_IMAGE_SIZE = (500, 375)


def _write_sample_jpeg(folder: Path, n: int, num_classes: int, seed: int) -> None:
    rng = np.random.default_rng([seed, n])  # per image, so the files do not depend on how the work is split
    width, height = _SAMPLE_IMAGE_SIZE
    coarse = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(picture, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    path = folder / f"class{n % num_classes:03d}" / f"{n:06d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def write_sample_jpegs(folder: str | Path, count: int, num_classes: int = 10, seed: int = 0,
                       workers: int | None = None) -> Path:
    """`count` photo-sized JPEGs in an ImageFolder tree under `folder` (smooth colour fields plus grain).

    Written by `workers` processes (default: every CPU): about 18 ms an image on one core.
    """
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    folder = Path(folder)
    write = partial(_write_sample_jpeg, folder, num_classes=num_classes, seed=seed)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        for n in range(count):
            write(n)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write, range(count), chunksize=max(1, count // (4 * workers))))
    return folder


def _blank_batch(captioner: Captioner, size: int) -> torch.Tensor:
    """`size` preprocessed blank images: warm-up input of one batch shape."""
    return torch.stack([captioner.preprocessor(Image.new("RGB", _SAMPLE_IMAGE_SIZE))] * size)


def _bytes_of(ref) -> bytes:
    data = ref.read_bytes()
    if isinstance(data, str):  # the reference loop has no skipping: an unreadable file ends it, named
        raise OSError(f"{ref.path}: {data}")
    return data


@torch.inference_mode()
def _reference_loop(collection: ImageCollection, captioner: Captioner, batch_size: int) -> dict:
    """The reference script: decode in the main process, process, `model.generate`, decode tokens."""
    image_processor = captioner.preprocessor.image_processor
    device = captioner.device
    generate_s = 0.0
    benchtools.reset_peak_memory(device)
    with benchtools.Timer(device, "wall") as total:
        for first in range(0, len(collection.images), batch_size):
            refs = collection.images[first : first + batch_size]
            pictures = [Image.open(io.BytesIO(_bytes_of(ref))).convert("RGB") for ref in refs]
            pixels = image_processor(images=pictures, return_tensors="pt")["pixel_values"].to(device, captioner.dtype)
            with benchtools.Timer(device, "wall") as generate:
                output = captioner.model.generate(
                    pixel_values=pixels, max_new_tokens=captioner.max_new_tokens, do_sample=False, num_beams=1
                )
            generate_s += generate.seconds
            captioner.tokenizer.batch_decode(output, skip_special_tokens=True)
    n = len(collection.images)
    return {
        "method": f"PIL decode in the main process + processor + model.generate, batches of {batch_size}",
        "batch_size": batch_size,
        "images_per_s": round(n / total.seconds, 2),
        "generate_only_images_per_s": round(n / generate_s, 2),
        "seconds": round(total.seconds, 3),
        **benchtools.peak_memory(device).as_dict(),
    }


def _streamsynth_run(
    collection: ImageCollection, captioner: Captioner, batch_size: int, num_workers: int, workdir: Path
) -> dict:
    device = captioner.device
    # Every batch shape of the run first (a full one, and the last if shorter): CUDA kernel selection and, with a
    # static or graphed KV cache, compilation or capture for that shape stay out of the timing.
    for shape in {min(batch_size, len(collection.images)), len(collection.images) % batch_size} - {0}:
        captioner.caption(_blank_batch(captioner, shape))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what an earlier run left cached would count in this run's peak
    benchtools.reset_peak_memory(device)
    settings = (batch_size, captioner.kv_cache, captioner.fp32_matmul, captioner.decode_attention)
    store = workdir / f"bench-{'-'.join(map(str, settings))}.lmdb"
    with benchtools.Timer(device, "wall") as total:
        report = caption_images(collection, store, captioner, batch_size=batch_size, num_workers=num_workers,
                                progress=False)
    n = len(collection.images)
    return {
        "method": "streamsynth caption: decode and preprocess in DataLoader workers, LMDB writes",
        "batch_size": batch_size,
        "kv_cache": captioner.kv_cache,
        "fp32_matmul": captioner.fp32_matmul,
        "decode_attention": captioner.decode_attention,
        # What took the decoding steps: "triton" needs the kernel to run on the device (CUDA, or Triton's interpreter).
        "decode_attention_ran": "triton" if captioner.decode_attention == "triton" and runs_triton(
            "decode_attention", torch.empty(0, device=device)) else "sdpa",
        "num_workers": num_workers,
        "images_per_s": round(n / total.seconds, 2),
        "seconds": round(total.seconds, 3),
        "captioned": report.captions_in_store,
        # Of `seconds`, the captioner waiting for decoded images: the rest is the device's (and the writes').
        "input_wait_s": report.input_wait_s,
        **benchtools.peak_memory(device).as_dict(),
        "captions": _captions_by_key(store),  # taken out by run_benchmark once compared
    }


def _captions_by_key(store: Path) -> dict[str, str]:
    captions = CaptionStore(store)
    return {c.key: c.text for info in captions.classes for c in captions.captions(info.index)}


@torch.inference_mode()
def stage_breakdown(captioner: Captioner, batch_size: int, repeats: int = 3) -> dict | None:
    """Where one batch's captioning spends its time, for a BLIP-2 captioner (None for another architecture): the
    vision tower, the Q-Former with the projection into the language model, the language model's prefill (the
    first token) and its decoding (the other tokens). Each is the median of `repeats` timed calls after one untimed.

    On CUDA the Q-Former, which BLIP-2 keeps in fp32, is also timed with TF32 matrix multiplies: a lever, measured,
    not applied.
    """
    if captioner.model_type != "blip-2":
        return None
    model, device = captioner.model, captioner.device
    pixels = _blank_batch(captioner, batch_size).to(device, captioner.dtype)

    def seconds(run) -> float:
        return benchtools.measure(run, device, warmup=1, repeats=repeats).median_s

    def vision() -> torch.Tensor:
        return image_features(model, pixels)

    image_embeds = vision()

    def qformer() -> torch.Tensor:
        return query_features(model, image_embeds)

    vision_s, qformer_s = seconds(vision), seconds(qformer)
    first_token_s = seconds(lambda: captioner.caption(pixels, max_new_tokens=1))
    caption_s = seconds(lambda: captioner.caption(pixels))
    stages = {
        "batch_size": batch_size,
        "kv_cache": captioner.kv_cache,
        "decode_attention": captioner.decode_attention,
        "vision_s": round(vision_s, 4),
        "qformer_s": round(qformer_s, 4),
        "language_prefill_s": round(first_token_s - vision_s - qformer_s, 4),
        "language_decode_s": round(caption_s - first_token_s, 4),
        "decode_per_token_ms": round(1000 * (caption_s - first_token_s) / max(1, captioner.max_new_tokens - 1), 2),
        # The whole `Captioner.caption`: generate and the tokenizer's decoding into text.
        "caption_s": round(caption_s, 4),
        "caption_images_per_s": round(batch_size / caption_s, 2),
    }
    if device.type == "cuda":
        with fp32_matmul_precision("tf32", device):
            stages["qformer_tf32_s"] = round(seconds(qformer), 4)
    stages["busiest_ops"] = benchtools.busiest_ops(lambda: captioner.caption(pixels), device)
    stages["decode_attention_ms"] = decode_attention_ms(captioner, batch_size)
    return stages


def decode_attention_ms(captioner: Captioner, batch_size: int) -> dict[str, float | None]:
    """One layer's attention of a decoding step under each `scaled_dot_product_attention` backend
    (`benchtools.attention_backends_ms`) and, where it runs (CUDA), streamsynth's kernel for one query token
    (`triton`): one query token per caption over a static cache of the prompt and every new token, the mask hiding
    the half of the new tokens' slots not yet filled (a step in mid-caption). The profile of a batch (`busiest_ops`)
    found this call, in cuDNN's kernel, two thirds of a decoding step on an H200."""
    config = captioner.model.config.text_config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    device, dtype = captioner.device, captioner.dtype
    prompt = captioner.prompt_length
    keys = prompt + captioner.max_new_tokens
    generator = torch.Generator(device).manual_seed(0)
    query = torch.randn(batch_size, heads, 1, head_dim, generator=generator, device=device, dtype=dtype)
    key, value = (torch.randn(batch_size, heads, keys, head_dim, generator=generator, device=device, dtype=dtype)
                  for _ in range(2))
    mask = torch.zeros(batch_size, 1, 1, keys, device=device, dtype=dtype)
    mask[..., prompt + captioner.max_new_tokens // 2:] = torch.finfo(dtype).min
    times = benchtools.attention_backends_ms(query, key, value, mask)
    if runs_triton("decode_attention", query):
        run = partial(decode_attention, query, key, value, mask)
        times["triton"] = round(1000 * benchtools.measure(run, device, warmup=3, repeats=20).median_s, 4)
    return times


def run_benchmark(
    *,
    arch: str | None = "blip2-opt-2.7b",
    model: str | None = None,
    images: str | None = None,
    num_images: int = 2048,
    batch_sizes: Sequence[int] | None = None,
    kv_caches: Sequence[str] = ("auto",),
    fp32_matmuls: Sequence[str] = ("ieee",),
    decode_attentions: Sequence[str] = ("sdpa",),
    baseline_batch_size: int = REFERENCE_BATCH_SIZE,
    num_workers: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_new_tokens: int = 16,
) -> dict:
    """Benchmark a checkpoint (`model`) or a random-weight architecture (`arch`); returns the JSON-ready result.

    streamsynth's run is measured for every combination of `batch_sizes`, `kv_caches`, `fp32_matmuls` and
    `decode_attentions`, against one baseline. Each run also says which share of its captions equals the first run's
    (`same_captions_as_first`): a KV cache or batch size must not change a caption; TF32 or another attention may, and
    this measures how often (with random weights, whose near-uniform scores flip on any rounding, a pessimistic
    figure).
    """
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    unknown = set(kv_caches) - set(KV_CACHES)
    if unknown:
        raise ValueError(f"unknown KV cache kinds {sorted(unknown)}: choose from {list(KV_CACHES)}")
    unknown = set(fp32_matmuls) - set(FP32_MATMULS)
    if unknown:
        raise ValueError(f"unknown fp32 matmul precisions {sorted(unknown)}: choose from {list(FP32_MATMULS)}")
    unknown = set(decode_attentions) - set(DECODE_ATTENTIONS)
    if unknown:
        raise ValueError(f"unknown decode attentions {sorted(unknown)}: choose from {list(DECODE_ATTENTIONS)}")
    if model:
        captioner = load_captioner(model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    else:
        if arch not in BLIP2_ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}: choose one of {sorted(BLIP2_ARCHITECTURES)}")
        network, image_processor, tokenizer = random_blip2(arch, device, torch_dtype)
        captioner = Captioner(
            network, image_processor, tokenizer, name=f"random-weights:{arch}", device=device, dtype=torch_dtype,
            max_new_tokens=max_new_tokens,
        )
    batch_sizes = list(batch_sizes or [default_batch_size(device)])
    num_workers = default_num_workers() if num_workers is None else num_workers
    with tempfile.TemporaryDirectory(prefix="streamsynth-caption-bench-") as tmp:
        workdir = Path(tmp)
        source = images or write_sample_jpegs(workdir / "images", num_images)
        collection = find_images(source)
        collection.images = collection.images[:num_images]
        # Warm-up (CUDA context, kernel selection) outside the baseline's timing.
        captioner.caption(_blank_batch(captioner, baseline_batch_size))
        baseline = _reference_loop(collection, captioner, baseline_batch_size)
        runs = []
        for attention in decode_attentions:
            captioner.decode_attention = attention
            for fp32_matmul in fp32_matmuls:
                captioner.fp32_matmul = fp32_matmul
                for kv_cache in kv_caches:
                    captioner.kv_cache = kv_cache
                    for batch_size in batch_sizes:
                        runs.append(_streamsynth_run(collection, captioner, batch_size, num_workers, workdir))
    first = runs[0]["captions"]
    for run in runs:
        captions = run.pop("captions")
        run["same_captions_as_first"] = round(sum(captions.get(k) == text for k, text in first.items())
                                              / max(1, len(first)), 4)
    best = max(runs, key=lambda run: run["images_per_s"])
    captioner.kv_cache, captioner.fp32_matmul = best["kv_cache"], best["fp32_matmul"]
    captioner.decode_attention = best["decode_attention"]
    stages = stage_breakdown(captioner, best["batch_size"])
    host = benchtools.peak_memory("cpu")
    return {
        "benchmark": "caption-bench",
        "model": captioner.name,
        "random_weights": model is None,
        "parameters": sum(p.numel() for p in captioner.model.parameters()),
        "device": str(captioner.device),
        "device_name": benchtools.device_name(captioner.device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "num_images": len(collection.images),
        "images": images or f"{num_images} generated {_SAMPLE_IMAGE_SIZE[0]}x{_SAMPLE_IMAGE_SIZE[1]} JPEGs",
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "baseline": baseline,
        "streamsynth": best,
        "streamsynth_runs": runs,
        "speedup": round(best["images_per_s"] / baseline["images_per_s"], 3),
        "stages": stages,  # the fastest run's batch, stage by stage (stage_breakdown)
        # The main process's host memory over the whole benchmark, as benchtools measures it on the CPU.
        "peak_host_memory_bytes": host.bytes,
        "peak_host_memory_kind": host.kind,
        "environment": benchtools.environment(captioner.device),
    }


def write_result(result: dict, path: str | Path) -> Path:
    """The JSON result, and beside it (.png) a chart of images/s: the baseline and each streamsynth run."""
    path = benchtools.write_json(path, result)
    labels = [f"generate, batch {result['baseline']['batch_size']}"] + [
        f"streamsynth, batch {r['batch_size']}, {r['kv_cache']} cache"
        + (", TF32" if r["fp32_matmul"] == "tf32" else "")
        + (f", {r['decode_attention']} attention" if r["decode_attention"] != "sdpa" else "")
        for r in result["streamsynth_runs"]]
    values = [result["baseline"]["images_per_s"]] + [r["images_per_s"] for r in result["streamsynth_runs"]]
    benchtools.bar_chart(path.with_suffix(".png"), labels, values, "images/s",
                         f"caption-bench: {result['model']} on {result['device_name']}, {result['num_images']} images")
    return path


# ----- the command --------------------------------------------------------------------------------------------------

BENCH_FILE, BENCH_CHART = "caption-bench.json", "caption-bench.png"  # what caption-bench writes inside --out


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser(
        "caption-bench",
        help="captioning images/s: streamsynth's run against plain model.generate on batches of 65",
        description="Caption the same JPEG files twice with one model: the reference loop (PIL in the main process, "
        "model.generate on batches of 65) and streamsynth's run; write images/s, dtype, device and peak memory "
        "to OUT/caption-bench.json (and a chart, OUT/caption-bench.png). Without --captioner the weights are random "
        "(same FLOPs as the released checkpoint).",
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--captioner-arch", default="blip2-opt-2.7b", choices=sorted(BLIP2_ARCHITECTURES),
                        help="random-weight captioner architecture (tiny for CPU dry runs)")
    source.add_argument("--captioner", help="a captioner checkpoint (hub id or folder) instead of random weights")
    bench.add_argument("--images", help="images to caption (ImageFolder or shards) (default: generated JPEGs)")
    bench.add_argument("--num-images", type=positive_int, default=2048, help="images captioned by each run")
    bench.add_argument("--baseline-batch-size", type=positive_int, default=REFERENCE_BATCH_SIZE,
                       help="images per model.generate call in the reference loop")
    bench.add_argument("--max-new-tokens", type=positive_int, default=REFERENCE_MAX_NEW_TOKENS,
                       help="most tokens generated per caption (greedy decoding)")
    bench.add_argument("--kv-cache", type=comma_list(choices=KV_CACHES), default="auto",
                       metavar=list_metavar("KIND", KV_CACHES),
                       help="comma-separated KV cache kinds to measure, e.g. dynamic,static,graphed (static compiles "
                       "the decoding step on CUDA, graphed replays it from a CUDA graph; auto: caption's default)")
    bench.add_argument("--fp32-matmul", type=comma_list(choices=FP32_MATMULS), default="ieee",
                       metavar=list_metavar("PRECISION", FP32_MATMULS),
                       help="comma-separated fp32 matmul precisions to measure, e.g. ieee,tf32 (each run also reports "
                       "the share of its captions equal to the first run's)")
    bench.add_argument("--decode-attention", type=comma_list(choices=DECODE_ATTENTIONS), default="sdpa",
                       metavar=list_metavar("ATTENTION", DECODE_ATTENTIONS),
                       help="comma-separated decoding attentions to measure, e.g. sdpa,triton (as caption's option)")
    add_run_arguments(bench, batch_sizes=True)
    bench.add_argument("--out", default=".", metavar="DIR",
                       help=f"folder for the result: writes OUT/{BENCH_FILE} and its chart OUT/{BENCH_CHART}")
    bench.set_defaults(func=_caption_bench)




def _caption_bench(args: argparse.Namespace) -> int:
    logging.getLogger("streamsynth").setLevel(logging.WARNING)
    result = run_benchmark(
        arch=None if args.captioner else args.captioner_arch, model=args.captioner, images=args.images,
        num_images=args.num_images,
        batch_sizes=args.batch_size, kv_caches=args.kv_cache, fp32_matmuls=args.fp32_matmul,
        decode_attentions=args.decode_attention,
        baseline_batch_size=args.baseline_batch_size,
        num_workers=args.workers,
        device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps(result, indent=1))
    print(f"wrote {write_result(result, Path(args.out) / BENCH_FILE)}", file=sys.stderr)
    return 0
