"""`streamsynth captions import` with bad input and faults: every line is kept or the error names file and line, and
no half store is ever visible."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from faultkit import assert_clean_error, fill, kill_me, on_small_fs, run_forked, unreadable
from streamsynth.captions import CaptionStore, CaptionStoreWriter, import_captions
from streamsynth.cli import main as cli


def _import(source: Path, out: Path, *extra: str):
    return run_forked(lambda: cli(["captions", "import", str(source), "--out", str(out), *extra]))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "lmdb" in p.name)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _by_class(store: CaptionStore) -> dict[str, list[tuple[str, str]]]:
    return {info.id: [(c.text, c.key) for c in store.captions(info.index)] for info in store.classes}


def test_repeated_keys_keep_every_caption(tmp_path):
    """The issue's case: 4 lines with one key, 3 of one class and 1 of another, imported as 1 caption."""
    rows = [{"class": "n01440764", "caption": f"tench {i}", "key": "0001.jpg"} for i in range(3)]
    rows.append({"class": "n02102040", "caption": "a dog", "key": "0001.jpg"})
    result = _import(_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "c.lmdb")
    assert result.status == 0, result.describe()
    assert "wrote 4 captions of 2 classes" in result.out
    assert "3 captions share their image key" in result.err  # said, not silent
    assert _by_class(CaptionStore(tmp_path / "c.lmdb")) == {
        "n01440764": [(f"tench {i}", "0001.jpg") for i in range(3)], "n02102040": [("a dog", "0001.jpg")]}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_non_utf8_names_file_line_and_byte(tmp_path, suffix):
    good = {".jsonl": '{"class": "a", "caption": "fine"}\n', ".csv": "class,caption\na,fine\n", ".txt": "fine\n"}
    bad = {".jsonl": b'{"class": "a", "caption": "caf\xe9"}\n', ".csv": b"a,caf\xe9\n", ".txt": b"caf\xe9\n"}
    if suffix == ".txt":
        folder = tmp_path / "txt"
        folder.mkdir()
        source = folder / "a.txt"
        source.write_bytes(good[suffix].encode() + bad[suffix])
    else:
        source = folder = tmp_path / f"c{suffix}"
        source.write_bytes(good[suffix].encode() + bad[suffix])
    result = _import(folder, tmp_path / "c.lmdb")
    line = 3 if suffix == ".csv" else 2
    assert_clean_error(result, f"{source}:{line}: not UTF-8", "0xe9", "column 6" if suffix == ".csv" else "column",
                       status=2)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix):
    text = {".jsonl": '{"class": "a", "caption": "first"}\n', ".csv": "class,caption\na,first\n", ".txt": "first\n"}
    if suffix == ".txt":
        source = tmp_path / "txt"
        source.mkdir()
        (source / "a.txt").write_bytes(b"\xef\xbb\xbf" + text[suffix].encode())
    else:
        source = tmp_path / f"c{suffix}"
        source.write_bytes(b"\xef\xbb\xbf" + text[suffix].encode())
    store = import_captions(source, tmp_path / "c.lmdb")
    assert [c.id for c in store.classes] == ["a"] and store.caption(0, 0).text == "first"


@pytest.mark.parametrize("case, content, words", [
    ("csv-extra-cells", "class,caption\na,one,two\n", [":2:", "quote cells"]),
    ("csv-unclosed-quote", 'class,caption\na,"never closed\n', ["c.csv:", "malformed CSV"]),
    ("json-list", '["a", "b"]\n', [":1: expected a JSON object"]),
    ("json-caption-list", '{"class": "a", "caption": ["x"]}\n', [":1: field 'caption' must be text"]),
    ("json-blank-caption", '{"class": "a", "caption": "   "}\n', [":1: field 'caption' holds only white space"]),
    ("empty-file", "", ["holds no captions"]),
])
def test_malformed_input_names_file_and_line(tmp_path, case, content, words):
    source = tmp_path / ("c.csv" if case.startswith("csv") else "c.jsonl")
    source.write_text(content)
    assert_clean_error(_import(source, tmp_path / "c.lmdb"), *words, status=2)
    assert _leftovers(tmp_path) == []


def test_an_unreadable_source_is_named(tmp_path):
    source = _jsonl(tmp_path / "c.jsonl", [{"class": "a", "caption": "x"}])
    with unreadable(source):
        result = _import(source, tmp_path / "c.lmdb")
    assert_clean_error(result, "cannot read caption file", "Permission denied", status=2)


def test_a_bad_name_map_is_named(tmp_path):
    source = _jsonl(tmp_path / "c.jsonl", [{"class": "a", "caption": "x"}])
    names = tmp_path / "names.json"
    names.write_text('{"a": "apple",}')
    assert_clean_error(_import(source, tmp_path / "c.lmdb", "--names", str(names)), "names.json:1: not valid JSON")
    names.write_bytes(b'{"a": "\xe9"}')
    assert_clean_error(_import(source, tmp_path / "c.lmdb", "--names", str(names)), "names.json:1: not UTF-8")


def test_an_output_under_a_file_is_named(tmp_path):
    source = _jsonl(tmp_path / "c.jsonl", [{"class": "a", "caption": "x"}])
    (tmp_path / "afile").write_text("")
    assert_clean_error(_import(source, tmp_path / "afile" / "c.lmdb"), "afile", status=2)


def test_keys_beyond_lmdbs_limit_are_imported(tmp_path):
    long_key = "deep/" * 150 + "image.jpg"  # 759 bytes; LMDB keys hold 511
    rows = [{"class": "a", "caption": f"caption {i}", "key": long_key + str(i)} for i in range(3)]
    store = import_captions(_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "c.lmdb")
    assert [c.key for c in store.captions(0)] == [long_key + str(i) for i in range(3)]


def test_an_import_that_finishes_second_writes_nothing(tmp_path, monkeypatch):
    """Another import into the same --out completes while this one runs: this one fails cleanly at the end."""
    first = _jsonl(tmp_path / "first.jsonl", [{"class": "a", "caption": "from the first import"}])
    second = _jsonl(tmp_path / "second.jsonl", [{"class": "b", "caption": "from the second import"}])
    out = tmp_path / "c.lmdb"
    finalize = CaptionStoreWriter.finalize

    def finalize_then_lose_the_race(self):
        finalize(self)
        monkeypatch.setattr(CaptionStoreWriter, "finalize", finalize)
        assert cli(["captions", "import", str(first), "--out", str(out)]) == 0

    monkeypatch.setattr(CaptionStoreWriter, "finalize", finalize_then_lose_the_race)
    result = run_forked(lambda: cli(["captions", "import", str(second), "--out", str(out)]))
    assert_clean_error(result, "was created by another process while this import ran", status=2)
    assert _by_class(CaptionStore(out)) == {"a": [("from the first import", "first.jsonl:1")]}
    assert _leftovers(tmp_path) == ["c.lmdb"]


def test_racing_imports_leave_one_whole_store(tmp_path):
    rows = [{"class": f"c{i % 5}", "caption": f"caption {i}"} for i in range(3000)]
    source = _jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "c.lmdb"
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            os._exit(cli(["captions", "import", str(source), "--out", str(out)]))
        pids.append(pid)
    codes = sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids)
    assert codes[0] == 0 and all(code in (0, 2) for code in codes)  # a loser exits with a clean error
    assert len(CaptionStore(out)) == 3000
    assert _leftovers(tmp_path) == ["c.lmdb"]


@pytest.mark.parametrize("commits", [0, 1, 3])
def test_kill_9_during_an_import_leaves_no_store(tmp_path, monkeypatch, commits):
    rows = [{"class": f"c{i % 3}", "caption": f"caption {i}"} for i in range(3500)]  # commits every 1024
    source = _jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "c.lmdb"
    commit, done = CaptionStoreWriter.commit, []

    def commit_then_die(self):
        commit(self)
        done.append(1)
        if len(done) > commits:
            kill_me()

    monkeypatch.setattr(CaptionStoreWriter, "commit", commit_then_die)
    result = run_forked(lambda: import_captions(source, out) and 0)
    assert result.signal == signal.SIGKILL, result.describe()
    assert not out.exists()  # never a half store under the name asked for
    monkeypatch.setattr(CaptionStoreWriter, "commit", commit)
    assert len(import_captions(source, out)) == 3500
    assert _leftovers(tmp_path) == ["c.lmdb"]  # the killed import's hidden folder is cleaned up


def test_ctrl_c_during_an_import_leaves_nothing(tmp_path, monkeypatch):
    source = _jsonl(tmp_path / "c.jsonl", [{"class": "a", "caption": f"caption {i}"} for i in range(10)])
    add = CaptionStoreWriter.add

    def add_then_interrupt(self, *args, **kwargs):
        add(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)

    monkeypatch.setattr(CaptionStoreWriter, "add", add_then_interrupt)
    result = _import(source, tmp_path / "c.lmdb")
    assert result.status == 130 and "interrupted" in result.err and "Traceback" not in result.text
    assert _leftovers(tmp_path) == []


def test_a_full_disk_during_an_import(tmp_path):
    rows = [{"class": f"c{i % 4}", "caption": f"caption number {i} " + "words " * 10} for i in range(4000)]
    source = _jsonl(tmp_path / "c.jsonl", rows)

    def child(disk: Path) -> dict:
        code = cli(["captions", "import", str(source), "--out", str(disk / "c.lmdb")])
        left = sorted(os.listdir(disk))
        # once there is room, the same import works
        shutil.rmtree(disk / "c.lmdb", ignore_errors=True)
        return {"code": code, "left": left}

    result = on_small_fs(300 << 10, child)
    assert result.value["code"] == 2, result.describe()
    assert_clean_error(result, "no space left on device", "c.lmdb", "nothing was written")
    assert result.value["left"] == []  # no store, no partial folder taking the space
    assert "Attempt to operate on closed" not in result.text


def test_a_disk_already_full_when_the_import_starts(tmp_path):
    source = _jsonl(tmp_path / "c.jsonl", [{"class": "a", "caption": "x"}])

    def child(disk: Path) -> dict:
        fill(disk)
        code = cli(["captions", "import", str(source), "--out", str(disk / "c.lmdb")])
        return {"code": code}

    result = on_small_fs(256 << 10, child)
    assert result.signal is None, result.describe()  # LMDB's lock file is mapped: unprepared, a full disk is SIGBUS
    assert_clean_error(result, "no space left on device")
