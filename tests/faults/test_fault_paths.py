"""Nothing is written outside the output folder, and image folders are read without leaving them: class ids that are
not plain folder names are refused where they come in, a symbolic link at a destination is replaced and never
followed, and a link out of an image folder, a loop or a name that is not UTF-8 is named, not followed or fatal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import webdataset as wds

from conftest import png
from faultkit import assert_clean_error, run_forked
from streamsynth.captions import CaptionStoreWriter
from streamsynth.classifier.evaluate import LabelledImageFolder, class_folder_images, real_class_folders
from streamsynth.classifier.models import build_classifier, classifier_checkpoint
from streamsynth.cli import main as cli
from streamsynth.commands.generate import _write_imagefolder
from streamsynth.safeio import UnsafePathError, atomic_write_text, open_append
from streamsynth.stream.real import folder_fingerprint
from streamsynth.stream.sampling import SampleSpec

A, B, C = "n01440764", "n02102040", "n02979186"
UNSAFE = ["../escape", "/tmp/absolute", "..", "a/b", "tab\there", ""]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the output folder, with a file that must stay as it is."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


def _untouched(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["precious.txt"] and \
        (outside / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------- class ids where they come in


@pytest.mark.parametrize("class_id", [*UNSAFE[:-1], 3, ["x"]])
def test_an_import_refuses_a_class_id_that_is_not_a_folder_name(tmp_path, class_id):
    source = tmp_path / "c.jsonl"
    source.write_text(json.dumps({"class": "ok", "caption": "fine"}) + "\n"
                      + json.dumps({"class": class_id, "caption": "a caption"}) + "\n")
    result = run_forked(lambda: cli(["captions", "import", str(source), "--out", str(tmp_path / "c.lmdb")]))
    words = ["c.jsonl:2:", "must be text"] if not isinstance(class_id, str) else ["c.jsonl:2:", "class id"]
    assert_clean_error(result, *words, status=2)
    assert not (tmp_path / "c.lmdb").exists() and not (tmp_path / "escape").exists()


def test_an_import_refuses_captions_and_names_that_are_not_text(tmp_path):
    source = tmp_path / "c.jsonl"
    source.write_text(json.dumps({"class": "n01440764", "caption": 42}) + "\n")
    result = run_forked(lambda: cli(["captions", "import", str(source), "--out", str(tmp_path / "c.lmdb")]))
    assert_clean_error(result, "c.jsonl:1:", "field 'caption' must be text, not int", status=2)
    source.write_text(json.dumps({"class": "n01440764", "caption": "a fish"}) + "\n")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01440764": None}))
    result = run_forked(lambda: cli(["captions", "import", str(source), "--out", str(tmp_path / "c.lmdb"),
                                     "--names", str(names)]))
    assert_clean_error(result, "names.json", "the name of class 'n01440764' is null", status=2)
    assert not (tmp_path / "c.lmdb").exists()


def test_the_store_writer_refuses_unsafe_class_ids_and_names(tmp_path):
    for class_id in UNSAFE:
        with pytest.raises(UnsafePathError, match="cannot write caption store .*class id"):
            CaptionStoreWriter(tmp_path / "c.lmdb", [("ok", "ok"), (class_id, "x")], "test")
    with pytest.raises(ValueError, match="the name of class ok is None"):
        CaptionStoreWriter(tmp_path / "c.lmdb", [("ok", None)], "test")
    assert not (tmp_path / "c.lmdb").exists()


def test_caption_skips_shard_samples_whose_class_is_a_path(tmp_path, stub_captioner):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "train-000000.tar")) as sink:
        for n, cls in enumerate(["0", "../../escape", "1", "/tmp/absolute"]):
            sink.write({"__key__": f"s{n}", "png": png(n, (20, 20)), "cls": cls})
    out = tmp_path / "c.lmdb"
    assert cli(["caption", "--images", str(shards), "--out", str(out), "--captioner", "stub", "--device", "cpu",
                "--workers", "0", "--no-progress"]) == 0
    report = json.loads((tmp_path / "c.lmdb.report.json").read_text())
    assert report["captions_in_store"] == 2
    assert {s["key"] for s in report["skipped"]} == {"train-000000.tar/s1", "train-000000.tar/s3"}
    assert not (tmp_path / "escape").exists()


def _specs(labels: list[int]) -> list[SampleSpec]:
    return [SampleSpec(i, label, 0, "c", "a photo", i) for i, label in enumerate(labels)]


@pytest.mark.parametrize("class_id", UNSAFE)
def test_an_image_folder_is_never_written_outside_out(tmp_path, class_id):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafePathError, match="class id"):
        _write_imagefolder(out, ["ok", class_id], _specs([0, 1]), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "png",
                           out / "metadata.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(out.rglob("*.png"))


def test_an_image_folder_written_through_a_link_is_refused(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ok").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        _write_imagefolder(out, ["ok"], _specs([0]), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "png",
                           out / "metadata.jsonl")
    assert _untouched(outside)


# ---------------------------------------------------------------- symbolic links at destinations


def test_results_replace_links_instead_of_writing_through_them(tmp_path, outside):
    """eval.json a link to a file outside, and a link where its temporary file goes: neither target is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").symlink_to(outside / "precious.txt")
    (out / ".eval.csv.tmp").symlink_to(outside / "planted.txt")
    atomic_write_text(out / "eval.json", "{}\n")
    atomic_write_text(out / "eval.csv", "a\n")
    assert _untouched(outside)
    assert not (out / "eval.json").is_symlink() and (out / "eval.json").read_text() == "{}\n"
    assert (out / "eval.csv").read_text() == "a\n" and not (out / ".eval.csv.tmp").exists()


def test_a_log_that_is_a_link_is_refused(tmp_path, outside):
    (tmp_path / "log.csv").symlink_to(outside / "precious.txt")
    with pytest.raises(UnsafePathError, match="log .*log.csv is a symbolic link"):
        open_append(tmp_path / "log.csv")
    with open_append(tmp_path / "new.csv") as log:
        log.write("step,loss\n")
    assert _untouched(outside) and (tmp_path / "new.csv").read_text() == "step,loss\n"


@pytest.mark.parametrize("name", ["data.mdb", "lock.mdb", "writer.lock"])
def test_a_store_file_that_is_a_link_is_refused(tmp_path, outside, name):
    out = tmp_path / "c.lmdb"
    out.mkdir()
    (out / name).symlink_to(outside / "precious.txt")
    with pytest.raises(UnsafePathError, match=f"{name} is a symbolic link"):
        CaptionStoreWriter(out, [("a", "a")], "test", resume=True)
    assert _untouched(outside)


# ---------------------------------------------------------------- reading image folders


def _tree(root: Path, per_class: int = 10) -> Path:
    for c, cls in enumerate((A, B, C)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{i}.png").write_bytes(png(10 * c + i, (24, 24)))
    return root


def test_caption_does_not_follow_links_out_of_the_images(tmp_path, image_tree, stub_captioner, outside):
    root = image_tree(tmp_path / "images", {f"{A}/1.png": 1, f"{B}/2.png": 2})
    (outside / "secret.png").write_bytes(png(9))
    (root / C).symlink_to(outside)  # a class folder that is a link to elsewhere (the issue's /etc)
    (root / A / "elsewhere").symlink_to(outside)
    (root / A / "stolen.png").symlink_to(outside / "secret.png")
    assert cli(["caption", "--images", str(root), "--out", str(tmp_path / "c.lmdb"), "--captioner", "stub",
                "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    report = json.loads((tmp_path / "c.lmdb.report.json").read_text())
    assert report["captions_in_store"] == 2
    skipped = {s["key"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {f"{A}/elsewhere", f"{A}/stolen.png"}
    assert all("outside" in reason and "not followed" in reason for reason in skipped.values())
    [empty] = report["empty_classes"]
    assert empty["id"] == C and "outside" in empty["reason"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(classifier_checkpoint(build_classifier("squeezenet1_1", 3), "squeezenet1_1", [A, B, C],
                                     image_size=32), path)
    return path


def _evaluate(checkpoint: Path, val: Path, out: Path) -> dict:
    assert cli(["evaluate", str(checkpoint), "--imagenet-val", str(val), "--out", str(out), "--workers", "0",
                "--device", "cpu"]) == 0
    [result] = json.loads((out / "eval.json").read_text())["results"]
    return result


def test_an_evaluation_folder_with_a_loop_scores_each_image_once(tmp_path, checkpoint):
    """The issue's case: a link to its own class folder made 30 images score as 1,230."""
    val = _tree(tmp_path / "val")
    (val / B / "again").symlink_to(".")
    (val / C / "up").symlink_to("..")
    (val / A / "copy.png").symlink_to("0.png")
    assert _evaluate(checkpoint, val, tmp_path / "out")["images"] == 30


def test_an_evaluation_folder_does_not_follow_links_out_of_it(tmp_path, checkpoint, outside, caplog):
    val = _tree(tmp_path / "val")
    (outside / "x.png").write_bytes(png(99, (24, 24)))
    (val / A / "elsewhere").symlink_to(outside)
    (val / A / "x.png").symlink_to(outside / "x.png")
    (val / B / "a-class").symlink_to(f"../{A}")  # into another class's folder: would score A's images as B
    assert _evaluate(checkpoint, val, tmp_path / "out")["images"] == 30
    assert "3 files left out" in caplog.text and "outside" in caplog.text and "another class's folder" in caplog.text


def test_a_class_folder_linked_out_of_the_evaluation_folder_is_one_line(tmp_path, checkpoint, outside, capsys):
    val = _tree(tmp_path / "val")
    (outside / "x.png").write_bytes(png(99, (24, 24)))
    for p in (val / C).iterdir():
        p.unlink()
    (val / C).rmdir()
    (val / C).symlink_to(outside)
    assert cli(["evaluate", str(checkpoint), "--imagenet-val", str(val), "--out", str(tmp_path / "out"), "--workers",
                "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read class folder {C} (a symbolic link to {outside}, outside" in err and "Traceback" not in err


def test_a_file_name_that_is_not_utf8_is_named_and_the_rest_scored(tmp_path, checkpoint, caplog):
    val = _tree(tmp_path / "val")
    (val / A / os.fsdecode(b"caf\xe9.png")).write_bytes(png(5, (24, 24)))
    assert _evaluate(checkpoint, val, tmp_path / "out")["images"] == 30
    assert f"{A}/caf\\xe9.png: its name is not UTF-8 text" in caplog.text


def test_a_train_dir_with_a_loop_and_a_name_that_is_not_utf8(tmp_path):
    """--train-dir is read by the same class: each image once, and the folder's fingerprint can be taken."""
    root = _tree(tmp_path / "train", per_class=2)
    (root / A / "loop").symlink_to("..")
    (root / B / os.fsdecode(b"\xff.png")).write_bytes(png(1, (24, 24)))
    images = LabelledImageFolder(root, {A: 0, B: 1, C: 2})
    assert len(images.samples) == 6 and len(images.skipped) == 2
    assert folder_fingerprint(images)["images"] == 6
    listing = class_folder_images(root, B, real_class_folders(root, [A, B, C]))
    assert [Path(p).name for p in listing.files] == ["0.png", "1.png"]
