"""Which devices each rank's synthesis workers get."""

from __future__ import annotations

import pytest
import torch

from streamsynth.stream.devices import synthesis_devices


def test_default_is_the_trainers_device():
    assert synthesis_devices(None, "cuda:1", 1, 2) == ["cuda:1"]


def test_auto_takes_every_gpu_no_rank_trains_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    # 2 local ranks train on cuda:0 and cuda:1; the 6 others are split between them.
    assert synthesis_devices("auto", "cuda:0", 0, 2) == ["cuda:2", "cuda:4", "cuda:6"]
    assert synthesis_devices("auto", "cuda:1", 1, 2) == ["cuda:3", "cuda:5", "cuda:7"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert synthesis_devices("auto", "cuda:0", 0, 1) == ["cuda:0"]  # one GPU: shared with the trainer
    assert synthesis_devices("auto", "cpu", 0, 1) == ["cpu"]


def test_a_list_is_split_among_local_ranks_when_it_can_be():
    assert synthesis_devices("cuda:2,cuda:3", "cuda:0", 0, 2) == ["cuda:2"]
    assert synthesis_devices("cuda:2,cuda:3", "cuda:1", 1, 2) == ["cuda:3"]
    assert synthesis_devices("cuda:2", "cuda:1", 1, 2) == ["cuda:2"]  # fewer devices than ranks: shared
    with pytest.raises(ValueError, match="names no device"):
        synthesis_devices(" , ", "cpu")
    with pytest.raises(RuntimeError):
        synthesis_devices("gpu:0", "cpu")
