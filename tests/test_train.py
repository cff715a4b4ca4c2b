"""train.py end to end, as a user runs it: a subprocess, the embedded default, a checkpoint, a real val folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _train(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMSYNTH_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--online-synthesis", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_default_main_job(tmp_path, isolated_cache):
    """The README's main job, unchanged: embedded model and captions, default settings."""
    result = _train("--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM WEIGHTS" in result.stderr
    assert "train: 100%" in result.stderr and "20/20" in result.stderr
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 20 and checkpoint["num_classes"] == 10 and checkpoint["arch"] == "resnet18"
    assert checkpoint["stream"]["random_weights"] is True
    log_lines = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log_lines[0].startswith("step,loss") and len(log_lines) == 3


def _val_folder(root: Path, class_ids: list[str]) -> Path:
    rng = np.random.default_rng(0)
    for cid in class_ids:
        (root / cid).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cid / f"{i}.png")
    return root


def test_val_dir_top1(tmp_path, isolated_cache, caption_store, tiny_model):
    val = _val_folder(tmp_path / "val", [c.id for c in caption_store.classes][:4])
    result = _train("--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--val-dir", str(val),
                    "--steps", "3", "--batch-size", "4", "--image-size", "32", "--arch", "resnet18",
                    "--workers", "0", "--num-inference-steps", "2", "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val top-1:" in result.stdout and "on 8 images" in result.stdout
    assert (tmp_path / "run" / "results.json").is_file()


def test_val_dir_with_unknown_classes_is_refused(tmp_path, isolated_cache, caption_store, tiny_model):
    val = _val_folder(tmp_path / "val", ["n99999999"])
    result = _train("--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--val-dir", str(val),
                    "--steps", "1", "--batch-size", "2", "--image-size", "16", "--arch", "resnet18",
                    "--workers", "0", "--num-inference-steps", "1", "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode != 0 and "not classes of the caption store" in result.stderr
