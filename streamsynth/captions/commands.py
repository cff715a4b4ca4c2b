"""`streamsynth captions import|stats`, `streamsynth caption` and `streamsynth caption-bench`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from itertools import islice

from ..prompts.classnames import load_name_map
from .architectures import BLIP2_ARCHITECTURES
from .bench import KV_CACHES, REFERENCE_BATCH_SIZE
from .captioners import DEFAULT_MODEL, DTYPES, REFERENCE_MAX_NEW_TOKENS
from .importers import import_captions
from .store import CaptionStore


def add_commands(subparsers) -> None:
    captions = subparsers.add_parser("captions", help="import and inspect caption stores")
    sub = captions.add_subparsers(dest="captions_command", required=True, metavar="ACTION")

    imp = sub.add_parser(
        "import",
        help="build a caption store from a folder of per-class text files, a JSONL or a CSV file",
        description="Build a caption store. SOURCE is a folder with one text file per class (file name = class id, "
        "one caption per line), a .jsonl file or a .csv file with class and caption fields.",
    )
    imp.add_argument("source", help="folder, .jsonl or .csv")
    imp.add_argument("--out", required=True, help="the caption store to create (an LMDB folder; must not exist)")
    imp.add_argument("--names", help="JSON or CSV map of class id → readable name (default: ImageNet-1K names)")
    imp.add_argument("--class-field", default="class")
    imp.add_argument("--caption-field", default="caption")
    imp.add_argument("--key-field", default="key", help="field naming the source image (optional in the data)")
    imp.set_defaults(func=_import)

    stats = sub.add_parser("stats", help="counts per class and a few example captions")
    stats.add_argument("store")
    stats.add_argument("--examples", type=int, default=2, help="captions shown per class")
    stats.add_argument("--check", action="store_true", help="read every record and report the first damaged one")
    stats.set_defaults(func=_stats)

    caption = subparsers.add_parser(
        "caption",
        help="caption real images (ImageFolder or WebDataset shards) into a caption store",
        description="Caption every image once (BLIP-2 by default: greedy, at most 16 new tokens) and store the "
        "captions with their class and image key (never pixels). Unreadable images are skipped and listed in "
        "OUT.report.json. An interrupted run continues with --resume.",
    )
    caption.add_argument(
        "--images", required=True,
        help="ImageFolder root (one folder per class id), a .tar shard, a folder of shards or a brace pattern",
    )
    caption.add_argument("--out", required=True, help="the caption store (an LMDB folder) to create or --resume")
    caption.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder (BLIP-2, BLIP or VisionEncoderDecoder)")
    caption.add_argument("--names", help="JSON or CSV map of class id → readable name (default: ImageNet-1K names)")
    caption.add_argument("--class-field", default="cls", help="WebDataset field holding the class id (default: cls)")
    caption.add_argument("--prompt", help="BLIP-2 conditional captioning prefix, e.g. 'a photo of'; stripped from captions")
    caption.add_argument("--max-new-tokens", type=int, default=REFERENCE_MAX_NEW_TOKENS)
    _add_run_arguments(caption)
    caption.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    caption.add_argument("--commit-every", type=int, default=1024, help="captions per LMDB transaction")
    caption.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption.add_argument("--static-kv-cache", action="store_true",
                         help="preallocated KV cache; on CUDA the decoding step is compiled (see caption-bench)")
    caption.set_defaults(func=_caption)

    bench = subparsers.add_parser(
        "caption-bench",
        help="captioning images/s: streamsynth's run against plain model.generate on batches of 65",
        description="Caption the same JPEG files twice with one model: the reference loop (PIL in the main process, "
        "model.generate on batches of 65) and streamsynth's run; write images/s, dtype, device and peak memory "
        "as JSON. Without --model the weights are random (same FLOPs as the released checkpoint).",
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--arch", default="blip2-opt-2.7b", choices=sorted(BLIP2_ARCHITECTURES),
                        help="random-weight architecture (default: blip2-opt-2.7b; tiny for CPU dry runs)")
    source.add_argument("--model", help="a checkpoint (hub id or folder) instead of random weights")
    bench.add_argument("--images", help="images to caption (ImageFolder or shards); default: generated JPEGs")
    bench.add_argument("--num-images", type=int, default=2048)
    bench.add_argument("--baseline-batch-size", type=int, default=REFERENCE_BATCH_SIZE)
    bench.add_argument("--max-new-tokens", type=int, default=REFERENCE_MAX_NEW_TOKENS)
    bench.add_argument("--kv-cache", nargs="+", choices=KV_CACHES, default=["dynamic"],
                       help="KV cache kinds to measure, e.g. dynamic static (static compiles the step on CUDA)")
    _add_run_arguments(bench, batch_sizes=True)
    bench.add_argument("--out", default="caption-bench.json", help="where to write the JSON result")
    bench.set_defaults(func=_caption_bench)


def _add_run_arguments(parser: argparse.ArgumentParser, batch_sizes: bool = False) -> None:
    if batch_sizes:
        parser.add_argument("--batch-size", type=int, nargs="+",
                            help="images per generate call, one run each (default: 256 on CUDA, 8 on CPU)")
    else:
        parser.add_argument("--batch-size", type=int, help="images per generate call (default: 256 on CUDA, 8 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--num-workers", type=int, help="DataLoader processes decoding images (default: min(8, CPUs))")


def _import(args: argparse.Namespace) -> int:
    store = import_captions(
        args.source,
        args.out,
        name_map=load_name_map(args.names) if args.names else None,
        class_field=args.class_field,
        caption_field=args.caption_field,
        key_field=args.key_field,
    )
    print(f"wrote {len(store)} captions of {store.num_classes} classes to {store.path}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    store = CaptionStore(args.store)
    meta = store.meta
    print(f"{store.path}: {len(store)} captions, {store.num_classes} classes, captioner {meta['captioner']!r}, "
          f"schema {meta['schema_version']}, created {meta['created']}")
    counts = [c.num_captions for c in store.classes] or [0]
    print(f"captions per class: min {min(counts)}, mean {sum(counts) / len(counts):.1f}, max {max(counts)}")
    for info in store.classes:
        print(f"{info.index:5d}  {info.id:<12} {info.name:<28} {info.num_captions:7d}")
        for caption in islice(store.captions(info.index), args.examples):
            print(f"{'':7}- {caption.text}")
    empty = [c.id for c in store.classes if c.num_captions == 0]
    if empty:
        print(f"warning: {len(empty)} classes have no captions and will never be sampled: {empty[:10]}")
    if args.check:
        print(f"check: all {store.verify()} captions read back intact")
    return 0


def _caption(args: argparse.Namespace) -> int:
    from .captioners import load_captioner
    from .captioning import caption_images, report_path
    from .images import find_images

    # List the images before loading the model: a wrong --images fails in seconds, not after a multi-GB load.
    collection = find_images(args.images, args.class_field)
    name_map = load_name_map(args.names) if args.names else None
    captioner = load_captioner(
        args.model, device=args.device, dtype=args.dtype, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        static_cache=args.static_kv_cache,
    )
    try:
        report = caption_images(
            collection, args.out, captioner, name_map=name_map, batch_size=args.batch_size,
            num_workers=args.num_workers, resume=args.resume, commit_every=args.commit_every,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"interrupted: the captions made so far are kept in {args.out}; continue with the same command "
              "and --resume", file=sys.stderr)
        return 130
    print(f"wrote {report.captions_in_store} captions of {len(collection.class_ids)} classes to {args.out} "
          f"({report.captioned_this_run} this run, {report.images_per_s} images/s); "
          f"{len(report.skipped)} images skipped, {len(report.empty_classes)} classes without captions: "
          f"see {report_path(args.out)}")
    return 0


def _caption_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark, write_result

    logging.getLogger("streamsynth").setLevel(logging.WARNING)
    result = run_benchmark(
        arch=None if args.model else args.arch, model=args.model, images=args.images, num_images=args.num_images,
        batch_sizes=args.batch_size, kv_caches=args.kv_cache, baseline_batch_size=args.baseline_batch_size,
        num_workers=args.num_workers,
        device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps(result, indent=1))
    print(f"wrote {write_result(result, args.out)}", file=sys.stderr)
    return 0
