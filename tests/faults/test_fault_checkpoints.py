"""Checkpoints: a write never loses the previous one (kill -9 at any point, a full disk), a run says before training
whether two fit, and a bad checkpoint on `--resume` or `evaluate` is refused in one line."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest
import torch

from faultkit import fill, kill_me, on_small_fs, random_bytes, run_forked, truncate
from streamsynth import safeio
from streamsynth.classifier.checkpoints import (CheckpointError, check_checkpoint_room, estimate_checkpoint_bytes,
                                     load_resume_checkpoint, save_checkpoint, state_bytes)
from streamsynth.classifier.models import build_classifier, classifier_checkpoint
from streamsynth.cli import main as cli
from streamsynth.errors import DiskFullError

ARCH, CLASSES, SIZE = "squeezenet1_1", ["a", "b", "c"], 32


def _state(step: int = 1, **changes) -> dict:
    torch.manual_seed(step)
    model = build_classifier(ARCH, len(CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
    optimizer.step()  # momentum buffers exist, as in a real checkpoint
    state = classifier_checkpoint(model, ARCH, CLASSES, image_size=SIZE, step=step, optimizer=optimizer.state_dict(),
                                  scaler={}, loaders=[None], sources=[{}])
    state.update(changes)
    return state


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / "checkpoint.pt"
    save_checkpoint(path, _state())
    return path


def _copy(good: Path, tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(good.read_bytes())
    return path


def _load(path: Path, arch=ARCH, size=SIZE, classes=CLASSES, **kwargs) -> dict:
    return load_resume_checkpoint(path, arch, size, classes, **kwargs)


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 600, text
    return text


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case, damage, words", [
    ("empty", lambda p: truncate(p, 0), ["empty (0 bytes)"]),
    ("cut-100-bytes", lambda p: truncate(p, 100), ["damaged", "truncated"]),
    ("cut-half", lambda p: truncate(p, 0.5), ["damaged", "truncated"]),
    ("cut-last-bytes", lambda p: truncate(p, p.stat().st_size - 10), ["damaged"]),
    ("random-bytes", lambda p: random_bytes(p, 50000), ["damaged"]),
    ("a-pickle-that-runs-code", lambda p: p.write_bytes(pickle.dumps({"model": Evil()})), ["refusing to load"]),
    ("a-tensor-not-a-dict", lambda p: torch.save(torch.zeros(3), p), ["holds a Tensor"]),
    ("missing-fields", lambda p: torch.save({"model": {}, "arch": ARCH}, p), ["lacks the fields", "num_classes"]),
    ("other-arch", lambda p: torch.save(_state(arch="resnet18"), p), ["'resnet18' classifier", f"--model {ARCH!r}"]),
    ("other-image-size", lambda p: torch.save(_state(image_size=64), p), ["--image-size 64", f"asks for {SIZE}"]),
    ("other-classes", lambda p: torch.save(_state(class_ids=["a", "b"], num_classes=2), p), ["it has 2 classes, this run's data 3"]),
    ("renamed-class", lambda p: torch.save(_state(class_ids=["a", "x", "c"]), p), ["label 1 is 'x'"]),
    ("other-optimizer", lambda p: torch.save(_state(optimizer={"state": {}, "param_groups": []}), p),
     ["optimizer state does not fit"]),
])
def test_a_bad_checkpoint_is_refused_in_one_line(tmp_path, good, case, damage, words):
    path = _copy(good, tmp_path)
    damage(path)
    model = build_classifier(ARCH, len(CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError) as caught:
        _load(path, model=model, optimizer=optimizer)
    message = _one_line(caught.value)
    for word in [str(path), *words]:
        assert word in message, message


def test_weights_of_another_model_are_summarised_not_listed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _state()
    state["model"] = build_classifier("resnet18", 3).state_dict()  # arch field says squeezenet, weights are not
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="are missing .*not the model's") as caught:
        _load(path, model=build_classifier(ARCH, 3))
    _one_line(caught.value)


@pytest.mark.parametrize("damage", ["truncated", "random-bytes"])
def test_evaluate_and_audit_name_a_bad_checkpoint(tmp_path, good, capsys, damage):
    path = _copy(good, tmp_path)
    truncate(path, 0.3) if damage == "truncated" else random_bytes(path, 10000)
    (tmp_path / "val" / "a").mkdir(parents=True)
    for argv in (["evaluate", str(path), "--suite", f"x={tmp_path / 'val'}"],
                 ["audit-privacy", str(path), "--members", str(tmp_path / "val"), "--non-members",
                  str(tmp_path / "val")]):
        assert cli([*argv, "--workers", "0", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "error: checkpoint" in err and "damaged" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("point", ["first-write", "mid-write", "before-rename", "after-rename"])
def test_kill_9_during_a_checkpoint_write_keeps_a_whole_checkpoint(tmp_path, good, monkeypatch, point):
    path = _copy(good, tmp_path)
    writes = []

    def write_then_die(self, data, original=safeio._TrackedFile.write):
        n = original(self, data)
        writes.append(len(data))
        if (point == "first-write" and len(writes) == 1) or (point == "mid-write" and sum(writes) > 1 << 20):
            kill_me()
        return n

    def replace_then_die(src, dst, original=os.replace):
        if point == "before-rename":
            kill_me()
        original(src, dst)
        kill_me()

    new = _state(step=2)
    monkeypatch.setattr(safeio._TrackedFile, "write", write_then_die)
    monkeypatch.setattr(safeio.os, "replace", replace_then_die)
    result = run_forked(lambda: save_checkpoint(path, new) and 0)
    assert result.signal == signal.SIGKILL, result.describe()
    monkeypatch.undo()
    step = _load(path)["step"]
    assert step == (2 if point == "after-rename" else 1)  # the old one, or the whole new one: never a partial one
    save_checkpoint(path, _state(step=3))  # the leftover temporary file is replaced, not an obstacle
    assert _load(path)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_a_full_disk_keeps_the_previous_checkpoint_and_resume_works(tmp_path):
    state1, state2 = _state(step=1), _state(step=2)
    size = state_bytes(state2)

    def child(disk: Path) -> dict:
        path = disk / "checkpoint.pt"
        save_checkpoint(path, state1)
        filler = fill(disk, leave=size // 2)  # room for half a checkpoint
        try:
            save_checkpoint(path, state2)
            error = None
        except DiskFullError as err:
            error = str(err)
        left = sorted(os.listdir(disk))
        kept = _load(path)["step"]
        filler.unlink()  # the cause removed: the next checkpoint is written and resumes
        save_checkpoint(path, state2)
        return {"error": error, "left": left, "kept": kept, "after": _load(path)["step"]}

    result = on_small_fs(3 * size + (2 << 20), child)
    value = result.value
    assert value is not None, result.describe()
    assert value["error"] and "\n" not in value["error"]
    assert "no space left on device writing checkpoint" in value["error"]
    assert "the previous checkpoint" in value["error"] and "is intact" in value["error"] and "--resume" in value["error"]
    assert value["left"] == ["checkpoint.pt", "filler"]  # no partial file keeps the space
    assert value["kept"] == 1 and value["after"] == 2


def test_room_for_two_checkpoints_is_checked_before_training(tmp_path):
    model = build_classifier(ARCH, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    estimate = estimate_checkpoint_bytes(model, optimizer)
    state = _state()

    def fresh(disk: Path) -> dict:
        try:
            check_checkpoint_room(disk / "checkpoint.pt", model, optimizer)
        except DiskFullError as err:
            return {"error": str(err)}
        return {}

    result = on_small_fs(int(1.5 * estimate), fresh)
    assert result.value and "not enough space for checkpoints" in result.value["error"], result.describe()
    assert "MiB free, this run needs" in result.value["error"] and "\n" not in result.value["error"]

    def resumed(disk: Path) -> dict:
        save_checkpoint(disk / "checkpoint.pt", state)  # the previous run's checkpoint is there
        check_checkpoint_room(disk / "checkpoint.pt", model, optimizer)  # it counts toward the pair: enough room
        fill(disk, leave=estimate // 2)
        try:
            check_checkpoint_room(disk / "checkpoint.pt", model, optimizer)
        except DiskFullError as err:
            return {"error": str(err)}
        return {}

    result = on_small_fs(int(2.3 * estimate), resumed)
    assert result.value and "not enough space for checkpoints" in result.value["error"], result.describe()
