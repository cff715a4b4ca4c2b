"""Import captions made elsewhere into a caption store.

Formats:
- a folder with one text file per class, as the reference release ships them: the file name (without `.txt`) is the
  class id, each non-empty line one caption;
- JSONL, one object per line (lines starting with `#` are comments), and CSV with a header row; both name the class and caption fields (and optionally
  the source image's key).

Every input is read and checked in full before anything is written, and the store is built under a temporary
name and renamed into place only when complete, so a bad file never leaves a half-written store behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..prompts.classnames import readable_names
from .store import CaptionStore, CaptionStoreWriter


class CaptionImportError(ValueError):
    """An input file cannot be imported; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class CaptionRecord:
    class_id: str
    caption: str
    key: str


def read_text_folder(folder: str | os.PathLike) -> list[CaptionRecord]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionImportError(f"caption folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CaptionImportError(f"caption folder {folder} holds no files: expected one text file per class")
    records = []
    for path in files:
        class_id = path.stem if path.suffix == ".txt" else path.name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise CaptionImportError(f"{path}: not UTF-8 text ({err}); convert it to UTF-8") from None
        found = [
            CaptionRecord(class_id, line.strip(), f"{class_id}/{path.name}:{n}")
            for n, line in enumerate(lines, start=1)
            if line.strip()
        ]
        if not found:
            raise CaptionImportError(
                f"{path}: class {class_id!r} has no captions (the file is empty); remove the file or fill it"
            )
        records.extend(found)
    return records


def _record_from_fields(
    row: dict, where: str, class_field: str, caption_field: str, key_field: str | None, default_key: str
) -> CaptionRecord:
    for field in (class_field, caption_field):
        if row.get(field) in (None, ""):
            raise CaptionImportError(f"{where}: missing or empty field {field!r} (fields present: {sorted(row)})")
    key = str(row.get(key_field) or default_key) if key_field else default_key
    return CaptionRecord(str(row[class_field]).strip(), str(row[caption_field]).strip(), key)


def read_jsonl(
    path: str | os.PathLike, class_field: str = "class", caption_field: str = "caption", key_field: str | None = "key"
) -> list[CaptionRecord]:
    path = Path(path)
    if not path.is_file():
        raise CaptionImportError(f"caption file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CaptionImportError(f"{path}:{n}: malformed JSON ({err.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise CaptionImportError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            records.append(_record_from_fields(row, f"{path}:{n}", class_field, caption_field, key_field, f"{path.name}:{n}"))
    if not records:
        raise CaptionImportError(f"caption file {path} holds no captions")
    return records


def read_csv(
    path: str | os.PathLike, class_field: str = "class", caption_field: str = "caption", key_field: str | None = "key"
) -> list[CaptionRecord]:
    path = Path(path)
    if not path.is_file():
        raise CaptionImportError(f"caption file {path} does not exist")
    records = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {class_field, caption_field} - set(reader.fieldnames or [])
        if missing:
            raise CaptionImportError(
                f"{path}:1: the header lacks {sorted(missing)} (header: {reader.fieldnames}); "
                "name the columns with --class-field/--caption-field"
            )
        for row in reader:
            n = reader.line_num
            records.append(_record_from_fields(row, f"{path}:{n}", class_field, caption_field, key_field, f"{path.name}:{n}"))
    if not records:
        raise CaptionImportError(f"caption file {path} holds no captions")
    return records


def read_any(source: str | os.PathLike, **fields) -> list[CaptionRecord]:
    """Pick the reader by what `source` is: a folder, a `.jsonl`/`.json` file or a `.csv` file."""
    source = Path(source)
    if source.is_dir():
        return read_text_folder(source)
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(source, **fields)
    if suffix == ".csv":
        return read_csv(source, **fields)
    if not source.exists():
        raise CaptionImportError(f"caption source {source} does not exist")
    raise CaptionImportError(f"{source}: unknown caption format; give a folder of .txt files, a .jsonl or a .csv file")


def write_store(
    records: Iterable[CaptionRecord],
    out: str | os.PathLike,
    name_map: dict[str, str] | None = None,
    captioner: str = "imported",
    source: str = "",
    extra: dict | None = None,
) -> CaptionStore:
    """Write `records` as a new, complete caption store at `out`; classes are ordered by sorted class id."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new path (streamsynth never overwrites captions)")
    records = list(records)
    class_ids = sorted({r.class_id for r in records})
    index = {cid: i for i, cid in enumerate(class_ids)}
    names = readable_names(class_ids, name_map)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with CaptionStoreWriter(partial, list(zip(class_ids, names)), captioner, source, extra=extra) as writer:
            for record in records:
                writer.add(index[record.class_id], record.caption, record.key)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return CaptionStore(out)


def import_captions(
    source: str | os.PathLike,
    out: str | os.PathLike,
    name_map: dict[str, str] | None = None,
    class_field: str = "class",
    caption_field: str = "caption",
    key_field: str | None = "key",
) -> CaptionStore:
    """Read captions from a folder, JSONL or CSV `source` and write them as a new store at `out`."""
    records = read_any(source, class_field=class_field, caption_field=caption_field, key_field=key_field)
    return write_store(records, out, name_map=name_map, source=str(source))
