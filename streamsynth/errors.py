"""The errors streamsynth raises for bad input and faults around it: each message is one line, written for the user.

Every such error derives from `StreamsynthError`, so a command (`streamsynth ...`, `train.py`) turns it into
`<program>: error: <message>` and a non-zero exit status, never a traceback. A message names the thing (file, line,
shard, store, checkpoint) and says what to do about it.
"""

from __future__ import annotations


class StreamsynthError(Exception):
    """An error whose message is meant for the user: one line naming the thing at fault and the fix."""


class DiskFullError(StreamsynthError, OSError):
    """A write found no space left on the device; the message says where, how much is free and what was kept."""


class FileSizeLimitError(DiskFullError):
    """A write went past the process's file-size limit (`ulimit -f`, RLIMIT_FSIZE), not a full disk; a `DiskFullError`
    all the same for whoever handles one: in both cases the write found no room and what was written before is kept.
    The message names the limit and how to raise it."""


class DamagedFileError(StreamsynthError, ValueError):
    """A file streamsynth wrote or reads back (a store, a shard, a checkpoint) is truncated or corrupt."""


class MissingExtraError(StreamsynthError, ImportError):
    """A feature needs an optional dependency (a pyproject extra) that is not installed; the message names the
    `pip install` that adds it."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. An error re-raised from a DataLoader worker carries the worker's traceback
    in its message: only its last line, the original message, is kept."""
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Original Traceback" in text and lines:
        last = lines[-1]
        _, sep, message = last.partition(": ")
        return message if sep and " " not in last.split(": ", 1)[0] else last
    if isinstance(err, OSError) and err.filename and not isinstance(err, StreamsynthError):
        return f"{err.filename}: {err.strerror or text}"
    return " ".join(lines)
