"""Import captions made elsewhere into a caption store.

Formats:
- a folder with one text file per class, as the reference release ships them: the file name (without `.txt`) is the
  class id, each non-empty line one caption;
- JSONL, one object per line (lines starting with `#` are comments), and CSV with a header row; both name the class and caption fields (and optionally
  the source image's key).

Every input is read and checked in full before anything is written, and the store is built under a temporary
name and renamed into place only when complete, so a bad file never leaves a half-written store behind.

Text is UTF-8 (a byte-order mark is dropped; other bytes are an error naming the file, line and column). Every
line is one caption: keys need not be unique (one image may have several captions, and file names repeat across
class folders), so a repeated key never drops a caption. Another import finishing first into the same `--out`, a
full disk or Ctrl-C leave no store and no temporary folder behind.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import DiskFullError, StreamsynthError
from .classnames import readable_names
from ..safeio import UnsafePathError, disk_full_error, human_bytes, read_text, safe_name, text_lines
from .store import CaptionStore, CaptionStoreWriter

log = logging.getLogger(__name__)


class CaptionImportError(StreamsynthError, ValueError):
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
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as err:
        raise CaptionImportError(f"cannot list caption folder {folder}: {err.strerror or err}") from None
    if not files:
        raise CaptionImportError(f"caption folder {folder} holds no files: expected one text file per class")
    records = []
    for path in files:
        class_id = path.stem if path.suffix == ".txt" else path.name
        _check_class_id(class_id, str(path))
        lines = text_lines(read_text(path, "caption file", CaptionImportError))
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
    # The class and the caption must be text: a number or null would be stored as "3" or "None" and read in prompts.
    # An image key may be a number (a row index).
    for field, kinds in ((class_field, str), (caption_field, str), (key_field, (str, int))):
        value = row.get(field) if field else None
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CaptionImportError(f"{where}: field {field!r} must be text, not {type(value).__name__} "
                                     f"({value!r:.60}); write it as a JSON string")
    class_id, caption = row[class_field].strip(), row[caption_field].strip()
    for field, value in ((class_field, class_id), (caption_field, caption)):
        if not value:
            raise CaptionImportError(f"{where}: field {field!r} holds only white space")
    _check_class_id(class_id, where)
    key = str(row.get(key_field) or default_key) if key_field else default_key
    return CaptionRecord(class_id, caption, key)


def _check_class_id(class_id: str, where: str) -> None:
    try:
        safe_name(class_id)
    except UnsafePathError as err:
        raise CaptionImportError(f"{where}: {err}") from None


def read_jsonl(
    path: str | os.PathLike, class_field: str = "class", caption_field: str = "caption", key_field: str | None = "key"
) -> list[CaptionRecord]:
    path = Path(path)
    if not path.is_file():
        raise CaptionImportError(f"caption file {path} does not exist")
    records = []
    for n, line in enumerate(text_lines(read_text(path, "caption file", CaptionImportError)), start=1):
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
    # strict: an unclosed quote is an error, not a caption that swallows the rest of the file
    reader = csv.DictReader(io.StringIO(read_text(path, "caption file", CaptionImportError), newline=""), strict=True)
    try:
        missing = {class_field, caption_field} - set(reader.fieldnames or [])
        if missing:
            raise CaptionImportError(
                f"{path}:1: the header lacks {sorted(missing)} (header: {reader.fieldnames}); "
                "name the columns with --class-field/--caption-field"
            )
        for row in reader:
            n = reader.line_num
            if None in row:  # more cells than the header has names
                raise CaptionImportError(f"{path}:{n}: {len(reader.fieldnames) + len(row[None])} cells, the header "
                                         f"names {len(reader.fieldnames)}; quote cells that contain commas")
            records.append(_record_from_fields(row, f"{path}:{n}", class_field, caption_field, key_field, f"{path.name}:{n}"))
    except csv.Error as err:
        raise CaptionImportError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
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
    _report_repeated_keys(records)
    _remove_abandoned_partials(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with CaptionStoreWriter(partial, list(zip(class_ids, names)), captioner, source, extra=extra) as writer:
            for record in records:
                writer.add(index[record.class_id], record.caption, record.key, dedupe=False)
        try:
            os.replace(partial, out)
        except OSError:
            if out.exists():  # another import (or anything) created it after the check above
                raise FileExistsError(
                    f"{out} was created by another process while this import ran; it was left as it is and this "
                    "import wrote nothing: import into a new path"
                ) from None
            raise
    except DiskFullError:
        size = sum(len(r.caption.encode()) + len(r.key.encode()) + 100 for r in records)
        raise disk_full_error(
            out, "caption store", kept="nothing was written (the partial store is removed)",
            fix=f"free at least {human_bytes(max(3 * size, 1 << 20))} and import again",
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return CaptionStore(out)


def _report_repeated_keys(records: list[CaptionRecord]) -> None:
    first: dict[str, CaptionRecord] = {}
    repeated = []
    for record in records:
        if record.key in first:
            repeated.append(record)
        else:
            first[record.key] = record
    if repeated:
        example = repeated[0]
        log.warning("%d captions share their image key with an earlier one (e.g. %r, classes %s and %s); every "
                    "caption is kept, one per line", len(repeated), example.key, first[example.key].class_id,
                    example.class_id)


def _remove_abandoned_partials(out: Path) -> None:
    """Temporary stores of imports that were killed (kill -9, a power cut) into the same `out`: their process is gone."""
    prefix = f".{out.name}.partial-"
    try:
        candidates = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for candidate in candidates:
        pid = candidate.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by an import that was stopped", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
        except OSError:
            pass  # alive (another user's process): not ours to remove


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
