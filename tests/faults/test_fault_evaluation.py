"""Evaluation and the privacy audit on faulty folders: a corrupt image is skipped, counted and named; a folder that
cannot be scored is an error before any scoring; results are written all or nothing."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import png
from faultkit import fill, on_small_fs, unreadable
from streamsynth.classifier.models import build_classifier, classifier_checkpoint
from streamsynth.cli import main as cli
from streamsynth.errors import DiskFullError
from streamsynth.classifier.evaluate import EvalFolderError, SuiteResult, check_eval_folder, write_results

CLASSES = ["n01440764", "n02102040", "n02979186"]
BAD = {
    "zero-bytes.png": b"",
    "truncated.png": png(7, (64, 64))[:300],
    "random.jpg": random.Random(3).randbytes(3000),
    "text.jpeg": b"this is not an image" * 20,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(classifier_checkpoint(build_classifier("squeezenet1_1", 3), "squeezenet1_1", CLASSES, image_size=32),
               path)
    return path


def _val(root: Path, bad: dict[str, bytes] | None = None, good: int = 2) -> Path:
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(good):
            (root / cls / f"{i}.png").write_bytes(png(10 * c + i, (40, 40)))
    for name, data in (bad or {}).items():
        (root / CLASSES[0] / name).write_bytes(data)
    return root


def _evaluate(checkpoint: Path, val: Path, out: Path, *extra: str) -> int:
    return cli(["evaluate", str(checkpoint), "--imagenet-val", str(val), "--out", str(out), "--workers", "0",
                "--device", "cpu", "--batch-size", "4", *extra])


def test_corrupt_images_are_skipped_counted_and_named(tmp_path, checkpoint, capsys, caplog):
    val = _val(tmp_path / "val", BAD)
    assert _evaluate(checkpoint, val, tmp_path / "results") == 0
    printed = capsys.readouterr().out
    assert "4 unreadable images skipped" in printed
    [result] = json.loads((tmp_path / "results" / "eval.json").read_text())["results"]
    assert result["images"] == 6 and len(result["unreadable"]) == 4
    assert {Path(entry.split(": ")[0]).name for entry in result["unreadable"]} == set(BAD)
    assert next(csv.DictReader((tmp_path / "results" / "eval.csv").open()))["unreadable_images"] == "4"
    assert "images skipped because they cannot be used" in caplog.text


def test_an_unreadable_image_file_is_skipped(tmp_path, checkpoint):
    val = _val(tmp_path / "val")
    with unreadable(val / CLASSES[1] / "0.png"):
        assert _evaluate(checkpoint, val, tmp_path / "results") == 0
    [result] = json.loads((tmp_path / "results" / "eval.json").read_text())["results"]
    assert result["images"] == 5 and "Permission denied" in result["unreadable"][0]


def test_a_suite_whose_every_image_is_corrupt_scores_nothing_but_ends(tmp_path, checkpoint, capsys):
    val = tmp_path / "val"
    for cls in CLASSES:
        (val / cls).mkdir(parents=True)
        (val / cls / "x.png").write_bytes(b"garbage")
    assert _evaluate(checkpoint, val, tmp_path / "results") == 0
    [result] = json.loads((tmp_path / "results" / "eval.json").read_text())["results"]
    assert result["images"] == 0 and result["top1"] is None and len(result["unreadable"]) == 3


@pytest.mark.parametrize("case, words", [
    ("empty-class-folder", ["class folder n02102040 holds no image files"]),
    ("no-known-class", ["none of its 2 class folders", "is a class of the classifier"]),
    ("unreadable-class-folder", ["cannot read class folder n02102040", "Permission denied"]),
    ("a-file-not-a-folder", ["does not exist"]),
    ("no-class-folders", ["has no class sub-folders"]),
])
def test_a_folder_that_cannot_be_scored_is_an_error_before_scoring(tmp_path, checkpoint, capsys, case, words):
    val = tmp_path / "val"
    if case == "empty-class-folder":
        _val(val)
        for p in (val / CLASSES[1]).iterdir():
            p.unlink()
    elif case == "no-known-class":
        (val / "n09999999").mkdir(parents=True)
        (val / "n09999999" / "a.png").write_bytes(png(1))
        (val / "other").mkdir()
        (val / "other" / "b.png").write_bytes(png(2))
    elif case == "a-file-not-a-folder":
        val.write_text("")
    elif case == "no-class-folders":
        val.mkdir()
        (val / "loose.png").write_bytes(png(1))
    else:
        _val(val)
    if case == "unreadable-class-folder":
        with unreadable(val / CLASSES[1]):
            code = _evaluate(checkpoint, val, tmp_path / "results")
    else:
        code = _evaluate(checkpoint, val, tmp_path / "results")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = next(line for line in err.splitlines() if "error:" in line)
    assert all(word in line for word in words), line
    assert not (tmp_path / "results" / "eval.json").exists()


def test_check_eval_folder_subset_suites(tmp_path):
    val = _val(tmp_path / "r")
    with pytest.raises(EvalFolderError, match="none of the classifier's 3 classes is one of the 200 classes imagenet-r"):
        check_eval_folder(val, "imagenet-r", CLASSES)
    assert check_eval_folder(val, "imagenet-val", CLASSES) == {cls: i for i, cls in enumerate(CLASSES)}


def test_the_privacy_audit_survives_corrupt_images(tmp_path, checkpoint, capsys):
    members = _val(tmp_path / "members", {"bad.png": b"\x89PNG broken"})
    non_members = _val(tmp_path / "non", {"zero.jpg": b""})
    out = tmp_path / "audit"
    assert cli(["audit-privacy", str(checkpoint), "--members", str(members), "--non-members", str(non_members),
                "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert "2 unreadable images were left out" in capsys.readouterr().out
    result = json.loads((out / "audit.json").read_text())
    assert result["members"] == 6 and result["non_members"] == 6 and len(result["unreadable"]) == 2


def test_the_privacy_audit_with_no_readable_member_is_one_line(tmp_path, checkpoint, capsys):
    members = tmp_path / "members"
    (members / CLASSES[0]).mkdir(parents=True)
    (members / CLASSES[0] / "x.png").write_bytes(b"")
    non_members = _val(tmp_path / "non")
    assert cli(["audit-privacy", str(checkpoint), "--members", str(members), "--non-members", str(non_members),
                "--workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: no image of the members folder" in err and "Traceback" not in err


def test_results_on_a_full_disk_keep_the_previous_ones(tmp_path):
    result = SuiteResult("imagenet-val", "val", 10, 50.0, 90.0, 5, 3, 3, [], [])

    def child(disk: Path) -> dict:
        write_results([result], disk / "eval", metadata={"run": 1})
        fill(disk)
        try:
            write_results([result], disk / "eval", metadata={"run": 2 * "x" * 10000})
            error = None
        except DiskFullError as err:
            error = str(err)
        kept = json.loads((disk / "eval.json").read_text())["metadata"]
        return {"error": error, "kept": kept, "files": sorted(os.listdir(disk))}

    forked = on_small_fs(256 << 10, child)
    value = forked.value
    assert value is not None, forked.describe()
    assert value["error"] and "no space left on device writing results" in value["error"]
    assert value["kept"] == {"run": 1} and value["files"] == ["eval.csv", "eval.json", "filler"]
