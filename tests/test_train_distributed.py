"""train.py under torchrun (gloo, CPU), killed and resumed (fresh, cached and real batches), and the privacy promise
of online mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--steps", "6", "--batch-size", "2", "--image-size", "16", "--model", "resnet18",
            "--num-inference-steps", "2", "--synth-batch-size", "2", "--log-sample-ids", "--log-every", "1"]
# Signatures long enough not to occur by chance inside model weights, searched anywhere in a file ...
EMBEDDED_IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"JFIF\x00": "JPEG", b"Exif\x00\x00": "JPEG",
                             b"WEBPVP8": "WebP", b"GIF89a": "GIF", b"GIF87a": "GIF"}
# ... and short ones that mark an image file when they open it.
IMAGE_FILE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


def _env(cache: Path, **extra) -> dict:
    return {**os.environ, "STREAMSYNTH_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def _read_ids(path: Path) -> dict[tuple[int, int], tuple[str, list[str]]]:
    """(step, micro-batch) → (source, sample keys); a micro-batch logged twice (before a kill and after the resume)
    keeps its last record."""
    batches = {}
    for line in path.read_text().splitlines():
        step, micro, source, keys = line.split(",")
        batches[int(step), int(micro)] = source, keys.split()
    return batches


# The uninterrupted 1-rank run the elastic resume test compares with (one_rank_reference): 8 steps of 4 images from 2
# synthesis workers, a checkpoint after every step.
ONE_RANK = ["--online-synthesis", "--workers", "2", "--checkpoint-every", "1", *TINY_RUN, "--steps", "8",
            "--batch-size", "4"]


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory, isolated_cache, caption_store, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("one-rank-reference")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *ONE_RANK, "--sd-model", str(tiny_model),
                             "--captions", str(caption_store.path), "--out", str(out)],
                            capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _run_until_killed(command: list[str], ids_log: Path, lines: int, env: dict) -> None:
    """Start train.py, and kill -9 it with its loader workers once `ids_log` holds `lines` micro-batches."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (ids_log.exists() and len(ids_log.read_text().splitlines()) >= lines):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_killed_mixed_run_resumes_every_source_exactly(tmp_path, isolated_cache, caption_store, tiny_model,
                                                        write_cache, write_image_folder):
    """Synthetic, cache and real batches mixed, two micro-batches a step, killed (trainer and workers, SIGKILL) and
    resumed: the same batches and, at the end, the uninterrupted run's weights and optimizer state."""
    class_ids = [c.id for c in caption_store.classes]
    cache = write_cache(tmp_path / "cache", [2] * 8, class_ids=class_ids)
    real = write_image_folder(tmp_path / "train", dict.fromkeys(class_ids[:3], 2))
    command = [sys.executable, str(ROOT / "train.py"), "--online-synthesis", "--from-cache", str(cache),
               "--train-dir", str(real), "--mix", "synthetic=1,cache=2,real=2", "--sd-model", str(tiny_model),
               "--captions", str(caption_store.path), "--accum-steps", "2", "--workers", "1",
               "--checkpoint-every", "1", *TINY_RUN, "--steps", "12"]
    reference = tmp_path / "reference"
    result = subprocess.run([*command, "--out", str(reference)], capture_output=True, text=True,
                            env=_env(isolated_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = _read_ids(reference / "sample_ids-rank0.csv")
    assert len(expected) == 24 and {source for source, _ in expected.values()} == {"synthetic", "cache", "real"}

    run = tmp_path / "killed"
    _run_until_killed([*command, "--out", str(run)], run / "sample_ids-rank0.csv", 8, _env(isolated_cache))
    result = subprocess.run([*command, "--out", str(run), "--resume"], capture_output=True, text=True,
                            env=_env(isolated_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    resumed_at = int(result.stdout.split("resumed from ")[1].split("at step ")[1].split()[0])
    assert 2 <= resumed_at < 12
    assert _read_ids(run / "sample_ids-rank0.csv") == expected
    # ... and ends with the uninterrupted run's weights (and optimizer state): nothing of the model was lost.
    finished, uninterrupted = (torch.load(folder / "checkpoint.pt", weights_only=True) for folder in (run, reference))
    assert finished["step"] == uninterrupted["step"] == 12
    for part in ("model", "optimizer"):
        torch.testing.assert_close(finished[part], uninterrupted[part], rtol=1e-5, atol=1e-6)

    sorted(cache.glob("*.tar"))[3].unlink()  # a shard the checkpoint counted on is gone: no exact resume
    result = subprocess.run([*command, "--out", str(run), "--resume", "--steps", "14"], capture_output=True,
                            text=True, env=_env(isolated_cache), timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "has lost 1 of the shards the checkpoint was written with" in result.stderr
    assert "resume with the same cache folder, or start a new run without --resume" in result.stderr


@pytest.mark.slow
def test_two_ranks_resume_cache_and_real_exactly(tmp_path, isolated_cache, caption_store, tiny_model, write_cache,
                                                 write_image_folder):
    """Under torchrun each rank resumes its own cache and real positions, and the ranks read disjoint cache samples."""
    class_ids = [c.id for c in caption_store.classes]
    cache = write_cache(tmp_path / "cache", [2] * 8, class_ids=class_ids)
    real = write_image_folder(tmp_path / "train", dict.fromkeys(class_ids[:3], 2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), "--from-cache", str(cache), "--train-dir", str(real),
               "--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--workers", "0", *TINY_RUN]
    for out, steps in [("reference", "8"), ("resumed", "4"), ("resumed", "8")]:
        result = subprocess.run([*command, "--steps", steps, "--out", str(tmp_path / out), "--resume"],
                                capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout
    expected = [_read_ids(tmp_path / "reference" / f"sample_ids-rank{rank}.csv") for rank in (0, 1)]
    assert [_read_ids(tmp_path / "resumed" / f"sample_ids-rank{rank}.csv") for rank in (0, 1)] == expected
    cache_keys = [[key for source, keys in batches.values() if source == "cache" for key in keys][:8]
                  for batches in expected]  # at most one pass of 16 samples over both ranks
    assert cache_keys[0] and not set(cache_keys[0]) & set(cache_keys[1])


def _files(*folders: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def short_tmp() -> Path:
    """A folder with a short path, for TMPDIR: the loader's Unix sockets go there, and their paths may not exceed
    107 bytes (tmp_path can be longer, e.g. under pytest-xdist)."""
    with tempfile.TemporaryDirectory(prefix="ss-") as folder:
        yield Path(folder)


def test_online_run_writes_no_image_bytes(tmp_path, short_tmp, caption_store, tiny_model):
    work, temp, cache = tmp_path / "work", short_tmp, tmp_path / "cache"
    for folder in (work, cache):
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
    # One picture is the run's own: curves.png, its loss chart (lines on axes, no pixel of any sample).
    assert (work / "run" / "curves.png") in created
    created.discard(work / "run" / "curves.png")
    for path in created:
        assert path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".npy", ".tar"}
        data = path.read_bytes()
        for signature, kind in EMBEDDED_IMAGE_SIGNATURES.items():
            assert signature not in data, f"{path} holds {kind} image bytes"
        for magic, kind in IMAGE_FILE_MAGIC.items():
            assert not data.startswith(magic), f"{path} is a {kind} image"


@pytest.mark.slow
def test_a_run_resumes_on_another_number_of_ranks_and_workers(tmp_path, isolated_cache, caption_store, tiny_model,
                                                            one_rank_reference):
    """2 ranks x 2 workers (batch 2 each), killed right after the checkpoint at step 4, resumed on 1 rank x 2 workers
    (batch 4): each step's global batch equals the uninterrupted 1-rank run's, so no sample is seen twice or lost."""
    models = ["--sd-model", str(tiny_model), "--captions", str(caption_store.path)]
    run = tmp_path / "elastic"
    two_ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 str(ROOT / "tests" / "inject_faults.py"), "--fault-during", "checkpoint", "--fault-call", "1",
                 "--fault-signal", "SELF-KILL", "--", "--online-synthesis", *models, *TINY_RUN, "--steps", "8",
                 "--batch-size", "2", "--workers", "2", "--checkpoint-every", "4", "--out", str(run)]
    killed = subprocess.run(two_ranks, capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
    assert killed.returncode != 0 and (run / "checkpoint.pt").exists()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *ONE_RANK, *models, "--out", str(run), "--resume"],
                            capture_output=True, text=True, env=_env(isolated_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout and "at step 4" in result.stdout

    ranks = [_read_ids(run / f"sample_ids-rank{rank}.csv") for rank in (0, 1)]
    seen = {step: ranks[0][step, 0][1] + (ranks[1][step, 0][1] if step < 4 else []) for step in range(8)}
    expected = {step: keys for (step, _), (_, keys) in _read_ids(one_rank_reference / "sample_ids-rank0.csv").items()}
    assert seen == expected and sorted(int(i) for keys in seen.values() for i in keys) == list(range(32))
