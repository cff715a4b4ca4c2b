"""Readable class names: the method prompts with "tench", never with "n01440764".

The names are resolved when captions are imported or made (the store records each class's name, which the prompts
read from it), and evaluation reads the ImageNet-1K label order from here.
"""

from __future__ import annotations

import csv
import io
import json
import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def imagenet_classes() -> list[tuple[str, str]]:
    """ImageNet-1K as (WordNet id, readable name) in the standard label order (sorted WordNet ids).

    WordNet ids come from timm's ImageNet metadata, readable names from torchvision's weights metadata; both
    are index-aligned with the sorted-synset order that `torchvision.datasets.ImageFolder` produces.
    """
    from timm.data import ImageNetInfo
    from torchvision.models import ResNet50_Weights

    info = ImageNetInfo()
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return [(info.index_to_label_name(i), names[i]) for i in range(info.num_classes())]


def load_name_map(path: str | os.PathLike) -> dict[str, str]:
    """A user's class-id → readable-name map, from JSON (`{"id": "name"}`) or CSV (`id,name` rows)."""
    from ..safeio import read_text

    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"class-name map {path} does not exist: give a JSON object or an id,name CSV")
    text = read_text(path, "class-name map")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); expected an object mapping class "
                             "id to readable name") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object mapping class id to readable name")
        for cid, name in data.items():
            # A null or a number would become the name "None" or "3", and prompts would read "a photo of None".
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{path}: the name of class {cid!r} is {json.dumps(name)}: give every class a readable "
                                 "name (a JSON string that is not empty), or leave the class out")
        return {cid: name.strip() for cid, name in data.items()}
    mapping = {}
    for line_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) < 2:
            raise ValueError(f"{path}:{line_no}: expected 'class_id,readable name', got {row!r}")
        mapping[row[0].strip()] = row[1].strip()
    return mapping


def readable_names(class_ids: list[str], name_map: dict[str, str] | None = None) -> list[str]:
    """Names for `class_ids`: the user's map first, then ImageNet-1K, then the id with '_' read as a space."""
    imagenet = dict(imagenet_classes())
    name_map = name_map or {}
    return [name_map.get(cid) or imagenet.get(cid) or cid.replace("_", " ") for cid in class_ids]
