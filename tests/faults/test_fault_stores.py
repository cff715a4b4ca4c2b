"""Caption stores that are damaged, foreign, unreadable or busy: every open is checked, nothing crashes the process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from faultkit import assert_clean_error, random_bytes, run_forked, truncate, unreadable
from streamsynth.captions import CaptionStore, CaptionStoreError, CaptionStoreWriter
from streamsynth.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


@pytest.fixture
def store(tmp_path, caption_store) -> Path:
    """A private copy of the session's complete 60-caption store."""
    return Path(shutil.copytree(caption_store.path, tmp_path / "captions.lmdb"))


def _stats(store: Path, *extra: str):
    return run_forked(lambda: cli(["captions", "stats", str(store), *extra]))


# A damaged data.mdb, cut at several points: an interrupted copy, a full disk. LMDB would read the missing pages
# through its memory map and the kernel would kill the process with SIGBUS.
@pytest.mark.parametrize("at", [0, 100, PAGE, 2 * PAGE, 0.5, -1], ids=["0B", "100B", "1page", "2pages", "half",
                                                                         "last-byte"])
def test_truncated_store_is_named_not_a_sigbus(store, at):
    data = store / "data.mdb"
    truncate(data, data.stat().st_size - 1 if at == -1 else at)
    result = _stats(store)
    assert_clean_error(result, "caption store", "damaged", str(store.name), status=2)
    with pytest.raises(CaptionStoreError, match="damaged"):
        CaptionStore(store)


def test_random_bytes_instead_of_a_store(store):
    random_bytes(store / "data.mdb", 64 * 1024)
    assert_clean_error(_stats(store), "not an LMDB file", "captions import", status=2)


def test_store_folder_without_data(store):
    (store / "data.mdb").unlink()
    assert_clean_error(_stats(store), "no data.mdb", status=2)


def test_data_file_is_a_folder(store):
    (store / "data.mdb").unlink()
    (store / "data.mdb").mkdir()
    assert_clean_error(_stats(store), str(store.name), status=2)


def test_unreadable_store(store):
    with unreadable(store / "data.mdb"):
        result = _stats(store)
    assert_clean_error(result, "Permission denied", str(store.name), status=2)


def _put(store: Path, key: bytes, value: bytes | None) -> None:
    env = lmdb.open(str(store), map_size=1 << 30)
    with env.begin(write=True) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)
    env.close()


GARBAGE = {
    "meta-not-json": (b"meta", b"\xff\xfe not json"),
    "meta-a-list": (b"meta", b"[1, 2, 3]"),
    "meta-num-classes-text": (b"meta", json.dumps({"schema_version": 1, "complete": True, "num_classes": "ten",
                                                   "num_captions": 60}).encode()),
    "meta-schema-99": (b"meta", json.dumps({"schema_version": 99, "complete": True}).encode()),
    "class-record-missing": (b"class/000003", None),
    "class-record-garbage": (b"class/000003", b'{"index": 3}'),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_records_name_the_store(store, case):
    key, value = GARBAGE[case]
    _put(store, key, value)
    line = assert_clean_error(_stats(store), str(store.name), status=2)
    assert ("damaged" in line or "schema version" in line), line


def test_a_damaged_caption_is_found_by_check(store):
    _put(store, b"cap/000002/000000003", b"{broken")
    assert _stats(store).status == 0  # a few examples per class do not read it
    assert_clean_error(_stats(store, "--check"), "damaged", "cap/000002/000000003", status=2)
    _put(store, b"cap/000004/000000000", None)
    with pytest.raises(CaptionStoreError, match="lists 6 captions but 'cap/000004/000000000' is missing"):
        CaptionStore(store).caption(4, 0)


def test_check_passes_on_a_good_store(store):
    result = _stats(store, "--check")
    assert result.status == 0 and "all 60 captions read back intact" in result.out, result.describe()


def test_resuming_a_truncated_store_is_refused_not_a_sigbus(tmp_path):
    path = tmp_path / "s.lmdb"
    writer = CaptionStoreWriter(path, [("a", "apple")], "m", commit_every=1)
    for i in range(200):
        writer.add(0, f"caption {i} " + "x" * 200, f"a/{i}.jpg")
    writer.commit()
    writer.close()
    truncate(path / "data.mdb", 0.5)
    result = run_forked(lambda: CaptionStoreWriter(path, [("a", "apple")], "m", resume=True) and 0)
    assert result.signal is None and result.status != 0, result.describe()
    assert "CaptionStoreError" in result.err and "truncated" in result.err


def test_a_second_writer_is_refused_not_left_waiting(tmp_path):
    path = tmp_path / "s.lmdb"
    first = CaptionStoreWriter(path, [("a", "apple")], "m")
    try:
        result = run_forked(lambda: CaptionStoreWriter(path, [("a", "apple")], "m", resume=True) and 0, timeout=60)
        assert result.status != 0 and "being written by another process" in result.err, result.describe()
    finally:
        first.close()
    CaptionStoreWriter(path, [("a", "apple")], "m", resume=True).close()  # free again once the first is closed


def test_train_py_names_a_truncated_store(store, tmp_path, isolated_cache, write_cache):
    truncate(store / "data.mdb", 0.5)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--from-cache", str(write_cache(tmp_path / "cache", [2])),
         "--captions", str(store), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "STREAMSYNTH_CACHE": str(isolated_cache)},
    )
    assert result.returncode == 2, result.stderr[-2000:]  # an error of the input (not -7, SIGBUS)
    assert "train.py: error: caption store" in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_damaged_embedded_caption_store_names_its_fix(tmp_path):
    """The digits captions are streamsynth's own cache: the fix is to delete them, not to import or caption."""
    from streamsynth.digits.data import ensure_digits_captions

    out = tmp_path / "digits.lmdb"
    # Built and rebuilt in children: a process keeps a store it read open, and py-lmdb opens a path once.
    assert run_forked(lambda: str(ensure_digits_captions(out))).value == str(out)
    _put(out, b"cap/000003/000000002", b"\xff not json")
    with pytest.raises(CaptionStoreError) as err:
        ensure_digits_captions(out)
    message = str(err.value)
    assert "delete it, and it is built again" in message and str(out) in message
    assert "captions import" not in message and "cap/000003/000000002" in message
    shutil.rmtree(out)
    assert run_forked(lambda: str(ensure_digits_captions(out))).value == str(out)  # rebuilt, as the message says
