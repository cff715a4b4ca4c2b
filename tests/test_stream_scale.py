"""The stream at scale: replay, exact and elastic resume, worker faults, metrics, StatefulDataLoader, the cache."""

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

from streamsynth import StreamLoader, SyntheticStream
from streamsynth.stream import CachedBatches, SynthesisError, cache_shards
from streamsynth.stream.cache import read_metadata
from streamsynth.stream.groups import GroupMaker


def _flip_and_crop():
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(16, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True)])


def _stream(caption_store, generator, maker=None, **kwargs):
    """A stream; with `maker`, a GroupMaker subclass that makes its groups (a fault to inject), in the stream and in
    the workers of any loader of it."""
    stream = SyntheticStream(caption_store, generator, **{"batch_size": 4, "return_sample_ids": True, **kwargs})
    if maker is not None:
        made = maker.__new__(maker)
        made.__dict__.update(stream.maker.__dict__)
        stream.maker = made
    return stream


def _ids(batches) -> list[list[int]]:
    return [batch[2].tolist() for batch in batches]


def test_replay_uses_every_image_k_times_within_a_bounded_buffer(caption_store, small_generator):
    stream = _stream(caption_store, small_generator, epoch_size=24, replay=3, transform=_flip_and_crop())
    batches = list(StreamLoader(stream, num_workers=2))
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


def _uninterrupted(caption_store, generator, **kwargs) -> list[list[int]]:
    loader = StreamLoader(_stream(caption_store, generator, epoch_size=32, **kwargs), num_workers=2)
    return _ids(list(loader)) + _ids(list(loader))  # two epochs


@pytest.mark.parametrize("replay, workers_before, workers_after", [(1, 2, 2), (2, 2, 2), (2, 1, 2), (1, 2, 0)])
def test_resume_from_state_dict_is_exact_on_any_worker_count(caption_store, small_generator, replay,
                                                              workers_before, workers_after):
    reference = _uninterrupted(caption_store, small_generator, replay=replay)
    assert len(reference) == 16 and len({i for b in reference for i in b}) == 64 // replay

    first = StreamLoader(_stream(caption_store, small_generator, epoch_size=32, replay=replay), workers_before)
    seen = []
    for batch in first:
        seen.append(batch[2].tolist())
        if len(seen) == 5:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 5

    second = StreamLoader(_stream(caption_store, small_generator, epoch_size=32, replay=replay), workers_after)
    second.load_state_dict(state)
    seen += _ids(list(second)) + _ids(list(second))
    assert seen == reference


def test_resume_on_fewer_ranks_with_the_same_global_batch_continues_the_sequence(caption_store, small_generator):
    """Two ranks of batch 2 checkpoint after 3 batches; one rank of batch 4 resumes and sees what they would have."""
    def rank_batches(rank: int, world: int, batch_size: int, state=None, count=None) -> list[list[int]]:
        loader = StreamLoader(_stream(caption_store, small_generator, epoch_size=32, batch_size=batch_size,
                                      rank=rank, world_size=world))
        if state:
            loader.load_state_dict(state)
        out = []
        for batch in loader:
            out.append(batch[2].tolist())
            if count and len(out) == count:
                return out, loader.state_dict()
        return out, loader.state_dict()

    (r0, state0), (r1, state1) = rank_batches(0, 2, 2, count=3), rank_batches(1, 2, 2, count=3)
    assert state0 == state1  # the state is the same on every rank
    resumed, _ = rank_batches(0, 1, 4, state=state0)
    reference, _ = rank_batches(0, 1, 4)
    assert [a + b for a, b in zip(r0, r1)] + resumed == reference


def test_resume_refuses_another_global_batch(caption_store, small_generator):
    state = StreamLoader(_stream(caption_store, small_generator, epoch_size=32)).state_dict()
    other = StreamLoader(_stream(caption_store, small_generator, epoch_size=32, batch_size=2))
    with pytest.raises(ValueError, match="global_batch_size was 4, now 2"):
        other.load_state_dict(state)


def test_stateful_dataloader_with_two_workers_resumes_exactly(caption_store, small_generator):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        return StatefulDataLoader(_stream(caption_store, small_generator, epoch_size=32), batch_size=4, num_workers=2)

    reference = make()
    expected = _ids(reference) + _ids(reference)
    loader = make()
    iterator = iter(loader)
    seen = [next(iterator)[2].tolist() for _ in range(3)]
    state = loader.state_dict()
    del iterator
    resumed = make()
    resumed.load_state_dict(state)
    seen += _ids(resumed) + _ids(resumed)  # the rest of epoch 0, then epoch 1 by itself
    assert seen == expected


class FailOnce(GroupMaker):
    """Fails in one worker the first time it makes group 3; a marker file makes "first" hold across processes."""

    marker: str = ""
    how: str = "raise"

    def make_group(self, layout, epoch, group, worker=0, class_weights=None, steer=None):
        if group == 3 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            if self.how in ("kill", "stop"):
                os.kill(os.getpid(), signal.SIGKILL if self.how == "kill" else signal.SIGSTOP)
            if self.how == "hang":
                time.sleep(600)
            raise RuntimeError("injected fault: CUDA out of memory (simulated)")
        return super().make_group(layout, epoch, group, worker, class_weights, steer)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "kill", "hang", "stop"])
def test_worker_fault_is_survived_without_repeat_or_gap(caption_store, small_generator, tmp_path, how, caplog):
    reference = _uninterrupted(caption_store, small_generator)
    stream = _stream(caption_store, small_generator, maker=FailOnce, epoch_size=32)
    stream.maker.marker, stream.maker.how = str(tmp_path / "failed"), how
    loader = StreamLoader(stream, num_workers=2, timeout=15 if how in ("hang", "stop") else 1800)
    seen = _ids(list(loader)) + _ids(list(loader))
    assert seen == reference
    assert loader.restarts == 1 and loader.metrics()["restarts"] == 1
    assert "restarting them there" in caplog.text


class AlwaysFail(GroupMaker):
    def make_group(self, layout, epoch, group, worker=0, class_weights=None, steer=None):
        raise RuntimeError("injected permanent fault")


def test_a_group_that_keeps_failing_ends_the_run_with_its_cause(caption_store, small_generator):
    loader = StreamLoader(_stream(caption_store, small_generator, maker=AlwaysFail, epoch_size=32), num_workers=2,
                          max_restarts=1)
    with pytest.raises(SynthesisError, match="group 0 .*failed 2 times.*injected permanent fault"):
        list(loader)


class ModelVanishes(GroupMaker):
    def make_group(self, layout, epoch, group, worker=0, class_weights=None, steer=None):
        from streamsynth.synth import ModelLoadError

        raise ModelLoadError("model folder /models/sd was deleted")


def test_a_deterministic_error_in_a_worker_ends_the_run_at_once_in_one_line(caption_store, small_generator):
    loader = StreamLoader(_stream(caption_store, small_generator, maker=ModelVanishes, epoch_size=8), num_workers=1)
    with pytest.raises(SynthesisError) as raised:
        list(loader)
    assert str(raised.value) == "ModelLoadError: model folder /models/sd was deleted"  # no worker traceback
    assert loader.restarts == 0


def test_metrics(caption_store, small_generator):
    loader = StreamLoader(_stream(caption_store, small_generator, epoch_size=16), num_workers=2)
    list(loader)
    metrics = loader.metrics()
    assert [w["images"] for w in metrics["workers"]] == [8, 8]
    assert all(w["images_per_s"] > 0 for w in metrics["workers"])
    # Each worker process holds a model: its peak resident memory is at least the weights' size.
    assert all(w["peak_memory_bytes"] > 10 * 2**20 and w["peak_memory_kind"].startswith("peak resident set")
               for w in metrics["workers"])
    assert 0 < metrics["data_wait_share"] <= 1 and metrics["queue_depth"] >= 0
    assert metrics["epoch"] == 1 and metrics["batch"] == 0


def test_the_private_dataloader_parts_the_loader_relies_on_are_there(caption_store, small_generator):
    """`StreamLoader` takes its workers off PyTorch's SIGCHLD handler and kills hung ones: if PyTorch renames what
    that needs, this fails here rather than as a crash inside a training loop."""
    from torch.utils.data import DataLoader
    from torch.utils.data._utils import signal_handling

    from streamsynth.stream.loader import _detach_from_sigchld, _worker_processes

    iterator = iter(DataLoader(range(4), num_workers=1))
    assert iterator._worker_pids_set and hasattr(signal_handling, "_remove_worker_pids")
    assert [p.pid for p in _worker_processes(iterator)] and all(p.is_alive() for p in _worker_processes(iterator))
    _detach_from_sigchld(iterator)
    assert iterator._worker_pids_set is False
    assert list(iterator) == [torch.tensor([i]) for i in range(4)]


def test_cache_shards_are_plain_webdataset_and_written_once(caption_store, small_generator, tmp_path):
    cache = tmp_path / "cache"
    loader = StreamLoader(_stream(caption_store, small_generator, epoch_size=16, cache=cache), num_workers=2)
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
    assert batches.class_ids == [c.id for c in caption_store.classes]  # recorded by the writer
    drawn = [next(batches) for _ in range(10)]
    assert all(images.shape == (4, 3, 16, 16) and 0 <= labels.min() and labels.max() < 10 for images, labels, _ in drawn)
    assert sorted(int(key.split("/")[1]) for _, _, keys in drawn[:4] for key in keys) == sorted(delivered)
    with pytest.raises(ValueError, match="other classes than the caption store"):
        CachedBatches(cache, _flip_and_crop(), 4, class_ids=["a", "b"])


def test_kill_during_cache_write_leaves_no_visible_shard(caption_store, tmp_path):
    cache = tmp_path / "cache"
    script = f"""
import os, signal, torch, webdataset
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
write_group({str(cache)!r}, ["n0"], specs, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = os.listdir(cache)
    assert len(leftovers) == 1 and leftovers[0].startswith(".") and leftovers[0].endswith(".tmp")
    with pytest.raises(FileNotFoundError, match="no cache shards"):
        cache_shards(cache)
    assert glob.glob(str(cache / "*.tar")) == []  # what a reader of the shards would list


def test_spawned_workers_as_with_cuda(caption_store, small_generator):
    """CUDA workers must be spawned, which pickles the stream and the shared values into fresh processes."""
    loader = StreamLoader(_stream(caption_store, small_generator, epoch_size=8), num_workers=1,
                          multiprocessing_context="spawn")
    assert _ids(list(loader)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert loader.metrics()["workers"][0]["images"] == 8
