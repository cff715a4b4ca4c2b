"""The stream at scale: replay, exact resume, worker faults, metrics, StatefulDataLoader, the WebDataset cache."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from streamsynth import SynthesisConfig, SyntheticStream
from streamsynth.stream import CachedBatches, cache_shards
from streamsynth.stream.cache import read_metadata

FAST = SynthesisConfig(num_inference_steps=2)


def _flip_and_crop():
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(16, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True)])


def _stream(caption_store, tiny_model, cls=SyntheticStream, **kwargs):
    kwargs = {"image_size": 16, "devices": ["cpu"], "synthesis": FAST, "synth_batch_size": 4,
              "return_sample_ids": True, **kwargs}
    return cls(caption_store, tiny_model, **kwargs)


def _ids(batches) -> list[list[int]]:
    return [batch[2].tolist() for batch in batches]


def test_replay_uses_every_image_k_times_within_a_bounded_buffer(caption_store, tiny_model):
    stream = _stream(caption_store, tiny_model, epoch_size=24, replay=3, transform=_flip_and_crop())
    batches = list(stream.loader(batch_size=4))
    assert len(batches) == 6
    ids = [i for batch in _ids(batches) for i in batch]
    assert Counter(ids) == {i: 3 for i in range(8)}  # 8 generated images, each used exactly k = 3 times
    # The buffer holds one group: at no point are more than batch_size images open (seen, not yet used k times).
    uses, open_ids = Counter(), set()
    for i in ids:
        uses[i] += 1
        open_ids.add(i)
        assert len(open_ids) <= 4
        if uses[i] == 3:
            open_ids.discard(i)
    # Each use is augmented afresh: the three views of an image are not all the same.
    images = torch.cat([b[0] for b in batches])
    views = [images[[k for k, j in enumerate(ids) if j == i]] for i in range(8)]
    assert all((v[0] - v[1]).abs().max() > 0 or (v[0] - v[2]).abs().max() > 0 for v in views)


def _uninterrupted(caption_store, tiny_model, **kwargs) -> list[list[int]]:
    loader = _stream(caption_store, tiny_model, epoch_size=32, **kwargs).loader(batch_size=4, num_workers=2)
    return _ids(list(loader)) + _ids(list(loader))  # two epochs


@pytest.mark.parametrize("replay", [1, 2])
def test_resume_from_state_dict_is_exact(caption_store, tiny_model, replay):
    reference = _uninterrupted(caption_store, tiny_model, replay=replay)
    assert len(reference) == 16 and len({i for b in reference for i in b}) == 64 // replay

    first = _stream(caption_store, tiny_model, epoch_size=32, replay=replay).loader(batch_size=4, num_workers=2)
    seen = []
    for batch in first:
        seen.append(batch[2].tolist())
        if len(seen) == 5:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 5

    second = _stream(caption_store, tiny_model, epoch_size=32, replay=replay).loader(batch_size=4, num_workers=2)
    second.load_state_dict(state)
    seen += _ids(list(second)) + _ids(list(second))
    assert seen == reference


def test_resume_refuses_a_different_layout(caption_store, tiny_model):
    state = _stream(caption_store, tiny_model, epoch_size=32).loader(batch_size=4, num_workers=2).state_dict()
    other = _stream(caption_store, tiny_model, epoch_size=32).loader(batch_size=2, num_workers=2)
    with pytest.raises(ValueError, match="batch_size was 4, now 2"):
        other.load_state_dict(state)


def test_stateful_dataloader_resumes_exactly(caption_store, tiny_model):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        stream = _stream(caption_store, tiny_model, epoch_size=32)
        stream.configure(batch_size=4, num_workers=2)
        return StatefulDataLoader(stream, batch_size=4, num_workers=2)

    reference = _ids(list(make()))
    loader = make()
    iterator = iter(loader)
    seen = [next(iterator)[2].tolist() for _ in range(3)]
    state = loader.state_dict()
    del iterator
    resumed = make()
    resumed.load_state_dict(state)
    seen += _ids(list(resumed))
    assert seen == reference


class FailOnce(SyntheticStream):
    """Fails in one worker the first time it makes group 3; a marker file makes "first" hold across processes."""

    marker: str = ""
    how: str = "raise"

    def _make_group(self, epoch, group):
        if group == 3 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "hang":
                time.sleep(600)
            raise RuntimeError("injected fault: CUDA out of memory (simulated)")
        return super()._make_group(epoch, group)


@pytest.mark.parametrize("how", ["raise", "kill", "hang"])
def test_worker_fault_is_survived_without_repeat_or_gap(caption_store, tiny_model, tmp_path, how, caplog):
    reference = _uninterrupted(caption_store, tiny_model)
    stream = _stream(caption_store, tiny_model, cls=FailOnce, epoch_size=32)
    stream.marker, stream.how = str(tmp_path / "failed"), how
    loader = stream.loader(batch_size=4, num_workers=2, timeout=5 if how == "hang" else 1800)
    seen = _ids(list(loader)) + _ids(list(loader))
    assert seen == reference
    assert loader.restarts == 1 and loader.metrics()["restarts"] == 1
    assert "restarting the workers" in caplog.text


class AlwaysFail(SyntheticStream):
    def _make_group(self, epoch, group):
        raise RuntimeError("injected permanent fault")


def test_a_batch_that_keeps_failing_ends_the_run_with_its_cause(caption_store, tiny_model):
    loader = _stream(caption_store, tiny_model, cls=AlwaysFail, epoch_size=32).loader(batch_size=4, num_workers=2)
    loader.max_restarts = 1
    with pytest.raises(RuntimeError, match="batch 0 of epoch 0 failed 2 times.*injected permanent fault"):
        list(loader)


def test_metrics_are_readable_from_loader_and_dataset(caption_store, tiny_model):
    stream = _stream(caption_store, tiny_model, epoch_size=16)
    loader = stream.loader(batch_size=4, num_workers=2)
    list(loader)
    metrics = stream.metrics()
    assert metrics == {**loader.metrics(), "data_wait_share": metrics["data_wait_share"]}
    assert [w["images"] for w in metrics["workers"]] == [8, 8]
    assert all(w["images_per_s"] > 0 for w in metrics["workers"])
    # Each worker process holds a model: its peak resident memory is at least the weights' size.
    assert all(w["peak_memory_bytes"] > 10 * 2**20 and w["peak_memory_kind"].startswith("peak resident set")
               for w in metrics["workers"])
    assert 0 < metrics["data_wait_share"] <= 1 and metrics["queue_depth"] >= 0
    assert metrics["epoch"] == 1 and metrics["batch"] == 0


def test_drop_in_for_a_standard_training_script(caption_store, tiny_model):
    """The lines a torchvision-style ImageNet script needs: dataset, loader, len, set_epoch, (images, target)."""
    train_dataset = _stream(caption_store, tiny_model, epoch_size=16, return_sample_ids=False)
    train_loader = train_dataset.loader(batch_size=4, num_workers=2)
    train_sampler = train_dataset
    seen = 0
    for epoch in range(2):
        train_sampler.set_epoch(epoch)
        assert len(train_loader) == 4
        for images, target in train_loader:
            assert images.shape == (4, 3, 16, 16) and target.shape == (4,)
            seen += 1
    assert seen == 8


def test_cache_shards_are_plain_webdataset_and_written_once(caption_store, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    loader = _stream(caption_store, tiny_model, epoch_size=16, cache=cache).loader(batch_size=4, num_workers=2)
    delivered = {i for b in _ids(list(loader)) for i in b}
    shards = cache_shards(cache)
    assert len(shards) == 4
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8"))
    assert {int(s["__key__"]) for s in samples} == delivered
    assert all(s["png"].shape == (16, 16, 3) for s in samples)
    meta = read_metadata(shards[0])
    assert {"prompt", "seed", "sample_id", "label", "class_id", "caption"} <= set(meta[0])
    assert meta[0]["prompt"].startswith("a photo of ")
    mtimes = {s: os.stat(s).st_mtime_ns for s in shards}
    loader.set_epoch(0)
    list(loader)  # the same epoch again: its shards exist, nothing is rewritten
    assert {s: os.stat(s).st_mtime_ns for s in cache_shards(cache)} == mtimes
    # Training from the cache: endless passes that read every sample once, labelled, keyed by shard and sample id.
    batches = CachedBatches(cache, _flip_and_crop(), 4, shuffle_window=8)
    drawn = [next(batches) for _ in range(10)]
    assert all(images.shape == (4, 3, 16, 16) and 0 <= labels.min() and labels.max() < 10 for images, labels, _ in drawn)
    assert sorted(int(key.split("/")[1]) for _, _, keys in drawn[:4] for key in keys) == sorted(delivered)


def test_kill_during_cache_write_leaves_no_visible_shard(caption_store, tmp_path):
    cache = tmp_path / "cache"
    script = f"""
import os, signal, torch, webdataset
from streamsynth.captions import CaptionStore
from streamsynth.stream.cache import write_group
from streamsynth.stream.sampling import SampleSpec
written = 0
original = webdataset.TarWriter.write
def write_then_die(self, sample):
    global written
    original(self, sample)
    written += 1
    if written == 2:
        os.kill(os.getpid(), signal.SIGKILL)
webdataset.TarWriter.write = write_then_die
specs = [SampleSpec(i, 0, 0, "c", "p", i) for i in range(4)]
write_group({str(cache)!r}, CaptionStore({str(caption_store.path)!r}), specs, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = os.listdir(cache)
    assert len(leftovers) == 1 and leftovers[0].startswith(".") and leftovers[0].endswith(".tmp")
    with pytest.raises(FileNotFoundError, match="no cache shards"):
        cache_shards(cache)
    assert glob.glob(str(cache / "*.tar")) == []  # what a reader of the shards would list


def test_spawned_workers_as_with_cuda(caption_store, tiny_model):
    """CUDA workers must be spawned, which pickles the stream with its shared counters into fresh processes."""
    stream = _stream(caption_store, tiny_model, epoch_size=8)
    loader = stream.loader(batch_size=4, num_workers=1, multiprocessing_context="spawn")
    assert _ids(list(loader)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert stream.metrics()["workers"][0]["images"] == 8


class ModelVanishes(SyntheticStream):
    def _make_group(self, epoch, group):
        from streamsynth.synth import ModelLoadError

        raise ModelLoadError("model folder /models/sd was deleted")


def test_a_configuration_error_in_a_worker_is_not_retried(caption_store, tiny_model):
    from streamsynth.synth import ModelLoadError

    loader = _stream(caption_store, tiny_model, cls=ModelVanishes, epoch_size=8).loader(batch_size=4, num_workers=1)
    with pytest.raises(ModelLoadError, match="was deleted"):
        list(loader)
    assert loader.restarts == 0
