"""Synthesis workers killed or stopped while train.py is in backward() or writing a checkpoint: the run finishes,
sees every sample once, and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# --worker-timeout: how long the stopped worker goes unnoticed. A healthy worker beats every second while its model
# loads and after each group (a fraction of a second at these sizes), so 8 s leaves it room on a loaded machine.
RUN = ["--online-synthesis", "--steps", "8", "--batch-size", "4", "--image-size", "16", "--model", "resnet18",
       "--num-inference-steps", "1", "--synth-batch-size", "4", "--workers", "2", "--checkpoint-every", "4",
       "--log-sample-ids", "--worker-timeout", "8"]


def _train(out: Path, cache: Path, models: list[str], *fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMSYNTH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = ([sys.executable, str(ROOT / "tests" / "inject_faults.py"), *fault, "--"] if fault
               else [sys.executable, str(ROOT / "train.py")])
    return subprocess.run([*command, *RUN, *models, "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)


def _sample_ids(out: Path) -> list[int]:
    return [int(i) for line in (out / "sample_ids-rank0.csv").read_text().splitlines() for i in line.split(",")[3].split()]


@pytest.fixture(scope="module")
def models(caption_store, tiny_model) -> list[str]:
    return ["--sd-model", str(tiny_model), "--captions", str(caption_store.path)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, isolated_cache, models) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _train(out, isolated_cache, models)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fault", [
    ("--fault-during", "backward", "--fault-call", "3", "--fault-signal", "KILL"),
    ("--fault-during", "checkpoint", "--fault-call", "1", "--fault-signal", "KILL"),
    ("--fault-during", "backward", "--fault-call", "2", "--fault-signal", "STOP"),
], ids=["killed-in-backward", "killed-in-checkpoint-write", "stopped"])
def test_a_worker_fault_inside_the_training_loop_is_survived(tmp_path, isolated_cache, models, uninterrupted, fault):
    result = _train(tmp_path, isolated_cache, models, *fault)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "injected SIG" in result.stderr and "restarting them there (restart 1)" in result.stderr
    assert "Traceback" not in result.stderr
    if "STOP" in fault:  # a stopped worker is alive: only the watchdog's timeout can have found it
        assert f"made no progress for {RUN[RUN.index('--worker-timeout') + 1]} s" in result.stderr
    ids = _sample_ids(tmp_path)
    assert sorted(ids) == list(range(32)) and ids == _sample_ids(uninterrupted)  # every id once, in the same order
    mine = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    reference = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    assert mine["step"] == 8
    for name, tensor in reference["model"].items():
        assert torch.allclose(mine["model"][name].float(), tensor.float(), atol=1e-6), name


def test_a_model_that_does_not_load_ends_the_run_at_once_in_one_line(tmp_path, isolated_cache, caption_store,
                                                                     tiny_model):
    """A model folder that passes the early check but fails in the workers: one line, no retry, no traceback."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    for weights in broken.glob("unet/*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    result = _train(tmp_path / "run", isolated_cache, ["--sd-model", str(broken), "--captions",
                                                       str(caption_store.path)])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "ModelLoadError" in errors[0] and str(broken) in errors[0]
    assert "restarting" not in result.stderr
