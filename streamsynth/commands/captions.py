"""`streamsynth captions import|stats` and `streamsynth caption`."""

from __future__ import annotations

import argparse
import sys
from itertools import islice

from .args import add_device, comma_list, device_name, list_metavar, nonnegative_int, positive_int
from ..captions.classnames import load_name_map
from ..captions.captioners import DECODE_ATTENTIONS, DEFAULT_MODEL, DTYPES, FP32_MATMULS, KV_CACHES, REFERENCE_MAX_NEW_TOKENS
from ..captions.importers import import_captions
from ..captions.store import CaptionStore

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
    imp.add_argument("--class-field", default="class", help="field holding the class id (JSONL and CSV sources)")
    imp.add_argument("--caption-field", default="caption", help="field holding the caption (JSONL and CSV sources)")
    imp.add_argument("--key-field", default="key", help="field naming the source image (optional in the data)")
    imp.set_defaults(func=_import)

    stats = sub.add_parser("stats", help="counts per class and a few example captions")
    stats.add_argument("store", help="the caption store (an LMDB folder)")
    stats.add_argument("--examples", type=nonnegative_int, default=2, help="captions shown per class")
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
    caption.add_argument("--captioner", default=DEFAULT_MODEL,
                         help="the captioning model: hub id or local folder (BLIP-2, BLIP or VisionEncoderDecoder)")
    caption.add_argument("--names", help="JSON or CSV map of class id → readable name (default: ImageNet-1K names)")
    caption.add_argument("--class-field", default="cls", help="field holding the class id (WebDataset shards)")
    caption.add_argument("--caption-prefix",
                         help="BLIP-2 conditional captioning prefix, e.g. 'a photo of'; stripped from the captions")
    caption.add_argument("--max-new-tokens", type=positive_int, default=REFERENCE_MAX_NEW_TOKENS,
                         help="most tokens generated per caption (greedy decoding)")
    add_run_arguments(caption)
    caption.add_argument("--devices", type=comma_list(device_name), metavar=list_metavar("DEVICE"),
                         help="several devices, e.g. cuda:0,cuda:1: one rank per device in one process tree (torchrun's "
                              "standalone mode); under torchrun, local rank i uses the i-th (default: one GPU per rank)")
    caption.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    caption.add_argument("--commit-every", type=positive_int, default=1024, help="captions per LMDB transaction")
    caption.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption.add_argument("--kv-cache", choices=KV_CACHES, default="auto",
                         help="dynamic (grows every token), static (preallocated; on CUDA transformers compiles the "
                         "decoding step) or graphed (static, the step replayed from a CUDA graph; BLIP-2 with a "
                         "decoder-only LM): the same captions, speed measured by caption-bench; auto: graphed on "
                         "CUDA where it applies, else dynamic")
    caption.add_argument("--fp32-matmul", choices=FP32_MATMULS, default="ieee",
                         help="CUDA matrix multiplies of the model's fp32 parts (BLIP-2's Q-Former): ieee (full fp32) "
                         "or tf32 (tensor cores; faster, captions may differ in rare tokens; recorded in the store)")
    caption.add_argument("--decode-attention", choices=DECODE_ATTENTIONS, default="sdpa",
                         help="the language model's attention in each decoding step: sdpa (transformers') or triton "
                         "(streamsynth's kernel for one query token; BLIP-2 with a decoder-only LM, on CUDA; captions "
                         "may differ in rare tokens; recorded in the store)")
    caption.set_defaults(func=_caption)


def add_run_arguments(parser: argparse.ArgumentParser, batch_sizes: bool = False) -> None:
    """--batch-size (a list, with `batch_sizes`), --dtype, --device and --workers: how a captioning run runs, shared by
    `caption` and `caption-bench`."""
    if batch_sizes:
        parser.add_argument("-b", "--batch-size", type=comma_list(positive_int), metavar=list_metavar("N"),
                            help="comma-separated images per generate call, one run each "
                            "(default: 512 on a GPU of at least 64 GiB, else 256; 8 on CPU)")
    else:
        parser.add_argument("-b", "--batch-size", type=positive_int,
                            help="images per generate call (default: 512 on a GPU of at least 64 GiB, else 256; 8 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="the captioner's dtype (default: fp16 on CUDA, fp32 on CPU)")
    add_device(parser, "the captioner's device")
    parser.add_argument("-j", "--workers", type=nonnegative_int,
                        help="DataLoader processes decoding images (default: min(8, CPUs); fewer, with a warning, where "
                        "/dev/shm is too small for them)")


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
    from ..ranks import launch_local_ranks, ranks_from_environment, under_launcher
    from ..captions.captioners import load_captioner
    from ..captions.captioning import caption_images, report_path
    from ..captions.images import find_images

    devices = _device_list(args)
    if len(devices) > 1 and not under_launcher():
        return launch_local_ranks(len(devices), args.argv)
    with ranks_from_environment() as ranks:
        device = args.device or (devices[ranks.local_rank % len(devices)] if devices else None)
        if device is None and ranks.distributed:
            import torch

            device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"  # one GPU per rank
        # List the images before loading the model: a wrong --images fails in seconds, not after a multi-GB load.
        collection = find_images(args.images, args.class_field)
        name_map = load_name_map(args.names) if args.names else None
        captioner = load_captioner(
            args.captioner, device=device, dtype=args.dtype, prompt=args.caption_prefix,
            max_new_tokens=args.max_new_tokens, kv_cache=args.kv_cache, fp32_matmul=args.fp32_matmul,
            decode_attention=args.decode_attention,
        )
        try:
            report = caption_images(
                collection, args.out, captioner, name_map=name_map, batch_size=args.batch_size,
                num_workers=args.workers, resume=args.resume, commit_every=args.commit_every,
                progress=not args.no_progress, ranks=ranks,
            )
        except KeyboardInterrupt:
            print(f"interrupted: the captions made so far are kept in {args.out}"
                  + (f" ({ranks.label}'s part)" if ranks.distributed else "")
                  + "; continue with the same command and --resume", file=sys.stderr)
            return 130
        if ranks.is_main:
            across = f" by {ranks.world} ranks" if ranks.distributed else ""
            print(f"wrote {report.captions_in_store} captions of {len(collection.class_ids)} classes to {args.out}"
                  f"{across} ({report.captioned_this_run} this run, {report.images_per_s} images/s); "
                  f"{len(report.skipped)} images skipped, {len(report.empty_classes)} classes without captions: "
                  f"see {report_path(args.out)}")
    return 0


def _device_list(args: argparse.Namespace) -> list[str]:
    if not args.devices:
        return []
    if args.device:
        raise ValueError("give --device (one device) or --devices (one rank per device), not both")
    return args.devices
