"""Tools of the fault-injection suite: run a command in a forked child (to survive and observe a crash or a kill),
make a small file system (a full disk), take away root's power to read anything (permission denied), damage files.

- `run_forked(fn)`: fork, run `fn()` in the child with its stdout/stderr (Python's and the C level's) captured, and
  report its exit status or the signal that ended it. The child inherits every module the test process imported,
  so it starts in milliseconds; a SIGBUS, a segfault or a kill -9 in it is observed, not suffered.
- `small_fs`: inside such a child, mount a tmpfs of a few hundred KiB in a private mount namespace (as root, or as
  an unprivileged user in a user namespace); it vanishes with the child. Where neither works, tests that need it
  are skipped with that reason.
- `no_dac_override()`: root reads every file whatever its mode; this drops CAP_DAC_OVERRIDE and
  CAP_DAC_READ_SEARCH from the calling thread (and its forked children) so that `chmod 000` means permission
  denied, as it does for a normal user. For a normal user it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Forked:
    status: int | None  # exit status, None if a signal ended the child
    signal: int | None  # the signal that ended it
    out: str
    err: str
    value: Any = None  # what fn returned (JSON), when it returned

    @property
    def text(self) -> str:
        return self.out + self.err

    def describe(self) -> str:
        how = f"signal {self.signal}" if self.signal else f"status {self.status}"
        return f"child ended with {how}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


def run_forked(fn: Callable[[], Any], timeout: float = 120) -> Forked:
    """Run `fn()` in a forked child. Its return value (JSON-able) comes back as `.value`; an int return value (a CLI
    `main`'s) or the "code" of a returned dict is the child's exit status."""
    with tempfile.TemporaryDirectory(prefix="streamsynth-fork-") as folder:
        paths = {name: os.path.join(folder, name) for name in ("out", "err", "value")}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                out = open(paths["out"], "w", buffering=1)
                err = open(paths["err"], "w", buffering=1)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = out, err
                logging.root.handlers = []  # pytest's capture handlers belong to the parent
                if "torch" in sys.modules:
                    # The parent's OpenMP thread team does not exist here; an op that used it would wait for it
                    # forever (what DataLoader workers avoid the same way).
                    sys.modules["torch"].set_num_threads(1)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                value = fn()
                with open(paths["value"], "w") as f:
                    json.dump(value, f)
                code = value if isinstance(value, int) and not isinstance(value, bool) else 0
                if isinstance(value, dict) and isinstance(value.get("code"), int):
                    code = value["code"]  # a child that reports more than its exit status
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 70
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked child did not finish in {timeout} s (a hang)")
            time.sleep(0.01)
        read = {name: Path(p).read_text(errors="replace") if os.path.exists(p) else "" for name, p in paths.items()}
        value = json.loads(read["value"]) if read["value"] else None
        if os.WIFSIGNALED(status):
            return Forked(None, os.WTERMSIG(status), read["out"], read["err"], value)
        return Forked(os.WEXITSTATUS(status), None, read["out"], read["err"], value)


def kill_me() -> None:
    """kill -9 of the calling process, now."""
    os.kill(os.getpid(), signal.SIGKILL)


def assert_clean_error(result: Forked, *words: str, status: int | None = None) -> str:
    """The child ended with a non-zero exit status (not a signal), printed no traceback, and its message (stderr)
    holds every one of `words`; returns the error line."""
    assert result.signal is None, result.describe()
    assert result.status != 0 if status is None else result.status == status, result.describe()
    assert "Traceback" not in result.text, result.describe()
    errors = [line for line in result.err.splitlines() if "error:" in line]
    assert errors, result.describe()
    for word in words:
        assert word in errors[-1], f"{word!r} not in {errors[-1]!r}"
    return errors[-1]


# ---------------------------------------------------------------- a small file system


_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


def _private_mount_namespace() -> None:
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(_CLONE_NEWNS) != 0:
        if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNS) failed")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making / private failed")


def mount_small_fs(mountpoint: str | os.PathLike, size: int) -> Path:
    """In a forked child only: a tmpfs of `size` bytes at `mountpoint`, in a private mount namespace."""
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    _private_mount_namespace()
    if _libc.mount(b"tmpfs", str(mountpoint).encode(), b"tmpfs", 0, f"size={size}".encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mounting a tmpfs at {mountpoint} failed")
    return Path(mountpoint)


_small_fs_ok: str | None = None


def small_fs_available() -> str:
    """'' when a small file system can be made here, else the reason it cannot (for pytest.skip)."""
    global _small_fs_ok
    if _small_fs_ok is None:
        with tempfile.TemporaryDirectory() as folder:
            def probe() -> int:
                root = mount_small_fs(Path(folder) / "m", 64 << 10)
                try:
                    (root / "big").write_bytes(b"x" * (128 << 10))
                except OSError as err:
                    return 0 if err.errno == 28 else 3
                return 4

            result = run_forked(probe, timeout=30)
            _small_fs_ok = "" if result.status == 0 else (
                f"cannot make a small file system here (no mount namespace or tmpfs; {result.err.strip()[-200:]})")
    return _small_fs_ok


def on_small_fs(size: int, fn: Callable[[Path], Any], timeout: float = 180) -> Forked:
    """Run `fn(mountpoint)` in a forked child in which `mountpoint` is a fresh tmpfs of `size` bytes."""
    reason = small_fs_available()
    if reason:
        pytest.skip(reason)
    folder = tempfile.mkdtemp(prefix="streamsynth-smallfs-")

    def child():
        return fn(mount_small_fs(Path(folder) / "disk", size))

    try:
        return run_forked(child, timeout)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(Path(folder) / "disk")
            os.rmdir(folder)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of `folder` up to `leave` free bytes with one file; returns it (delete it to free)."""
    import shutil

    path = folder / "filler"
    free = shutil.disk_usage(folder).free - leave
    with open(path, "wb") as f:
        chunk = b"\0" * (64 << 10)
        while free > 0:
            try:
                free -= f.write(chunk[: max(4096, min(len(chunk), free))])
                f.flush()
            except OSError:
                break
    return path


# ---------------------------------------------------------------- permission denied, even for root


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_DAC_BITS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


@contextlib.contextmanager
def no_dac_override():
    """Permission bits apply to this thread (and processes it forks) even if it runs as root."""
    if os.geteuid() != 0:
        yield
        return
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("cannot read this thread's capabilities")
    saved = data[0].effective
    data[0].effective &= ~_DAC_BITS
    if _libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: permission bits cannot be tested here")
    try:
        yield
    finally:
        data[0].effective = saved
        _libc.capset(ctypes.byref(header), data)


@contextlib.contextmanager
def unreadable(path: Path):
    """`path` with mode 000 (and permission bits enforced, see `no_dac_override`)."""
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        with no_dac_override():
            yield path
    finally:
        path.chmod(mode & 0o7777)


# ---------------------------------------------------------------- damage


def truncate(path: Path, at: float | int) -> Path:
    """Cut `path` to `at` bytes (an int) or to that fraction of its size (a float)."""
    size = path.stat().st_size
    keep = int(size * at) if isinstance(at, float) else at
    os.truncate(path, min(keep, size))
    return path


def random_bytes(path: Path, size: int = 4096, seed: int = 0) -> Path:
    import random

    path.write_bytes(random.Random(seed).randbytes(size))
    return path
