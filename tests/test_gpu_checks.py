"""benchmarks/gpu_checks.sh, the prepared GPU session, runs end to end in its CPU dry mode (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_checks_dry_run_completes_every_step(tmp_path):
    env = {**os.environ, "DRY": "1", "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "all", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [(name, status) for name, status, _ in steps] == [
        ("train-e2e", "0"), ("train-e2e-ids", "0"), ("caption-e2e-build", "0"), ("caption-e2e", "0"),
        ("kernel-bench", "0"), ("profile-eager", "0"), ("profile-compiled", "0"), ("profile-compiled-no-kernels", "0"),
        ("profile-cuda-graphs", "0"), ("caption-jpegs", "0"), ("caption-bench", "0"), ("caption-bench-static", "0"),
        ("loader-bench", "0"), ("loader-ceiling", "0"),
        ("speed-levers", "0"),
    ]
    # The trainer's loop lost a synthesis worker to SIGKILL inside backward() and still saw every sample id once.
    assert "injected SIGKILL" in (tmp_path / "train-e2e.log").read_text()
    assert ", 32 distinct, repeated: []" in (tmp_path / "train-e2e-ids.log").read_text()
    assert "wrote 64 captions of 4 classes" in (tmp_path / "caption-e2e.log").read_text()
    assert json.loads((tmp_path / "profile-eager" / "profile.json").read_text())["ablation"]
    assert "--no-kernels: the fast path ran without" in (tmp_path / "profile-compiled-no-kernels.log").read_text()
    assert len(json.loads((tmp_path / "kernel-bench" / "kernel-bench.json").read_text())["results"]) == 14
    static = tmp_path / "caption-bench-static" / "caption-bench.json"
    assert json.loads(static.read_text())["streamsynth"]["kv_cache"] == "static"
    assert json.loads((tmp_path / "caption-bench" / "caption-bench.json").read_text())["streamsynth_runs"]
    assert (tmp_path / "loader-bench" / "loader-bench.json").is_file()
    levers = json.loads((tmp_path / "speed-levers" / "speed-levers.json").read_text())["levers"]
    assert [row["lever"] for row in levers] == ["reference", "fast", "deepcache 3"]
    assert "python" in (tmp_path / "environment.txt").read_text()


def test_gpu_checks_only_runs_the_named_steps(tmp_path):
    """ONLY="a b" picks steps out of a group: a device session spends its minutes on just those."""
    env = {**os.environ, "DRY": "1", "PYTHON": sys.executable, "ONLY": "nothing-by-this-name"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "loop", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== loader-bench: skipped" in result.stdout and "== loader-ceiling: skipped" in result.stdout
    assert not (tmp_path / "steps.tsv").exists()
