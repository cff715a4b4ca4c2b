"""The one write path for files streamsynth produces (reports, results, checkpoints): all or nothing, only inside
the output folder, and a full disk said in words.

`atomic_write(path, write)` writes under a hidden temporary name beside `path`, flushes it to the disk and renames it
into place, so a reader (or the next run) sees either the previous file or the new one, never half of one, whatever
stops the writer: an exception, Ctrl-C, kill -9, a full disk. On any failure the temporary file is removed, so a
failed write does not keep the space it took. A symbolic link at `path` or at the temporary name is replaced, never
followed, so nothing is written outside the folder; `open_append` refuses a symbolic link, and `safe_name` and
`output_folder` keep names that come from data (class ids) from leaving it.

A full disk is recognised however the failing layer reports it: as ENOSPC/EDQUOT from Python's own writes, through
libraries that lose the errno on the way (torch's zip writer says "unexpected pos"), and for LMDB, which reports a
short write as EIO, by the free space left on the file system (`low_on_space`). It becomes a `DiskFullError` whose
message names the file, the space free there and the fix; where the process has a file-size limit (`ulimit -f`) and
the disk has room, the limit is the cause, and it is named instead (`FileSizeLimitError`).
"""

from __future__ import annotations

import codecs
import errno
import os
import resource
import shutil
import socket
import unicodedata
from pathlib import Path
from typing import Callable

from .errors import DiskFullError, FileSizeLimitError, StreamsynthError

# LMDB and zip writers lose ENOSPC on the way; a failed write on a file system with less than this free is taken to
# be a full disk (a write that failed for any other reason almost never coincides with a nearly full disk).
LOW_SPACE_BYTES = 1 << 20
# EFBIG: a file past the file-size limit (Python ignores SIGXFSZ, so the write fails instead of killing the process).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class UnsafePathError(StreamsynthError, ValueError):
    """A name or a symbolic link would make streamsynth write outside its output folder; the message names it."""


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for an unprivileged user) on the file system holding `path` or its nearest existing parent."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def is_full_errno(err: BaseException | None) -> bool:
    """Whether `err` or an exception it was raised from is an out-of-space OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


def low_on_space(path: str | os.PathLike, threshold: int = LOW_SPACE_BYTES) -> bool:
    free = free_bytes(path)
    return free is not None and free < threshold


def file_size_limit() -> int | None:
    """This process's file-size limit in bytes (`ulimit -f`, RLIMIT_FSIZE), None when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def check_file_size_limit(size: int, what: str) -> None:
    """Before work starts: a `FileSizeLimitError` if a file of `size` bytes (`what`, e.g. "a checkpoint") cannot be
    written under this process's file-size limit."""
    limit = file_size_limit()
    if limit is not None and size > limit:
        raise FileSizeLimitError(f"{what} takes about {human_bytes(size)}, above this process's file-size limit "
                                 f"(`ulimit -f`: {human_bytes(limit)}); raise it (`ulimit -f unlimited`)")


def disk_full_error(path: str | os.PathLike, what: str, kept: str = "", fix: str = "") -> DiskFullError:
    """The one-line `DiskFullError` for a failed write of `what` at `path`: where, how much is free, what survived.
    Where a file-size limit is in force and the disk has room, the limit is what stopped the write: a
    `FileSizeLimitError` says so."""
    limit = file_size_limit()
    if limit is not None and not low_on_space(path):
        # The caller's fix is for a full disk; whether the command then continues with --resume carries over.
        then = "continue with --resume" if "--resume" in fix else "run the command again"
        return FileSizeLimitError("; ".join(filter(None, [
            f"writing {what} {path} went past this process's file-size limit (`ulimit -f`: {human_bytes(limit)})",
            kept, f"raise it (`ulimit -f unlimited`) and {then}"])))
    free = free_bytes(path)
    where = f" ({human_bytes(free)} free there)" if free is not None else ""
    parts = [f"no space left on device writing {what} {path}{where}"]
    if kept:
        parts.append(kept)
    parts.append(fix or "free some space and run the command again")
    return DiskFullError("; ".join(parts))


class _TrackedFile:
    """A binary file that remembers the first OSError of a write: torch's zip writer replaces ENOSPC by its own
    message, and this is how the real cause is still known afterwards. It also counts the bytes written."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None
        self.written = 0

    def write(self, data) -> int:
        try:
            n = self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.written += len(data)
        return n

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as err:
            self.error = self.error or err
            raise


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (best effort: some file systems refuse fsync on a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: str | os.PathLike, shared: bool = False) -> Path:
    """Where `atomic_write` writes `path` before the rename: hidden, beside it, the same for every run, so that a
    temporary file left by a killed writer is replaced (and its space reused) by the next write; for a `shared` path
    (one that several processes, on one host or several, may write at the same time) one for each process:
    `.{name}.{host}-{pid}.tmp`, the host without dots, so that the name it writes is all before the last dot."""
    path = Path(path)
    writer = f".{socket.gethostname().replace('.', '-')}-{os.getpid()}" if shared else ""
    return path.with_name(f".{path.name}{writer}.tmp")


def _create_new(path: Path):
    """`path` as a new, empty binary file: whatever is there is removed first (a temporary file left by a killed
    writer, or a symbolic link someone put in its place), and a link that appears meanwhile is refused, not followed."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


def atomic_write(
    path: str | os.PathLike, write: Callable, *, what: str = "file", kept: str = "", fix: str = "",
    shared: bool = False,
) -> Path:
    """Write `path` all or nothing: `write(f)` fills a binary file-like object `f`; it becomes `path` only once
    complete and on disk. A full disk raises `DiskFullError` (its message built from `what`, `kept` and `fix`);
    any other failure re-raises as it is. Either way the temporary file is removed and `path` is unchanged.
    `shared`: other processes may write the same path at the same time (ranks into one folder): each writes its own
    temporary file, and the last complete one wins."""
    path = Path(path)
    tmp = temporary_path(path, shared)
    tracked = None
    try:
        with _create_new(tmp) as f:
            tracked = _TrackedFile(f)
            write(tracked)
            tracked.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(err, Exception) and (
            is_full_errno(err) or (tracked is not None and is_full_errno(tracked.error))
        ):
            raise disk_full_error(path, what, kept, fix) from None
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), **kwargs)


def open_append(path: str | os.PathLike, what: str = "log"):
    """A text file opened for appending (a log), created if missing; a symbolic link there is an `UnsafePathError`:
    appending through it would write wherever it points."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(f"{what} {path} is a symbolic link (to {os.readlink(path)}): streamsynth appends "
                                  "only to files inside its output folder; remove the link") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8", newline="")


def safe_name(name: object, what: str = "class id") -> str:
    """`name` if it can be a folder or file name inside an output folder, else an `UnsafePathError` saying why: it must
    be text (UTF-8), not empty, not `.` or `..`, without a path separator, NUL or other control character."""
    if not isinstance(name, str):
        raise UnsafePathError(f"{what} {name!r} is a {type(name).__name__}, not text")
    problem = None
    if name in ("", ".", ".."):
        problem = "empty" if not name else "a relative path"
    elif "/" in name or "\\" in name:
        problem = "a path (it holds a path separator)"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        problem = "not printable (it holds a control character)"
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "not UTF-8 text"
    if problem:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UnsafePathError(f"{what} {shown!r} is {problem}: it cannot name a folder inside the output folder; use "
                              "plain names such as n01440764 or tench")
    return name


def output_folder(parent: str | os.PathLike, name: str, what: str = "class id") -> Path:
    """The folder `parent/name`, created if missing, after `safe_name(name)`; a symbolic link or a file there is an
    `UnsafePathError` (files written into a link would land wherever it points)."""
    folder = Path(parent) / safe_name(name, what)
    try:
        folder.mkdir()
    except FileExistsError:
        if folder.is_symlink() or not folder.is_dir():
            kind = f"a symbolic link (to {os.readlink(folder)})" if folder.is_symlink() else "not a folder"
            raise UnsafePathError(f"{folder} is {kind}: streamsynth writes only into folders it made inside the "
                                  "output folder; remove it") from None
    return folder


class TextFileError(StreamsynthError, ValueError):
    """A text input (captions, a name map) cannot be read as UTF-8; the message names the file and line."""


def read_text(path: str | os.PathLike, what: str = "file", error: type[Exception] = TextFileError) -> str:
    """A text file as UTF-8, with a byte-order mark dropped; a file that is missing, unreadable or not UTF-8 raises
    `error` naming the file (and, for bad bytes, the line, the column and the byte)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); convert the file to "
            "UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def text_lines(text: str) -> list[str]:
    """Lines as Python's text files give them (\\n, \\r\\n or \\r), not `str.splitlines`, which would also split
    at characters such as U+2028 that may stand inside a JSON string."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
