"""`streamsynth caption` with faulty trees, keys, disks and kills: the run survives or stops with one line, keeps
everything it committed, and `--resume` ends with exactly the captions of an uninterrupted run.

The captioner is a deterministic stub (conftest.StubCaptioner): these cases test the pipeline around the model.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import png
from faultkit import assert_clean_error, fill, kill_me, on_small_fs, random_bytes, run_forked, truncate, unreadable
from streamsynth.captions import CaptionStore, CaptionStoreWriter
from streamsynth.captions.captioning import CaptionReport, report_path
from streamsynth.cli import main as cli

A, B = "n01440764", "n02102040"


def _caption(images: Path, out: Path, *extra: str) -> int:
    return cli(["caption", "--images", str(images), "--out", str(out), "--model", "stub", "--device", "cpu",
                "--batch-size", "4", "--num-workers", "0", "--no-progress", *extra])


def _pairs(store: Path) -> list[list[str]]:
    s = CaptionStore(store)
    return sorted([s.classes[c.class_index].id, c.key, c.text] for info in s.classes for c in s.captions(info.index))


def _committed(store: Path) -> int:
    """Captions committed to a store, complete or not, read without a writer."""
    import lmdb

    env = lmdb.open(str(store), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return json.loads(txn.get(b"meta"))["num_captions"]
    finally:
        env.close()


def _report(store: Path) -> dict:
    return json.loads(report_path(store).read_text())


@pytest.fixture
def many(tmp_path, image_tree) -> Path:
    """60 small PNGs in two classes, and one zero-byte file."""
    files = {f"{cls}/{i:03d}.png": i + 100 * c for c, cls in enumerate((A, B)) for i in range(30)}
    return image_tree(tmp_path / "images", {**files, f"{B}/broken.png": b""})


@pytest.fixture
def reference(many, tmp_path, stub_captioner) -> list[list[str]]:
    out = tmp_path / "reference.lmdb"
    assert _caption(many, out) == 0
    return _pairs(out)


def test_keys_beyond_lmdbs_limit_caption_and_resume(tmp_path, image_tree, stub_captioner, monkeypatch):
    deep = "/".join(["d" * 120] * 5)  # a 600-byte relative key; LMDB keys hold 511 bytes
    root = image_tree(tmp_path / "images", {f"{A}/{deep}/{i}.png": i for i in range(6)} | {f"{B}/x.png": 9})
    out = tmp_path / "c.lmdb"
    commit, done = CaptionStoreWriter.commit, []

    def commit_then_die(self):
        commit(self)
        done.append(1)
        if len(done) == 2:
            kill_me()

    monkeypatch.setattr(CaptionStoreWriter, "commit", commit_then_die)
    killed = run_forked(lambda: _caption(root, out, "--commit-every", "2"))
    assert killed.signal == signal.SIGKILL, killed.describe()
    monkeypatch.setattr(CaptionStoreWriter, "commit", commit)
    assert _caption(root, out, "--commit-every", "2", "--resume") == 0  # the same long keys again: no crash
    keys = [key for _, key, _ in _pairs(out)]
    assert len(keys) == 7 and sum(len(k.encode()) > 511 for k in keys) == 6


def test_symlink_loops_are_listed_once_under_the_right_class(tmp_path, image_tree, stub_captioner):
    root = image_tree(tmp_path / "images", {f"{cls}/sub/{i}.png": i + 10 * c for c, cls in enumerate((A, B))
                                            for i in range(4)})
    (root / A / "sub" / "self").symlink_to(".")  # a loop onto itself
    (root / A / "up").symlink_to("..")  # back to the dataset root: would list B's images under A
    (root / A / "other").symlink_to(f"../{B}")  # into another class's folder
    (root / B / "sub" / "again").symlink_to("../..")  # to its own class folder
    (root / B / "dangling").symlink_to("nowhere")
    assert _caption(root, tmp_path / "c.lmdb") == 0
    pairs = _pairs(tmp_path / "c.lmdb")
    assert len(pairs) == 8  # not 8 x 40 levels of links
    assert all(key.startswith(f"{cls}/sub/") and key.count("/") == 2 for cls, key, _ in pairs)
    skipped = {s["key"]: s["reason"] for s in _report(tmp_path / "c.lmdb")["skipped"]}
    assert {f"{A}/sub/self", f"{A}/up", f"{A}/other", f"{B}/sub/again"} <= set(skipped)
    assert "another class's folder" in skipped[f"{A}/other"] and "loop" in skipped[f"{A}/up"]


def test_an_unreadable_class_folder_is_named(tmp_path, image_tree, stub_captioner):
    root = image_tree(tmp_path / "images", {f"{A}/1.png": 1, f"{B}/2.png": 2})
    with unreadable(root / B):
        assert _caption(root, tmp_path / "c.lmdb") == 0
    [entry] = _report(tmp_path / "c.lmdb")["empty_classes"]
    assert entry["id"] == B and entry["reason"] == "class folder unreadable (Permission denied)"


def test_an_unreadable_image_is_skipped_then_captioned_on_resume(tmp_path, image_tree, stub_captioner):
    root = image_tree(tmp_path / "images", {f"{A}/1.png": 1, f"{A}/2.png": 2})
    out = tmp_path / "c.lmdb"
    with unreadable(root / A / "2.png"):
        assert _caption(root, out) == 0
    [skipped] = _report(out)["skipped"]
    assert skipped["key"] == f"{A}/2.png" and "Permission denied" in skipped["reason"]
    assert len(_pairs(out)) == 1


def test_a_file_name_that_is_not_utf8(tmp_path, image_tree, stub_captioner):
    root = image_tree(tmp_path / "images", {f"{A}/ok.png": 1})
    (root / A / os.fsdecode(b"caf\xe9.png")).write_bytes(png(2))
    assert _caption(root, tmp_path / "c.lmdb") == 0
    assert sorted(key for _, key, _ in _pairs(tmp_path / "c.lmdb")) == [f"{A}/caf\\xe9.png", f"{A}/ok.png"]


@pytest.mark.parametrize("point", ["first-commit", "third-commit", "mid-transaction", "report-write"])
def test_kill_9_anywhere_then_resume_gives_the_same_captions(tmp_path, many, reference, monkeypatch, point):
    out = tmp_path / "c.lmdb"
    calls = []

    def after(original, when):
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append(1)
            if len(calls) == when:
                kill_me()
            return result
        return wrapped

    target, name, when = {"first-commit": (CaptionStoreWriter, "commit", 2),
                          "third-commit": (CaptionStoreWriter, "commit", 4),
                          "mid-transaction": (CaptionStoreWriter, "add", 7),
                          "report-write": (CaptionReport, "write", 1)}[point]
    monkeypatch.setattr(target, name, after(getattr(target, name), when))
    killed = run_forked(lambda: _caption(many, out, "--commit-every", "5"))
    assert killed.signal == signal.SIGKILL, killed.describe()
    monkeypatch.undo()
    from conftest import StubCaptioner
    monkeypatch.setattr("streamsynth.captions.captioners.load_captioner", lambda *a, **k: StubCaptioner())
    assert _caption(many, out, "--commit-every", "5", "--resume") == 0
    assert _pairs(out) == reference
    report = _report(out)
    assert report["complete"] and [s["key"] for s in report["skipped"]] == [f"{B}/broken.png"]


def test_a_full_disk_keeps_what_was_committed_and_resumes(tmp_path, many, reference, stub_captioner):
    def child(disk: Path) -> dict:
        out = disk / "c.lmdb"
        filler = fill(disk, leave=40 << 10)
        code = _caption(many, out, "--commit-every", "5")
        committed = _committed(out)
        filler.unlink()  # the cause removed
        resumed = _caption(many, out, "--commit-every", "5", "--resume")
        return {"code": code, "committed": committed, "resumed": resumed, "pairs": _pairs(out),
                "report": _report(out)}

    result = on_small_fs(320 << 10, child)
    value = result.value
    assert value is not None, result.describe()
    assert value["code"] == 2 and value["resumed"] == 0, result.describe()
    line = assert_clean_error(result, "no space left on device", "c.lmdb", "--resume")
    assert "captions committed before are kept" in line or "nothing had been committed" in line
    assert "Attempt to operate on closed" not in result.text
    assert value["committed"] > 0 and value["pairs"] == reference and value["report"]["complete"]


def test_two_runs_into_one_store(tmp_path, many, stub_captioner, monkeypatch):
    out = tmp_path / "c.lmdb"
    holder = CaptionStoreWriter(out, [(A, "tench"), (B, "English springer")], "stub-captioner", source=str(many),
                                extra={"layout": "imagefolder", "captioning": {"stub": True}})
    try:
        result = run_forked(lambda: _caption(many, out, "--resume"), timeout=60)
    finally:
        holder.close()
    assert_clean_error(result, "being written by another process", status=2)


def _shards(folder: Path, count: int = 3) -> list[Path]:
    import webdataset as wds

    folder.mkdir()
    paths = []
    for s in range(count):
        path = folder / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for n in range(4):
                sink.write({"__key__": f"s{s}{n}", "png": png(10 * s + n, (40, 40)), "cls": n % 2})
        paths.append(path)
    return paths


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "empty"])
def test_a_damaged_shard_is_reported_and_the_others_captioned(tmp_path, stub_captioner, damage):
    shards = _shards(tmp_path / "shards")
    {"truncated": lambda p: truncate(p, 0.6), "random-bytes": lambda p: random_bytes(p, 20000),
     "empty": lambda p: truncate(p, 0)}[damage](shards[1])
    assert _caption(tmp_path / "shards", tmp_path / "c.lmdb") == 0
    keys = {key.split("/")[0] for _, key, _ in _pairs(tmp_path / "c.lmdb")}
    assert {"train-000000.tar", "train-000002.tar"} <= keys
    [problem] = [s for s in _report(tmp_path / "c.lmdb")["skipped"] if s["key"] == "train-000001.tar"]
    assert {"truncated": "truncated", "random-bytes": "not an uncompressed tar",
            "empty": "empty file"}[damage] in problem["reason"]


def test_every_shard_damaged_is_one_line(tmp_path, stub_captioner):
    for shard in _shards(tmp_path / "shards", 2):
        random_bytes(shard, 5000)
    assert_clean_error(run_forked(lambda: _caption(tmp_path / "shards", tmp_path / "c.lmdb")),
                       "train-000000.tar", "not an uncompressed tar file", status=2)


def test_an_unreadable_images_folder(tmp_path, image_tree, stub_captioner):
    root = image_tree(tmp_path / "images", {f"{A}/1.png": 1})
    with unreadable(root):
        result = run_forked(lambda: _caption(root, tmp_path / "c.lmdb"))
    assert_clean_error(result, str(root), "Permission denied", status=2)
