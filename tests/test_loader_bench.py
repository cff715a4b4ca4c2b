"""`streamsynth loader-bench` runs every configuration, the plain diffusers baseline and the in-memory limit in one
run."""

from __future__ import annotations

import json

import pytest

from streamsynth.cli import main as cli


def test_loader_bench_reports_baseline_and_configurations(tmp_path, caption_store, tiny_model, capsys):
    assert cli(["loader-bench", "--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--device",
                "cpu", "--batch-size", "2", "--batches", "2", "--num-inference-steps", "1", "--workers", "1",
                "--replay", "1,2", "--augment", "batched,per-image", "--consumer", "resnet18", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "loader-bench.json").read_text())
    assert (tmp_path / "loader-bench.png").read_bytes()[:4] == b"\x89PNG"
    configs = [r["config"] for r in report["results"]]
    assert configs == ["plain diffusers loop", "limit: in-memory DataLoader, 1 worker(s), per-image",
                       *(f"streamsynth, 1 worker(s), replay {r}, {a}" for r in (1, 2) for a in ("batched", "per-image"))]
    assert all(r["cpu_ms_per_image"] > 0 for r in report["results"])
    assert all(r["images_delivered_per_s"] > 0 and 0 <= r["consumer_wait_share"] <= 1 for r in report["results"])
    assert all(r["peak_memory_bytes"] > 10 * 2**20 and "peak resident set" in r["peak_memory_kind"] for r in report["results"])
    assert report["random_weights"] is True
    printed = capsys.readouterr().out
    assert "plain diffusers loop" in printed and "CPU ms/img" in printed and "RANDOM WEIGHTS" in printed and "peak MiB" in printed


@pytest.mark.parametrize("kind", ["resnet18", "resnet50"])
def test_the_consumer_trains_on_the_benchmark_device(kind):
    """Batches come from the loader on the CPU or, augmented there, on the synthesis device; the consumer's model lives
    on the benchmark's device and takes both (on the H200 its model stayed on the CPU and the first CUDA batch failed).
    The meta device stands in for a GPU: a model left on the CPU fails on meta inputs, and the reverse."""
    import torch

    from streamsynth.benchmarks.loader_bench import _consumer

    consume = _consumer(kind, 3, "meta")
    consume(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    consume(torch.rand(2, 3, 32, 32, device="meta"), torch.tensor([0, 1], device="meta"))
