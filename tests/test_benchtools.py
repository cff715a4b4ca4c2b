"""The benchmarks' toolkit: one peak-memory measure, timing, the environment, reports; and that every benchmark
measures with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamsynth.benchmarks import benchtools

ROOT = Path(__file__).resolve().parents[1]


_PEAK_CHECK = """
import torch
from streamsynth.benchmarks import benchtools

benchtools.reset_peak_memory("cpu")
before = benchtools.peak_memory("cpu")
assert before.bytes > 0 and "peak resident set" in before.kind and "since the last reset" in before.kind
block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
grown = benchtools.peak_memory_bytes("cpu")
del block
assert grown >= before.bytes + 48 * 2**20, (before.bytes, grown)
benchtools.reset_peak_memory("cpu")
assert benchtools.peak_memory_bytes("cpu") < grown  # the peak starts again from what is resident now
assert benchtools.peak_memory("cpu").as_dict().keys() == {"peak_memory_bytes", "peak_memory_kind"}
"""


def test_cpu_peak_memory_is_reset_and_labelled():
    # In a fresh process: after hundreds of tests this one's memory may hold freed pages that the 64 MiB reuses.
    result = subprocess.run([sys.executable, "-c", _PEAK_CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max_memory_reserved" in benchtools.peak_memory_kind("cuda")  # named without touching a GPU


def test_timer_measure_and_stage_clock():
    with benchtools.Timer("cpu") as timer:
        time.sleep(0.02)
    assert 0.015 < timer.seconds < 1
    with pytest.raises(ValueError, match="CUDA events"):
        benchtools.Timer("cpu", clock="events")
    calls = []
    measured = benchtools.measure(lambda: calls.append(1) or len(calls), "cpu", warmup=2, repeats=3)
    assert len(calls) == 5 and measured.results == [3, 4, 5] and len(measured.seconds) == 3
    assert measured.median_s >= 0 and measured.peak_memory.bytes > 0
    slow_first = benchtools.measure(lambda: time.sleep(0.03), "cpu", warmup=1, repeats=1)
    assert slow_first.warmup_s >= 0.025  # where a compiled model's compilation shows
    clock = benchtools.StageClock("cpu", ("a", "b"))
    time.sleep(0.01)
    clock.mark("a")
    clock.mark("b")
    clock.mark("a")
    seconds = clock.seconds()
    assert set(seconds) == {"a", "b"} and seconds["a"] >= 0.009
    with pytest.raises(ValueError, match="unknown stage"):
        clock.mark("c")


def test_environment_and_reports(tmp_path):
    env = benchtools.environment("cpu")
    assert env["device"].startswith("cpu (") and env["cpu_count"] >= 1 and env["python"]
    assert {"torch", "triton", "diffusers", "transformers"} <= set(env["packages"])
    assert env["packages"]["torch"] == torch.__version__
    path = benchtools.write_json(tmp_path / "deep" / "report.json", {"device": torch.device("cpu"), "env": env})
    assert json.loads(path.read_text())["device"] == "cpu"
    chart = benchtools.bar_chart(tmp_path / "chart.png", ["baseline", "fast"], [1.0, 2.0], "images/s", "a title")
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_every_benchmark_measures_with_the_toolkit():
    benchmarks = ["streamsynth/benchmarks/profile.py", "streamsynth/benchmarks/loader_bench.py",
                  "streamsynth/benchmarks/caption_bench.py", "streamsynth/benchmarks/kernel_bench.py"]
    for path in benchmarks:
        assert "benchtools" in (ROOT / path).read_text(), path
    # One definition of peak memory, device names and timing loops: nothing else asks torch for them.
    own = re.compile(r"max_memory_(allocated|reserved)|reset_peak_memory_stats|ru_maxrss|VmHWM|get_device_name|"
                     r"cuda\.Event")
    elsewhere = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "streamsynth").rglob("*.py")
                 if p.name not in ("benchtools.py", "peakmemory.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if own.search(line)]
    assert elsewhere == []


def test_the_environment_command_prints_json(capsys, tmp_path):
    assert benchtools.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["device"].startswith("cpu")
    assert json.loads((tmp_path / "environment.json").read_text())["device"].startswith("cpu")
