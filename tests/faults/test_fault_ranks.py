"""`streamsynth caption` and `generate` on two ranks (forked children that open a gloo group as torchrun's ranks do)
when one rank meets a fault: a full disk of its own, a kill in the merge, another listing, other settings. The rank
at fault is named in one line, the other ranks' work is kept, and `--resume` ends where an uninterrupted run ends.

The captioner is the deterministic stub (conftest.StubCaptioner); generation uses the tiny random Stable Diffusion.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from faultkit import assert_clean_error, mount_small_fs, run_forked, run_forked_ranks, small_fs_available
from streamsynth.captions import CaptionStore
from streamsynth.captions.captioning import parts_folder, report_path
from streamsynth.captions.store import StorePart
from streamsynth.cli import main as cli

A, B = "n01440764", "n02102040"


def _caption(images: Path, out: Path, *extra: str) -> int:
    return cli(["caption", "--images", str(images), "--out", str(out), "--captioner", "stub", "--device", "cpu",
                "--batch-size", "4", "--workers", "0", "--commit-every", "5", "--no-progress", *extra])


def _records(store: Path) -> list:
    s = CaptionStore(store)
    return [(s.classes[c.class_index].id, c.index, c.key, c.text) for info in s.classes for c in s.captions(info.index)]


def _part_size(part: Path) -> int:
    with StorePart(part) as reader:
        return reader.meta["num_captions"]


@pytest.fixture
def many(tmp_path, image_tree) -> Path:
    """60 small PNGs in two classes and one zero-byte file: 16 batches of 4, the last (the empty file) rank 1's."""
    files = {f"{cls}/{i:03d}.png": i + 100 * c for c, cls in enumerate((A, B)) for i in range(30)}
    return image_tree(tmp_path / "images", {**files, f"{B}/broken.png": b""})


@pytest.fixture
def reference(many, tmp_path, stub_captioner) -> list:
    out = tmp_path / "reference.lmdb"
    assert _caption(many, out) == 0
    return _records(out)


def _no_traceback(*results) -> None:
    for result in results:
        assert result.signal is None and "Traceback" not in result.text, result.describe()


def test_a_full_disk_in_one_rank_names_it_and_keeps_the_others_work(tmp_path, many, reference, stub_captioner):
    reason = small_fs_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "c.lmdb"
    part = parts_folder(out) / "part-00001.lmdb"

    def rank(r: int) -> int:
        if r == 1:  # this rank's part lies on a small disk of its own, in its own mount namespace
            mount_small_fs(part, 40 << 10)
        # --resume: mounting made the parts folder before rank 0 looked; a resume of nothing starts afresh
        return _caption(many, out, "--resume")

    ranks = run_forked_ranks(rank, 2)
    _no_traceback(*ranks)
    for result in ranks:
        line = assert_clean_error(result, "rank 1 of 2", "no space left on device", "part-00001.lmdb", "--resume",
                                  status=2)
        assert "every rank's committed captions are kept in" in line
    assert not out.exists()
    assert _part_size(parts_folder(out) / "part-00000.lmdb") == 32  # rank 0 finished its share: 8 batches of 4
    report = json.loads(report_path(out).read_text())
    assert not report["complete"] and [r["error"] is None for r in report["ranks"]] == [True, False]

    resumed = run_forked_ranks(lambda r: _caption(many, out, "--resume"), 2)  # the cause removed: a disk with room
    assert [r.status for r in resumed] == [0, 0], [r.describe() for r in resumed]
    assert _records(out) == reference
    report = json.loads(report_path(out).read_text())
    assert report["already_in_store"] == 32 and report["captioned_this_run"] == 28  # nothing captioned twice


def test_kill_9_in_the_merge_then_resume_on_one_process(tmp_path, many, reference, stub_captioner, monkeypatch):
    out = tmp_path / "c.lmdb"

    def rank(r: int) -> int:
        if r == 0:
            lookup, calls = StorePart.caption_of, [0]

            def caption_of_then_die(self, key):
                calls[0] += 1
                if calls[0] == 20:  # a third of the way through writing the merged store
                    os.kill(os.getpid(), signal.SIGKILL)
                return lookup(self, key)

            monkeypatch.setattr(StorePart, "caption_of", caption_of_then_die)
        return _caption(many, out)

    ranks = run_forked_ranks(rank, 2)
    assert ranks[0].signal == signal.SIGKILL, ranks[0].describe()
    assert_clean_error(ranks[1], "rank 1 of 2: lost contact with the other ranks", "--resume", status=2)
    assert not out.exists() and (tmp_path / ".c.lmdb.merging").exists()  # the half-merged store is hidden
    with pytest.raises(Exception, match="does not exist"):
        CaptionStore(out)
    assert_clean_error(run_forked(lambda: _caption(many, out)), "holds the parts of an interrupted run",
                       "--resume", status=2)
    assert _caption(many, out, "--resume") == 0  # one process continues the two ranks' parts
    assert _records(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("c.lmdb") or p.name.startswith(".c")) == [
        "c.lmdb", "c.lmdb.report.json"]  # parts and the hidden half-merge removed
    assert json.loads(report_path(out).read_text())["captioned_this_run"] == 0


def test_ranks_that_list_other_images_are_refused(tmp_path, many, stub_captioner, monkeypatch):
    from streamsynth.captions import images

    def rank(r: int) -> int:
        if r == 1:  # e.g. a node whose copy of the data set lacks a file
            find = images.find_images

            def one_fewer(*args, **kwargs):
                collection = find(*args, **kwargs)
                collection.images.pop()
                return collection

            monkeypatch.setattr(images, "find_images", one_fewer)
        return _caption(many, tmp_path / "c.lmdb")

    for result in run_forked_ranks(rank, 2):
        assert_clean_error(result, "lists other images on rank 1", "60 images", "61 images", "the same images",
                           status=2)
    assert not (tmp_path / "c.lmdb").exists()


# ------------------------------------------------------------------------------------------------------ generate


def _generate(out: Path, model: Path, store, *extra: str) -> int:
    return cli(["generate", "--out", str(out), "--sd-model", str(model), "--captions", str(store.path),
                "--images-per-class", "1", "--num-inference-steps", "2", "--image-size", "16",
                "--synth-batch-size", "2", "--shard-size", "2", "--synth-devices", "cpu", "--no-progress", *extra])


def _set(folder: Path) -> dict[int, bytes]:
    from streamsynth.imagefiles import decode_image
    from streamsynth.shards import index_shard

    found = {}
    for shard in sorted(folder.glob("*.tar")):
        index = index_shard(shard, ("png", "json"))
        for sample in index.samples:
            found[json.loads(index.read(sample, "json"))["sample_id"]] = np.asarray(
                decode_image(index.read(sample, "png"))).tobytes()
    return found


def test_a_full_disk_in_one_generating_rank(tmp_path, tiny_model, caption_store):
    """Rank 1 writes to a disk of its own (a node-local --out) that fills up; rank 0's shards are kept."""
    reason = small_fs_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "set"

    def rank(r: int) -> int:
        if r == 1:
            mount_small_fs(out, 24 << 10)
        return _generate(out, tiny_model, caption_store)

    ranks = run_forked_ranks(rank, 2, timeout=300)
    _no_traceback(*ranks)
    for result in ranks:
        assert_clean_error(result, "rank 1 of 2", "no space left on device", ".tar", "--resume", status=2)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(kept) == 3  # rank 0's units 0, 2 and 4 of 5 (10 classes, one image each, 2 a shard)

    assert run_forked(lambda: _generate(out, tiny_model, caption_store, "--resume"), timeout=300).status == 0
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    reference = tmp_path / "reference"
    assert run_forked(lambda: _generate(reference, tiny_model, caption_store), timeout=300).status == 0
    assert _set(out) == _set(reference) and len(_set(out)) == 10


def test_ranks_started_with_other_settings_are_refused(tmp_path, tiny_model, caption_store):
    out = tmp_path / "set"
    ranks = run_forked_ranks(lambda r: _generate(out, tiny_model, caption_store, "--seed", str(r)), 2)
    for result in ranks:
        assert_clean_error(result, "rank 1 was started with other settings than rank 0", "seed was 0, now 1",
                           status=2)
    assert not list(out.glob("*.tar")) if out.exists() else True
