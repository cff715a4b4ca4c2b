"""The caption store: an LMDB holding classes and the captions of their real images, never pixels.

Schema (version 1). Every value is UTF-8 JSON; keys are ASCII so that LMDB's byte order is numeric order.

    meta                    {"schema_version": 1, "complete": bool, "captioner": str, "num_classes": int,
                             "num_captions": int, "source": str, "created": ISO date, "extra": {...}}
    class/{c:06d}           {"index": c, "id": "n01440764", "name": "tench", "num_captions": n}
    cap/{c:06d}/{i:09d}     {"caption": "a fish lying on the grass", "key": "n01440764/n01440764_10026.JPEG"}
    src/{key}               "{c}/{i}"   (which caption a source image became; used to resume and to deduplicate)

A store is valid only once `meta.complete` is true: the writer sets it last, in its final transaction, so an
interrupted import or captioning run never leaves something that a reader would take for a finished store.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lmdb

SCHEMA_VERSION = 1
# LMDB reserves address space, not disk: a sparse 64 GiB map costs nothing and holds ~100 M captions.
_MAP_SIZE = 64 << 30


class CaptionStoreError(RuntimeError):
    """A caption store is missing, incomplete or of an unknown schema."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    id: str
    name: str
    num_captions: int


@dataclass(frozen=True)
class Caption:
    class_index: int
    index: int
    text: str
    key: str


def _class_key(c: int) -> bytes:
    return f"class/{c:06d}".encode()


def _caption_key(c: int, i: int) -> bytes:
    return f"cap/{c:06d}/{i:09d}".encode()


def _source_key(key: str) -> bytes:
    return b"src/" + key.encode()


def _dump(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


_readonly_envs: dict[Path, tuple[int, lmdb.Environment]] = {}


def _open_readonly(path: Path) -> lmdb.Environment:
    """One read-only environment per store and process.

    py-lmdb refuses to open a path twice in one process, and LMDB handles must not be used across a fork, so the
    handle is shared within a process and re-opened in a forked child.
    """
    key = path if path.is_absolute() else path.resolve()
    pid, env = _readonly_envs.get(key, (None, None))
    if env is not None and pid != os.getpid():
        env.close()  # inherited through fork: unusable here
        env = None
    if env is None:
        # lock=False: a complete store is immutable, so readers need no lock file (and it may sit on a
        # read-only filesystem).
        env = lmdb.open(str(key), readonly=True, lock=False, readahead=False, max_readers=2048, subdir=key.is_dir())
        _readonly_envs[key] = (os.getpid(), env)
    return env


def _close_readonly(path: Path) -> None:
    _, env = _readonly_envs.pop(path.resolve(), (None, None))
    if env is not None:
        env.close()


class CaptionStore:
    """Read-only view of a caption store; cheap to open in every DataLoader worker.

    Instances hold no handle: every read goes through one shared read-only environment per path and process
    (see `_open_readonly`), so a store can be pickled into, or forked with, DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._resolved = self.path.resolve()  # the key of the shared handle, resolved once
        if not self.path.exists():
            raise CaptionStoreError(
                f"caption store {self.path} does not exist: build one with `streamsynth captions import` "
                "or `streamsynth caption`, or leave --captions out to use the embedded digits captions"
            )
        try:
            self._load_header()
        except lmdb.Error as err:
            _close_readonly(self.path)
            raise CaptionStoreError(f"{self.path} is not a readable LMDB caption store: {err}") from None
        except Exception:
            _close_readonly(self.path)  # so that a writer may open it, e.g. to resume
            raise

    def _load_header(self) -> None:
        with self._txn() as txn:
            raw = txn.get(b"meta")
            if raw is None:
                raise CaptionStoreError(f"{self.path} is an LMDB but not a streamsynth caption store (no 'meta' key)")
            self.meta = json.loads(raw)
            if self.meta.get("schema_version") != SCHEMA_VERSION:
                raise CaptionStoreError(
                    f"{self.path} has schema version {self.meta.get('schema_version')}, this streamsynth reads "
                    f"version {SCHEMA_VERSION}: rebuild the store with this version"
                )
            if not self.meta.get("complete"):
                raise CaptionStoreError(
                    f"{self.path} is incomplete (an interrupted import or captioning run): "
                    "rerun `streamsynth caption ... --resume`, or re-import it"
                )
            self.classes: list[ClassInfo] = [
                ClassInfo(**json.loads(txn.get(_class_key(c)))) for c in range(self.meta["num_classes"])
            ]

    def _txn(self) -> lmdb.Transaction:
        return _open_readonly(self._resolved).begin(buffers=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.meta["num_captions"]

    def caption(self, class_index: int, index: int) -> Caption:
        """Caption `index` of class `class_index`, in O(1)."""
        with self._txn() as txn:
            raw = txn.get(_caption_key(class_index, index))
        if raw is None:
            raise IndexError(
                f"class {class_index} has no caption {index} "
                f"(it has {self.classes[class_index].num_captions}) in {self.path}"
            )
        value = json.loads(raw)
        return Caption(class_index, index, value["caption"], value["key"])

    def captions(self, class_index: int) -> Iterator[Caption]:
        for i in range(self.classes[class_index].num_captions):
            yield self.caption(class_index, i)

    def class_by_id(self) -> dict[str, ClassInfo]:
        return {c.id: c for c in self.classes}


class CaptionStoreWriter:
    """Appends captions to a store, committing every `commit_every` captions.

    Opening an existing, incomplete store with `resume=True` continues it, provided the classes, the captioner and
    `extra` (the captioning settings) are those it was started with: `has_source(key)` tells which images are
    already captioned. `finalize()` marks the store complete; until then readers refuse it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        classes: Sequence[tuple[str, str]],
        captioner: str,
        source: str = "",
        resume: bool = False,
        commit_every: int = 1024,
        extra: dict | None = None,
    ):
        self.path = Path(path)
        if not classes:
            raise ValueError(f"no classes given for caption store {self.path}")
        ids = [cid for cid, _ in classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate class ids for caption store {self.path}")
        exists = (self.path / "data.mdb").exists()
        if exists and not resume:
            raise FileExistsError(
                f"{self.path} already exists: pass --resume to continue it, or choose a new output path "
                "(streamsynth never overwrites captions)"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        _close_readonly(self.path)
        self._env = lmdb.open(str(self.path), map_size=_MAP_SIZE, subdir=True)
        self._commit_every = commit_every
        self._pending = 0
        self._txn = self._env.begin(write=True)
        meta_raw = self._txn.get(b"meta")
        if meta_raw is not None:
            meta = json.loads(meta_raw)
            if meta.get("complete"):
                self.close()
                raise FileExistsError(f"{self.path} is already a complete caption store; nothing to resume")
            stored = [json.loads(self._txn.get(_class_key(c)))["id"] for c in range(meta["num_classes"])]
            if stored != ids:
                self.close()
                raise ValueError(
                    f"cannot resume {self.path}: its classes differ from this run's "
                    f"({len(stored)} stored, {len(ids)} now); resume with the same input"
                )
            made_by = {"captioner": meta.get("captioner"), "extra": meta.get("extra", {})}
            asked = {"captioner": captioner, "extra": extra or {}}
            if made_by != asked:
                self.close()
                raise ValueError(
                    f"cannot resume {self.path}: it was started with {made_by}, this run uses {asked}; "
                    "resume with the same model and settings, or write a new store"
                )
            self._counts = [json.loads(self._txn.get(_class_key(c)))["num_captions"] for c in range(len(ids))]
            self._meta = meta
        else:
            self._counts = [0] * len(ids)
            self._meta = {
                "schema_version": SCHEMA_VERSION,
                "complete": False,
                "captioner": captioner,
                "source": source,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "num_classes": len(ids),
                "num_captions": 0,
                "extra": extra or {},
            }
            self._txn.put(b"meta", _dump(self._meta))
        self._classes = list(classes)
        self._write_classes()
        self.commit()

    def _write_classes(self) -> None:
        for c, (cid, name) in enumerate(self._classes):
            record = {"index": c, "id": cid, "name": name, "num_captions": self._counts[c]}
            self._txn.put(_class_key(c), _dump(record))
        self._meta["num_captions"] = sum(self._counts)
        self._txn.put(b"meta", _dump(self._meta))

    def has_source(self, key: str) -> bool:
        return self._txn.get(_source_key(key)) is not None

    def add(self, class_index: int, caption: str, key: str) -> None:
        """Append one caption; a source key already in the store is ignored (so replayed work is harmless)."""
        if self.has_source(key):
            return
        i = self._counts[class_index]
        self._txn.put(_caption_key(class_index, i), _dump({"caption": caption, "key": key}))
        self._txn.put(_source_key(key), f"{class_index}/{i}".encode())
        self._counts[class_index] = i + 1
        self._pending += 1
        if self._pending >= self._commit_every:
            self.commit()

    def commit(self) -> None:
        """Make everything added so far durable, together with the counts that describe it."""
        self._write_classes()
        self._txn.commit()
        self._pending = 0
        self._txn = self._env.begin(write=True)

    @property
    def counts(self) -> list[int]:
        return list(self._counts)

    def finalize(self) -> None:
        self._meta["complete"] = True
        self._write_classes()
        self._txn.commit()
        self._txn = None
        self._env.sync(True)
        self.close()

    def close(self) -> None:
        if getattr(self, "_txn", None) is not None:
            self._txn.abort()
            self._txn = None
        self._env.close()

    def __enter__(self) -> "CaptionStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            # Keep every caption made so far (Ctrl-C included): the store stays incomplete and resumable.
            self.commit()
            self.close()
