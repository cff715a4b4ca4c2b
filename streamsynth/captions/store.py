"""The caption store: an LMDB holding classes and the captions of their real images, never pixels.

Schema (version 1). Every value is UTF-8 JSON; keys are ASCII so that LMDB's byte order is numeric order.

    meta                    {"schema_version": 1, "complete": bool, "captioner": str, "num_classes": int,
                             "num_captions": int, "source": str, "created": ISO date, "extra": {...}}
    class/{c:06d}           {"index": c, "id": "n01440764", "name": "tench", "num_captions": n}
    cap/{c:06d}/{i:09d}     {"caption": "a fish lying on the grass", "key": "n01440764/n01440764_10026.JPEG"}
    src/{key}               "{c}/{i}"   (which caption a source image became; used to resume and to deduplicate)

A store is valid only once `meta.complete` is true: the writer sets it last, in its final transaction, so an
interrupted import or captioning run never leaves something that a reader would take for a finished store.

Faults (see docs/reliability.md):
- Every open goes through `open_store_env`, which checks the file before LMDB maps it: a missing, empty, foreign
  or truncated `data.mdb` is a `CaptionStoreError` naming the store, never a crash (LMDB reading a truncated file
  through its memory map would kill the process with SIGBUS). A damaged record is a `CaptionStoreError` too.
- Image keys of any length are accepted: LMDB keys hold at most 511 bytes, so a `src/` key that would be longer is
  stored under a digest of the key (`source_key`); the caption record keeps the full key.
- A failed write (a full disk included) raises at once with what was kept; everything committed before survives,
  and an interrupted captioning run continues with `--resume`.
- One writer per store: a second process is refused with a clear message instead of waiting on LMDB's lock.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lmdb

from ..errors import StreamsynthError
from ..safeio import UnsafePathError, disk_full_error, file_size_limit, is_full_errno, low_on_space, safe_name

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# LMDB reserves address space, not disk: a sparse 64 GiB map costs nothing and holds ~100 M captions.
_MAP_SIZE = 64 << 30
# LMDB's lock file, written through a memory map: it is given real blocks before LMDB maps it, so that a full disk
# is an error at open and not a SIGBUS when LMDB first touches it. 16 KiB holds LMDB's header and the writer's
# default table of 126 readers (8 KiB).
_LOCK_FILE_BYTES = 16 << 10
# LMDB's largest page: a write that ends within one page of the file-size limit was cut short by it.
_MAX_PAGE_BYTES = 64 << 10
_REBUILD = "restore it from a copy, or rebuild it with `streamsynth captions import` or `streamsynth caption`"


class CaptionStoreError(StreamsynthError, RuntimeError):
    """A caption store is missing, damaged, incomplete or of an unknown schema; the message names it and the fix."""

    def without_fix(self) -> str:
        """What is wrong, without the usual fix (restore or rebuild), for a caller that knows a better one."""
        return str(self).removesuffix(f"; {_REBUILD}")


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


# LMDB's key limit (MDB_MAXKEYSIZE) in the builds py-lmdb ships; the writer asks its environment for the real one.
MAX_KEY_BYTES = 511


def stored_key(key: str) -> str:
    """An image key as the store keeps it: valid UTF-8 text. File names that are not UTF-8 (Python carries their
    bytes as surrogates) keep those bytes as `\\xNN` escapes, so such an image is captioned like any other."""
    try:
        return key.encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = key.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


def source_key(key: str, max_key_bytes: int = MAX_KEY_BYTES) -> bytes:
    """The LMDB key of `src/{key}`, the one key policy of the store: the key itself while it fits LMDB's limit,
    else `src/` + NUL + a 256-bit BLAKE2b digest of it (a NUL never occurs in a path, so the two cannot meet). Deep
    paths therefore caption, import and resume like short ones; the caption record holds the full key."""
    raw = b"src/" + stored_key(key).encode("utf-8")
    if len(raw) <= max_key_bytes:
        return raw
    return b"src/\x00blake2b:" + hashlib.blake2b(raw[4:], digest_size=32).hexdigest().encode()


_source_key = source_key


def _dump(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def _load(raw: bytes | None, path: Path, record: str):
    """A record's JSON value; a value that does not decode is a `CaptionStoreError` naming the store and record."""
    if raw is None:
        raise CaptionStoreError(f"caption store {path} is damaged: its record {record!r} is missing; {_REBUILD}")
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise CaptionStoreError(f"caption store {path} is damaged: its record {record!r} is not valid JSON ({err}); "
                                f"{_REBUILD}") from None


def _data_file(path: Path) -> Path:
    return path / "data.mdb" if path.is_dir() else path


def _check_size(env: lmdb.Environment, path: Path, data: Path, size: int) -> None:
    """A data file shorter than the last page LMDB's header names is truncated: reading it would SIGBUS."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if size < needed:
        raise CaptionStoreError(
            f"caption store {path} is damaged: {data} is truncated ({size} bytes, its own header says {needed}), "
            f"e.g. by an interrupted copy or a full disk; {_REBUILD}"
        )


def open_store_env(path: str | os.PathLike, *, write: bool = False, **kwargs) -> lmdb.Environment:
    """The one checked way to open a caption store's LMDB, for reading (`write=False`, no lock file) or writing.

    Before LMDB maps the file, it must exist, be readable, be an LMDB and be at least as long as its header says:
    anything else is a `CaptionStoreError` that names the store and says how to get a good one. For writing, the
    lock file is given real blocks first, so a full disk is a `DiskFullError` rather than a SIGBUS.
    """
    path = Path(path)
    data = _data_file(path)
    exists = data.exists()
    if not write or exists:
        try:
            size = data.stat().st_size
        except FileNotFoundError:
            raise CaptionStoreError(
                f"{path} is not a caption store: it has no {data.name} (build one with `streamsynth captions import` "
                "or `streamsynth caption`)"
            ) from None
        except OSError as err:
            raise CaptionStoreError(f"cannot read caption store {path}: {err.strerror or err}") from None
        if size == 0:
            raise CaptionStoreError(f"caption store {path} is damaged: {data} is empty (0 bytes); {_REBUILD}")
    if write:
        _prepare_lock_file(path)
    try:
        env = lmdb.open(str(path), readonly=not write, subdir=path.is_dir(), **kwargs)
    except lmdb.InvalidError:
        raise CaptionStoreError(
            f"caption store {path} is damaged: {data} is not an LMDB file (overwritten or corrupt); {_REBUILD}"
        ) from None
    except lmdb.Error as err:
        if write and _no_room(err, path):
            raise disk_full_error(path, "caption store") from None
        reason = str(err).removeprefix(f"{path}: ")
        raise CaptionStoreError(f"cannot open caption store {path}: {reason}") from None
    if exists:
        try:
            _check_size(env, path, data, data.stat().st_size)
        except BaseException:
            env.close()
            raise
    return env


def _no_room(err: BaseException, path: Path) -> bool:
    """Whether a failed LMDB write found no room. LMDB reports a short write as EIO ("Input/output error"): on a full
    disk the free space tells, under a file-size limit (`ulimit -f`) the data file's size, which the short write took
    up to the limit; a write that starts at the limit fails with EFBIG, which LMDB reports by its text only."""
    if is_full_errno(err) or isinstance(err, lmdb.DiskError) or low_on_space(path):
        return True
    limit = file_size_limit()
    if limit is None:
        return False
    try:
        size = _data_file(path).stat().st_size
    except OSError:
        size = 0
    return os.strerror(errno.EFBIG) in str(err) or size >= limit - _MAX_PAGE_BYTES


def _prepare_lock_file(path: Path) -> None:
    if not path.is_dir():
        return
    lock = path / "lock.mdb"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if is_full_errno(err):
            raise disk_full_error(path, "caption store") from None
        raise CaptionStoreError(f"cannot write caption store {path}: {err.strerror or err}") from None
    try:
        os.posix_fallocate(fd, 0, max(_LOCK_FILE_BYTES, os.fstat(fd).st_size))
    except OSError as err:
        if is_full_errno(err):
            raise disk_full_error(path, "caption store") from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # some file systems cannot preallocate: go on
            raise
    finally:
        os.close(fd)


def _check_classes(path: Path, classes: Sequence[tuple[str, str]]) -> None:
    """Class ids name folders (`generate --format imagefolder` writes OUT/{class id}/) and names fill prompts: both
    must be text, and an id a plain folder name (`safeio.safe_name`), or nothing is written."""
    for cid, name in classes:
        try:
            safe_name(cid, "class id")
        except UnsafePathError as err:
            raise UnsafePathError(f"cannot write caption store {path}: {err}") from None
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"cannot write caption store {path}: the name of class {cid} is {name!r}, not text; "
                             "give every class a readable name (a --names map, or ImageNet's)")


# Files a writer opens inside the store folder: a symbolic link there would have LMDB write wherever it points.
_STORE_FILES = ("data.mdb", "lock.mdb", "writer.lock")


def _refuse_links(path: Path) -> None:
    for name in _STORE_FILES:
        if (path / name).is_symlink():
            raise UnsafePathError(f"caption store {path}: {name} is a symbolic link (to {os.readlink(path / name)}); "
                                  "streamsynth writes only files inside the store folder: remove the link")


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
        env = open_store_env(key, lock=False, readahead=False, max_readers=2048)
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
        if self.path.is_dir() and not (self.path / "data.mdb").exists():
            raise CaptionStoreError(
                f"{self.path} is not a readable LMDB caption store: it has no data.mdb (build one with "
                "`streamsynth captions import` or `streamsynth caption`)"
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
            self.meta = _load(raw, self.path, "meta")
            if not isinstance(self.meta, dict):
                raise CaptionStoreError(f"caption store {self.path} is damaged: its 'meta' record is a "
                                        f"{type(self.meta).__name__}, not an object; {_REBUILD}")
            if self.meta.get("schema_version") != SCHEMA_VERSION:
                raise CaptionStoreError(
                    f"{self.path} has schema version {self.meta.get('schema_version')!r}, this streamsynth reads "
                    f"version {SCHEMA_VERSION}: rebuild the store with this version"
                )
            if not self.meta.get("complete"):
                raise CaptionStoreError(
                    f"{self.path} is incomplete (an interrupted import or captioning run): "
                    "rerun `streamsynth caption ... --resume`, or re-import it"
                )
            for name in ("num_classes", "num_captions"):
                if not isinstance(self.meta.get(name), int) or self.meta[name] < 0:
                    raise CaptionStoreError(f"caption store {self.path} is damaged: 'meta' has {name} = "
                                            f"{self.meta.get(name)!r}; {_REBUILD}")
            self.classes: list[ClassInfo] = [self._class_record(txn, c) for c in range(self.meta["num_classes"])]

    def _class_record(self, txn: lmdb.Transaction, c: int) -> ClassInfo:
        record = _load(txn.get(_class_key(c)), self.path, _class_key(c).decode())
        try:
            info = ClassInfo(**record)
            if info.index != c or not isinstance(info.num_captions, int) or info.num_captions < 0:
                raise TypeError(f"index {info.index!r}, num_captions {info.num_captions!r}")
            return info
        except TypeError as err:
            raise CaptionStoreError(f"caption store {self.path} is damaged: the record of class {c} is "
                                    f"{record!r:.120} ({err}); {_REBUILD}") from None

    def _txn(self) -> lmdb.Transaction:
        return _open_readonly(self._resolved).begin(buffers=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.meta["num_captions"]

    def caption(self, class_index: int, index: int) -> Caption:
        """Caption `index` of class `class_index`, in O(1)."""
        key = _caption_key(class_index, index)
        try:
            with self._txn() as txn:
                raw = txn.get(key)
        except lmdb.Error as err:
            raise CaptionStoreError(f"caption store {self.path} is damaged: reading {key.decode()!r} failed "
                                    f"({err}); {_REBUILD}") from None
        if raw is None:
            if 0 <= index < self.classes[class_index].num_captions:
                raise CaptionStoreError(
                    f"caption store {self.path} is damaged: class {class_index} lists "
                    f"{self.classes[class_index].num_captions} captions but {key.decode()!r} is missing; {_REBUILD}"
                )
            raise IndexError(
                f"class {class_index} has no caption {index} "
                f"(it has {self.classes[class_index].num_captions}) in {self.path}"
            )
        value = _load(raw, self.path, key.decode())
        try:
            return Caption(class_index, index, value["caption"], value["key"])
        except (TypeError, KeyError) as err:
            raise CaptionStoreError(f"caption store {self.path} is damaged: {key.decode()!r} lacks {err}; "
                                    f"{_REBUILD}") from None

    def verify(self) -> int:
        """Read every record (a full check, linear in the store's size); returns the number of captions read and
        raises `CaptionStoreError` at the first damaged or missing one."""
        total = 0
        for info in self.classes:
            for caption in self.captions(info.index):
                if not isinstance(caption.text, str) or not isinstance(caption.key, str):
                    raise CaptionStoreError(f"caption store {self.path} is damaged: caption {caption.index} of "
                                            f"class {info.index} is not text; {_REBUILD}")
                total += 1
        if total != len(self):
            raise CaptionStoreError(f"caption store {self.path} is damaged: 'meta' counts {len(self)} captions, the "
                                    f"classes hold {total}; {_REBUILD}")
        return total

    def captions(self, class_index: int) -> Iterator[Caption]:
        for i in range(self.classes[class_index].num_captions):
            yield self.caption(class_index, i)

    def class_by_id(self) -> dict[str, ClassInfo]:
        return {c.id: c for c in self.classes}

    def has_source(self, key: str) -> bool:
        """Whether the image `key` became a caption of this store."""
        env = _open_readonly(self._resolved)
        with env.begin(buffers=False) as txn:
            return txn.get(source_key(key, env.max_key_size())) is not None


class StorePart:
    """Read access to a store that is not complete: a part that one rank of a distributed captioning run wrote.

    `streamsynth caption` under torchrun has each rank write its captions into a part of its own, and one rank merge
    the parts into the final store. Parts are never marked complete, so nothing else mistakes one for a store
    (`CaptionStore` refuses them); this reader, for the merge and for `--resume`, holds one read transaction open
    and must not be used while the part's writer is open.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _close_readonly(self.path)
        self._env = open_store_env(self.path, lock=False, readahead=False)
        self._max_key = self._env.max_key_size()
        self._txn = self._env.begin(buffers=False)
        try:
            meta = _load(self._txn.get(b"meta"), self.path, "meta")
            if not isinstance(meta, dict) or not isinstance(meta.get("num_classes"), int):
                raise CaptionStoreError(f"caption store part {self.path} is damaged: its 'meta' record is "
                                        f"{meta!r:.120}; remove it and caption its images again with --resume")
            self.meta = meta
            self.class_ids = [_load(self._txn.get(_class_key(c)), self.path, _class_key(c).decode()).get("id")
                              for c in range(meta["num_classes"])]
        except BaseException:
            self.close()
            raise

    def has(self, key: str) -> bool:
        """Whether the image `key` has a caption in this part."""
        return self._txn.get(source_key(key, self._max_key)) is not None

    def caption_of(self, key: str) -> tuple[int, str] | None:
        """(class index, caption) of the image `key`, or None if this part holds none."""
        raw = self._txn.get(source_key(key, self._max_key))
        if raw is None:
            return None
        try:
            c, i = (int(v) for v in raw.decode().split("/"))
        except ValueError:
            raise CaptionStoreError(f"caption store part {self.path} is damaged: the index entry of {key!r} is "
                                    f"{raw[:40]!r}; remove the part and caption its images again with --resume") from None
        record = _load(self._txn.get(_caption_key(c, i)), self.path, _caption_key(c, i).decode())
        if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
            raise CaptionStoreError(f"caption store part {self.path} is damaged: {_caption_key(c, i).decode()!r} is "
                                    f"{record!r:.80}; remove the part and caption its images again with --resume")
        return c, record["caption"]

    def close(self) -> None:
        if getattr(self, "_txn", None) is not None:
            self._txn.abort()
            self._txn = None
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> "StorePart":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CaptionStoreWriter:
    """Appends captions to a store, committing every `commit_every` captions.

    Opening an existing, incomplete store with `resume=True` continues it, provided the classes, the captioner and
    `extra` (the captioning settings) are those it was started with: `has_source(key)` tells which images are
    already captioned. `finalize()` marks the store complete; until then readers refuse it.

    A failed write (a full disk, LMDB's map full) raises at once (`DiskFullError` or `CaptionStoreError`); the
    transaction it was in is lost, everything committed before stays, and the writer can only be closed. Only one
    writer may hold a store at a time.
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
        self._txn = None
        self._env = None
        self._lock_fd = None
        self._broken: BaseException | None = None
        if not classes:
            raise ValueError(f"no classes given for caption store {self.path}")
        ids = [cid for cid, _ in classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate class ids for caption store {self.path}")
        _check_classes(self.path, classes)
        exists = (self.path / "data.mdb").exists()
        if exists and not resume:
            raise FileExistsError(
                f"{self.path} already exists: pass --resume to continue it, or choose a new output path "
                "(streamsynth never overwrites captions)"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if is_full_errno(err):
                raise disk_full_error(self.path, "caption store") from None
            raise CaptionStoreError(f"cannot create caption store {self.path}: {err.strerror or err}") from None
        _refuse_links(self.path)
        self._commit_every = commit_every
        self._lock()
        try:
            self._open(classes, ids, captioner, source, extra)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """One writer per store: LMDB would make a second one wait, silently, for as long as the first runs."""
        lock = self.path / "writer.lock"
        try:
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if is_full_errno(err):
                raise disk_full_error(self.path, "caption store") from None
            raise CaptionStoreError(f"cannot write caption store {self.path}: {err.strerror or err}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise CaptionStoreError(
                f"caption store {self.path} is being written by another process (a second `streamsynth caption` "
                "or import?); wait for it to finish, or write to another --out"
            ) from None

    def _open(self, classes, ids, captioner, source, extra) -> None:
        _close_readonly(self.path)
        self._env = open_store_env(self.path, write=True, map_size=_MAP_SIZE)
        self._max_key = self._env.max_key_size()
        self._pending = 0
        self._txn = self._env.begin(write=True)
        meta_raw = self._txn.get(b"meta")
        if meta_raw is not None:
            meta = _load(meta_raw, self.path, "meta")
            if not isinstance(meta, dict) or not isinstance(meta.get("num_classes"), int):
                raise CaptionStoreError(f"caption store {self.path} is damaged: its 'meta' record is {meta!r:.120}; "
                                        "it cannot be resumed: write a new store")
            if meta.get("complete"):
                raise FileExistsError(f"{self.path} is already a complete caption store; nothing to resume")
            records = [self._record(c) for c in range(meta["num_classes"])]
            stored = [record["id"] for record in records]
            if stored != ids:
                raise ValueError(
                    f"cannot resume {self.path}: its classes differ from this run's "
                    f"({len(stored)} stored, {len(ids)} now); resume with the same input"
                )
            made_by = {"captioner": meta.get("captioner"), "extra": meta.get("extra", {})}
            asked = {"captioner": captioner, "extra": extra or {}}
            if made_by != asked:
                raise ValueError(
                    f"cannot resume {self.path}: it was started with {made_by}, this run uses {asked}; "
                    "resume with the same model and settings, or write a new store"
                )
            self._counts = [record["num_captions"] for record in records]
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
        self._committed = list(self._counts)
        self._classes = list(classes)
        self._write_classes()
        self.commit()

    def _record(self, c: int) -> dict:
        record = _load(self._txn.get(_class_key(c)), self.path, _class_key(c).decode())
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("num_captions"), int):
            raise CaptionStoreError(f"caption store {self.path} is damaged: the record of class {c} is "
                                    f"{record!r:.120}; it cannot be resumed: write a new store")
        return record

    def _failed(self, err: BaseException) -> Exception:
        """The error to raise for a failed LMDB write; the writer is unusable afterwards (its transaction is gone)."""
        self._broken = err
        if self._txn is not None:
            try:
                self._txn.abort()
            except lmdb.Error:
                pass
            self._txn = None
        kept = (f"the {sum(self._committed)} captions committed before are kept" if sum(self._committed)
                else "nothing had been committed yet")
        if _no_room(err, self.path):
            return disk_full_error(self.path, "caption store", kept=kept,
                                   fix="free some space and continue with --resume")
        if isinstance(err, lmdb.MapFullError):
            return CaptionStoreError(f"caption store {self.path} reached its {_MAP_SIZE >> 30} GiB map size; {kept}")
        return CaptionStoreError(f"writing caption store {self.path} failed ({err}); {kept}")

    def _usable(self) -> None:
        if self._broken is not None:
            raise CaptionStoreError(f"caption store {self.path}: an earlier write failed ({self._broken}); "
                                    "nothing more can be written by this writer")
        if self._txn is None:
            raise CaptionStoreError(f"caption store {self.path}: the writer is closed")

    def _write_classes(self) -> None:
        for c, (cid, name) in enumerate(self._classes):
            record = {"index": c, "id": cid, "name": name, "num_captions": self._counts[c]}
            self._txn.put(_class_key(c), _dump(record))
        self._meta["num_captions"] = sum(self._counts)
        self._txn.put(b"meta", _dump(self._meta))

    def has_source(self, key: str) -> bool:
        self._usable()
        return self._txn.get(source_key(key, self._max_key)) is not None

    def add(self, class_index: int, caption: str, key: str, dedupe: bool = True) -> bool:
        """Append one caption; returns whether it was added.

        With `dedupe` (captioning), a source key already in the store is ignored, so replayed work is harmless.
        Without it (imports, where one image may have several captions and file names repeat across classes), every
        caption is kept and the key's `src/` entry keeps pointing at its first caption."""
        self._usable()
        key = stored_key(key)
        src = source_key(key, self._max_key)
        try:
            seen = self._txn.get(src) is not None
            if seen and dedupe:
                return False
            i = self._counts[class_index]
            self._txn.put(_caption_key(class_index, i), _dump({"caption": caption, "key": key}))
            if not seen:
                self._txn.put(src, f"{class_index}/{i}".encode())
        except lmdb.Error as err:
            raise self._failed(err) from None
        self._counts[class_index] = i + 1
        self._pending += 1
        if self._pending >= self._commit_every:
            self.commit()
        return True

    def commit(self) -> None:
        """Make everything added so far durable, together with the counts that describe it."""
        self._usable()
        try:
            self._write_classes()
            self._txn.commit()
        except lmdb.Error as err:
            self._txn = None  # a failed commit has already ended the transaction
            raise self._failed(err) from None
        self._committed = list(self._counts)
        self._pending = 0
        self._txn = self._env.begin(write=True)

    @property
    def counts(self) -> list[int]:
        """Captions per class; after a failed write, those committed (what the store holds)."""
        return list(self._committed if self._broken is not None else self._counts)

    def finalize(self) -> None:
        self._usable()
        self._meta["complete"] = True
        try:
            self._write_classes()
            self._txn.commit()
            self._txn = None
            self._env.sync(True)
        except lmdb.Error as err:
            self._txn = None
            self._meta["complete"] = False
            raise self._failed(err) from None
        self._committed = list(self._counts)
        self._env.close()
        self._env = None
        # A complete store is read without a lock file (lock=False), so it keeps none. py-lmdb (3.0) refuses to open an
        # environment whose files share an inode with one open in this process, and keys a reader by the lock file
        # that was there when it opened, though it never holds it: deleting such a store would free that inode for
        # the next store's lock file, which would be refused. Removed while this writer still holds writer.lock.
        (self.path / "lock.mdb").unlink(missing_ok=True)
        self.close()

    def close_keeping(self) -> BaseException | None:
        """Commit what can still be committed and close; never raises (for the paths that are already handling an
        error or Ctrl-C). Returns the error a final commit raised, if any."""
        error = None
        if self._broken is None and self._txn is not None:
            try:
                self.commit()
            except Exception as err:
                error = err
                log.warning("%s", err)
        self.close()
        return error

    def close(self) -> None:
        if getattr(self, "_txn", None) is not None:
            try:
                self._txn.abort()
            except lmdb.Error:
                pass
            self._txn = None
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # releases the lock; the empty lock file stays (removing it would race)
            self._lock_fd = None

    def __enter__(self) -> "CaptionStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            # Keep every caption made so far (Ctrl-C included): the store stays incomplete and resumable.
            self.close_keeping()
