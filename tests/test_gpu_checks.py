"""benchmarks/gpu_checks.sh, the prepared GPU session, runs end to end in its CPU dry mode (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# ONLY= leaves out the steps whose CPU run repeats another's with other sizes, which also tests ONLY: the CUDA-graphs
# profile (the fast path skips CUDA graphs off a GPU, and the CPU never compiles: the compiled profile's run), the
# compiled profile without kernels (on the CPU the kernels' references run either way: the compiled profile's run
# again), the static-cache caption-bench (tests/test_captioning.py runs every cache) and the loader ceiling
# (loader-bench again; tests/test_loader_bench.py runs both augmentations).
SKIPPED = ["profile-cuda-graphs", "profile-compiled-no-kernels", "caption-bench-static", "loader-ceiling"]
STEPS = ["train-e2e", "train-e2e-ids", "caption-e2e-build", "caption-e2e", "kernel-bench", "profile-eager",
         "profile-compiled", "caption-jpegs", "caption-bench", "loader-bench", "speed-levers", "family-bench"]


@pytest.mark.slow
def test_gpu_checks_dry_run_completes_every_step(tmp_path):
    env = {**os.environ, "DRY": "1", "PYTHON": sys.executable, "ONLY": " ".join(STEPS)}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "all", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [(name, status) for name, status, _ in steps] == [(name, "0") for name in STEPS]
    assert all(f"== {name}: skipped" in result.stdout for name in SKIPPED)
    # The trainer's loop lost a synthesis worker to SIGKILL inside backward() and still saw every sample id once.
    assert "injected SIGKILL" in (tmp_path / "train-e2e.log").read_text()
    assert ", 32 distinct, repeated: []" in (tmp_path / "train-e2e-ids.log").read_text()
    assert "wrote 64 captions of 4 classes" in (tmp_path / "caption-e2e.log").read_text()
    assert json.loads((tmp_path / "profile-eager" / "profile.json").read_text())["ablation"]
    assert len(json.loads((tmp_path / "kernel-bench" / "kernel-bench.json").read_text())["results"]) == 14
    assert json.loads((tmp_path / "caption-bench" / "caption-bench.json").read_text())["streamsynth_runs"]
    assert (tmp_path / "loader-bench" / "loader-bench.json").is_file()
    levers = json.loads((tmp_path / "speed-levers" / "speed-levers.json").read_text())["levers"]
    assert [row["lever"] for row in levers] == ["reference", "fast", "deepcache 3"]
    # Every registered family, streamsynth's images equal its diffusers pipeline's.
    from streamsynth.synth.families import FAMILIES

    families = json.loads((tmp_path / "family-bench" / "families.json").read_text())["families"]
    assert {row["key"] for row in families} == {family.key for family in FAMILIES.values()}
    assert all(row["max_abs_difference"]["streamsynth"] <= 1e-4 for row in families)
    assert "python" in (tmp_path / "environment.txt").read_text()

