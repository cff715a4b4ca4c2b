"""train.py under torchrun (gloo, CPU), killed and resumed, and the privacy promise of online mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--steps", "6", "--batch-size", "2", "--image-size", "16", "--arch", "resnet18",
            "--num-inference-steps", "2", "--synth-batch-size", "2", "--log-sample-ids", "--log-every", "1"]
# Signatures long enough not to occur by chance inside model weights, searched anywhere in a file ...
EMBEDDED_IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"JFIF\x00": "JPEG", b"Exif\x00\x00": "JPEG",
                             b"WEBPVP8": "WebP", b"GIF89a": "GIF", b"GIF87a": "GIF"}
# ... and short ones that mark an image file when they open it.
IMAGE_FILE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


def _env(cache: Path, **extra) -> dict:
    return {**os.environ, "STREAMSYNTH_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def _read_ids(path: Path) -> dict[int, list[int]]:
    """step → sample ids; a step logged twice (before a kill and after the resume) keeps its last record."""
    steps = {}
    for line in path.read_text().splitlines():
        step, ids = line.split(",")
        steps[int(step)] = [int(i) for i in ids.split()]
    return steps


@pytest.mark.slow
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, isolated_cache, caption_store, tiny_model):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), "--online-synthesis", "--sd-model", str(tiny_model),
               "--captions", str(caption_store.path), "--workers", "2", "--out", str(out), *TINY_RUN]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ids = [i for rank in (0, 1) for batch in _read_ids(out / f"sample_ids-rank{rank}.csv").values() for i in batch]
    assert sorted(ids) == list(range(2 * 6 * 2))  # 2 ranks x 6 steps x batch 2: no duplicate, no gap


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_samples(tmp_path, isolated_cache, caption_store, tiny_model):
    common = ["--online-synthesis", "--sd-model", str(tiny_model), "--captions", str(caption_store.path),
              "--workers", "2", "--checkpoint-every", "1", *TINY_RUN]
    steps = ["--steps", "10"]
    reference = tmp_path / "reference"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *steps, "--out", str(reference)],
                            capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    run = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, *steps, "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(isolated_cache),
                               start_new_session=True)
    ids_log = run / "sample_ids-rank0.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (ids_log.exists() and len(ids_log.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and its synthesis workers, mid-run
    process.wait()
    assert (run / "checkpoint.pt").exists()

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *steps, "--out", str(run), "--resume"],
                            capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout
    assert _read_ids(ids_log) == _read_ids(reference / "sample_ids-rank0.csv")


def _files(*folders: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}


def test_online_run_writes_no_image_bytes(tmp_path, caption_store, tiny_model):
    work, temp, cache = tmp_path / "work", tmp_path / "tmp", tmp_path / "cache"
    for folder in (work, temp, cache):
        folder.mkdir()
    before = _files(work, temp, cache)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--online-synthesis", "--workers", "2", "--out", "run", *TINY_RUN],
        cwd=work, capture_output=True, text=True, env=_env(cache, TMPDIR=str(temp)), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    created = {p for p, mtime in _files(work, temp, cache).items() if before.get(p) != mtime}
    assert created, "the run should have written its checkpoint and logs"
    assert any(p.name == "checkpoint.pt" for p in created)
    for path in created:
        assert path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".npy", ".tar"}
        data = path.read_bytes()
        for signature, kind in EMBEDDED_IMAGE_SIGNATURES.items():
            assert signature not in data, f"{path} holds {kind} image bytes"
        for magic, kind in IMAGE_FILE_MAGIC.items():
            assert not data.startswith(magic), f"{path} is a {kind} image"
