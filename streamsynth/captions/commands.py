"""`streamsynth captions import|stats`."""

from __future__ import annotations

import argparse
from itertools import islice

from ..prompts.classnames import load_name_map
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
    stats.set_defaults(func=_stats)


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
    counts = [c.num_captions for c in store.classes]
    print(f"captions per class: min {min(counts)}, mean {sum(counts) / len(counts):.1f}, max {max(counts)}")
    for info in store.classes:
        print(f"{info.index:5d}  {info.id:<12} {info.name:<28} {info.num_captions:7d}")
        for caption in islice(store.captions(info.index), args.examples):
            print(f"{'':7}- {caption.text}")
    empty = [c.id for c in store.classes if c.num_captions == 0]
    if empty:
        print(f"warning: {len(empty)} classes have no captions and will never be sampled: {empty[:10]}")
    return 0
