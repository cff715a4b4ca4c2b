"""Which device each synthesis worker of each rank gets, decided in the worker from the launcher's environment; and
a generator on CUDA under a DataLoader that forked after CUDA was initialised: one line, never a worker traceback."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from streamsynth.stream import devices
from streamsynth.stream.devices import CUDAAfterForkError, rank_devices, synthesis_devices, worker_device


def _on_node(monkeypatch, local_rank: int, local_world: int, gpus: int) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_by_default_each_rank_uses_its_own_gpu(monkeypatch):
    for rank in range(4):
        _on_node(monkeypatch, rank, 4, gpus=4)
        assert {worker_device(None, w) for w in range(3)} == {f"cuda:{rank}"}  # never all on cuda:0
    _on_node(monkeypatch, 0, 1, gpus=0)
    assert worker_device(None, 5) == "cpu"


def test_a_named_list_is_split_among_the_ranks_of_a_node(monkeypatch):
    named = ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    seen = {}
    for rank in range(2):
        _on_node(monkeypatch, rank, 2, gpus=8)
        seen[rank] = [worker_device(named, w) for w in range(4)]
    assert seen == {0: ["cuda:4", "cuda:6", "cuda:4", "cuda:6"], 1: ["cuda:5", "cuda:7", "cuda:5", "cuda:7"]}
    assert rank_devices(["cuda:2"], 1, 2) == ["cuda:2"]  # fewer devices than ranks: shared by all


def test_train_synth_devices_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert synthesis_devices(None, "cuda:1", 2) is None  # each rank's own GPU
    assert synthesis_devices(None, "cpu") == ["cpu"]
    # 2 local ranks train on cuda:0 and cuda:1: "auto" is the 6 others, which the ranks then split.
    assert synthesis_devices("auto", "cuda:0", 2) == [f"cuda:{i}" for i in range(2, 8)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert synthesis_devices("auto", "cuda:0", 1) is None  # one GPU: shared with the trainer
    assert synthesis_devices("cuda:2,cuda:3", "cuda:0", 2) == ["cuda:2", "cuda:3"]
    with pytest.raises(ValueError, match="names no device"):
        synthesis_devices(" , ", "cpu")
    with pytest.raises(RuntimeError):
        synthesis_devices("gpu:0", "cpu")


def test_a_cuda_stream_under_a_forked_default_dataloader_is_one_line(monkeypatch, caption_store, tiny_model):
    """pytorch/examples moves its model to the GPU before the DataLoader forks its workers. The seam stands in for
    CUDA's own 'bad fork' state (a CPU machine cannot reach it); a forked worker inherits the patch."""
    from streamsynth import GeneratorConfig, SyntheticStream

    monkeypatch.setattr(devices, "_in_bad_fork", lambda: True)
    stream = SyntheticStream(caption_store, GeneratorConfig(tiny_model, devices=("cuda:0",), image_size=16),
                             batch_size=2)
    loader = DataLoader(stream, batch_size=2, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(CUDAAfterForkError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert 'multiprocessing_context="spawn"' in message and "cuda:0" in message
    # The same stream in the trainer's own process, where CUDA state is not inherited, is not refused by the check.
    monkeypatch.setattr(devices, "_in_bad_fork", lambda: False)
    devices.check_usable_here("cuda:0")
