"""train.py as a user runs it (a subprocess) on faulty input: survived and reported, or one `train.py: error:` line
before training, never a traceback. Each run is small: a cache of a few shards, resnet18 at 16 px, two steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import png
from faultkit import on_small_fs, random_bytes, truncate

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--steps", "2", "--batch-size", "2", "--image-size", "16", "--model", "resnet18", "--workers", "0"]


def _train(*args: str, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMSYNTH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _error_before_training(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode not in (0, None) and result.returncode > 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "train:" not in result.stderr  # the progress bar never started
    line = next(line for line in result.stderr.splitlines() if "error:" in line)
    for word in words:
        assert word in line, line
    return line


@pytest.fixture(scope="module")
def class_ids(isolated_cache) -> list[str]:
    from streamsynth.captions import CaptionStore
    from streamsynth.digits.embedded import embedded_captions

    return [c.id for c in CaptionStore(embedded_captions()).classes]


@pytest.fixture
def val(tmp_path, class_ids) -> Path:
    root = tmp_path / "val"
    for c, cls in enumerate(class_ids[:3]):
        (root / cls).mkdir(parents=True)
        (root / cls / "0.png").write_bytes(png(c, (24, 24)))
    return root


def test_bad_cache_shards_and_a_corrupt_val_image_are_survived(tmp_path, isolated_cache, write_cache, val, class_ids):
    # The classifier takes its classes from the cache: the same as the val folder's.
    cache = write_cache(tmp_path / "cache", [2, 2, 2, 2, 2, 2], class_ids=class_ids)
    shards = sorted(cache.glob("*.tar"))
    random_bytes(shards[0], 5000)
    truncate(shards[1], 0)
    truncate(shards[2], 0.5)
    (val / next(iter(os.listdir(val))) / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = _train("--from-cache", str(cache), "--imagenet-val", str(val), "--eval-every", "1", *SMALL,
                    "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    for shard in shards[:3]:
        assert f"cache shard {shard} is damaged" in result.stderr
    assert "1 images skipped because they cannot be used" in result.stderr and "broken.png" in result.stderr
    [final] = json.loads((tmp_path / "run" / "results-final.json").read_text())["results"]
    assert final["images"] == 3 and len(final["unreadable"]) == 1
    assert (tmp_path / "run" / "results-step1.json").is_file()  # --eval-every survived it too


@pytest.mark.parametrize("case, words", [
    ("no-known-class", ["imagenet-val folder", "is a class of the classifier"]),
    ("empty-class-folder", ["imagenet-val folder", "holds no image files"]),
])
def test_a_val_folder_that_cannot_be_scored_fails_before_training(tmp_path, isolated_cache, write_cache, val, case,
                                                                   words):
    cache = write_cache(tmp_path / "cache", [2, 2])
    if case == "no-known-class":
        for folder in list(val.iterdir()):
            folder.rename(val / f"x{folder.name}")
    else:
        (val / "n03888257").mkdir()  # a class of the store, no images
    result = _train("--from-cache", str(cache), "--imagenet-val", str(val), *SMALL, "--out", str(tmp_path / "run"),
                    cache=isolated_cache)
    _error_before_training(result, *words)


def test_resume_from_a_checkpoint_of_another_arch_is_one_short_line(tmp_path, isolated_cache, write_cache, class_ids):
    cache = write_cache(tmp_path / "cache", [2, 2])
    out = tmp_path / "run"
    out.mkdir()
    from streamsynth.classifier.models import build_classifier, classifier_checkpoint

    torch.save(classifier_checkpoint(build_classifier("resnet34", len(class_ids)), "resnet34", class_ids,
                                     image_size=16, step=1, optimizer={}, scaler={}, loaders=[None]),
               out / "checkpoint.pt")
    result = _train("--from-cache", str(cache), *SMALL, "--out", str(out), "--resume", cache=isolated_cache)
    line = _error_before_training(result, "train.py: error: checkpoint", "'resnet34' classifier", "--model 'resnet18'")
    assert len(line) < 400 and "layer4.2" not in result.stderr


def test_no_room_for_two_checkpoints_is_said_before_training(tmp_path, isolated_cache, write_cache):
    cache = write_cache(tmp_path / "cache", [2, 2])

    def child(disk: Path) -> dict:
        result = _train("--from-cache", str(cache), *SMALL, "--out", str(disk / "run"), cache=isolated_cache)
        return {"code": 0, "returncode": result.returncode, "stderr": result.stderr}

    forked = on_small_fs(60 << 20, child, timeout=300)  # resnet18 with momentum: ~90 MiB a checkpoint
    value = forked.value
    assert value is not None, forked.describe()
    result = subprocess.CompletedProcess([], value["returncode"], "", value["stderr"])
    _error_before_training(result, "not enough space for checkpoints", "needs", "choose another --out")


def test_a_resume_that_changes_the_samples_is_refused_and_the_record_kept(tmp_path, isolated_cache, write_cache,
                                                                         class_ids):
    """`--resume` with another prompt, guidance or seed would make the rest another run: one line naming each change;
    the run's record (run.json) and checkpoint stay as they were. A longer run (more --steps) may continue."""
    cache = write_cache(tmp_path / "cache", [4, 4], class_ids=class_ids)
    out = tmp_path / "run"
    first = _train("--from-cache", str(cache), *SMALL, "--out", str(out), cache=isolated_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    record, saved = (out / "run.json").read_text(), (out / "checkpoint.pt").read_bytes()
    changed = _train("--from-cache", str(cache), *SMALL, "--seed", "1", "--label-smoothing", "0", "--out", str(out),
                     "--resume", cache=isolated_cache)
    line = _error_before_training(changed, "cannot resume", "--seed was 0, now 1", "--label-smoothing was 0.1, now 0")
    assert (out / "run.json").read_text() == record and (out / "checkpoint.pt").read_bytes() == saved, line
    longer = _train("--from-cache", str(cache), *SMALL, "--steps", "3", "--out", str(out), "--resume",
                    cache=isolated_cache)
    assert longer.returncode == 0, longer.stderr[-3000:]
    parts = json.loads((out / "run.json").read_text())["parts"]
    assert [p["first_step"] for p in parts] == [0, 2] and parts[1]["changed"] == {"steps": 3}


def test_a_loss_that_is_no_longer_finite_stops_in_one_line_and_never_saves_it(tmp_path, isolated_cache, write_cache,
                                                                              class_ids):
    """A learning rate that makes the run diverge: one line naming the step and --lr, exit 2, and no checkpoint with
    weights that are not finite (one is written every step, until the step that would not be)."""
    cache = write_cache(tmp_path / "cache", [4, 4], class_ids=class_ids)
    out = tmp_path / "diverged"
    diverged = _train("--from-cache", str(cache), *SMALL, "--steps", "20", "--lr", "1e30", "--log-every", "1",
                      "--checkpoint-every", "1", "--out", str(out), cache=isolated_cache)
    assert diverged.returncode == 2 and "Traceback" not in diverged.stderr, diverged.stderr[-3000:]
    line = diverged.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error:") and ("finite" in line or "loss became" in line) and "--lr" in line, line
    if (out / "checkpoint.pt").exists():
        kept = torch.load(out / "checkpoint.pt", weights_only=True)
        assert kept["step"] < 20 and all(torch.isfinite(v).all() for v in kept["model"].values()
                                         if v.is_floating_point())
