"""Where users plug the stream in, with the real libraries, in the order users call things: a stream built before the
process group exists (gloo ranks, fork and spawn workers), Lightning (DDP on two CPU processes; exact resume from its
own checkpoint) and timm's `create_loader` as timm's train.py calls it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from streamsynth import GeneratorConfig, StreamLoader, SynthesisConfig, SyntheticStream

ROOT = Path(__file__).resolve().parents[1]


def _generator(model) -> GeneratorConfig:
    return GeneratorConfig(model, synthesis=SynthesisConfig(num_inference_steps=1), image_size=16, devices=("cpu",),
                           batch_size=8)


def _rank(rank: int, world: int, init_file: str, captions: str, model: str, out: str) -> None:
    """One rank: the stream and a StreamLoader are built first, the process group after (as a LightningDataModule's
    __init__, or a script that builds its data before `init_process_group`, does); then it is iterated."""
    stream = SyntheticStream(captions, _generator(model), batch_size=2, epoch_size=16, return_sample_ids=True)
    loader = StreamLoader(stream, num_workers=1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen = {}
    for context in ("fork", "spawn"):  # a forked worker inherits the process group; a spawned one is told the rank
        stream.set_epoch(0)
        batches = DataLoader(stream, batch_size=2, num_workers=2, multiprocessing_context=context)
        seen[context] = sorted(i for _, _, ids in batches for i in ids.tolist())
    seen["stream_loader"] = sorted(i for _, _, ids in loader for i in ids.tolist())
    Path(out, f"rank{rank}.txt").write_text(repr(seen))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_stream_built_before_init_process_group_splits_by_rank(tmp_path, caption_store, tiny_model):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "init"), str(caption_store.path), str(tiny_model),
                                            str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]  # noqa: S307 - our own repr
    # One rank alone, built the same way, makes the union: the two ranks split the same epoch.
    alone = SyntheticStream(caption_store, _generator(tiny_model), batch_size=4, epoch_size=16,
                            return_sample_ids=True)
    one_rank = sorted(i for _, _, ids in DataLoader(alone, batch_size=4) for i in ids.tolist())
    for way in ("fork", "spawn", "stream_loader"):
        assert not set(ranks[0][way]) & set(ranks[1][way]), way
        assert sorted(ranks[0][way] + ranks[1][way]) == one_rank, way
    assert one_rank == list(range(16))


def _lightning(tmp_path: Path, out: str, caption_store, tiny_model, *args: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "integrations" / "lightning_run.py"),
                             str(tmp_path / out), "--captions", str(caption_store.path), "--sd-model", str(tiny_model),
                             *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return tmp_path / out


def _steps(folder: Path, rank: int) -> list[tuple[int, int, list[int]]]:
    rows = []
    for line in (folder / f"ids-rank{rank}.txt").read_text().splitlines():
        _, epoch, step, *ids = line.split()
        rows.append((int(epoch), int(step), [int(i) for i in ids]))
    return rows


@pytest.mark.slow
def test_lightning_ddp_ranks_take_disjoint_samples_and_epochs_advance(tmp_path, caption_store, tiny_model):
    out = _lightning(tmp_path, "ddp", caption_store, tiny_model, "--devices", "2", "--epochs", "2")
    ranks = [_steps(out, r) for r in range(2)]
    for epoch in (0, 1):
        ids = [[i for e, _, batch in rows if e == epoch for i in batch] for rows in ranks]
        assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])  # disjoint across ranks
        # epoch 16 samples over 2 ranks, each image used twice (replay 2): 8 new ids, split 4 and 4
        assert sorted(set(ids[0]) | set(ids[1])) == list(range(8 * epoch, 8 * epoch + 8))


@pytest.mark.slow
def test_lightning_resumes_exactly_from_its_own_mid_epoch_checkpoint(tmp_path, caption_store, tiny_model):
    whole = _steps(_lightning(tmp_path, "whole", caption_store, tiny_model, "--epochs", "2"), 0)
    # A checkpoint at step 3, taken while training went on (to step 5): resumed, the run takes the whole run's batches
    # from step 3 on (a loader state one batch ahead would skip one).
    first = _lightning(tmp_path, "parted", caption_store, tiny_model, "--epochs", "2", "--max-steps", "5",
                       "--checkpoint-every", "3")
    (first / "ids-rank0.txt").rename(first / "first-part.txt")
    _lightning(tmp_path, "parted", caption_store, tiny_model, "--epochs", "2", "--resume",
               str(first / "checkpoints" / "epoch=0-step=3.ckpt"))
    resumed = _steps(first, 0)
    assert len(whole) == 16 and [step for _, step, _ in resumed] == list(range(3, 16))
    assert [ids for *_, ids in resumed] == [ids for *_, ids in whole[3:]]


@pytest.mark.parametrize("prefetcher", [False, True])
def test_timm_create_loader_takes_the_stream_as_timm_train_py_calls_it(caption_store, tiny_model, prefetcher):
    """timm's create_loader sets the dataset's transform to its own (a PIL pipeline) and builds a DataLoader;
    timm's train.py calls `dataset.set_epoch(epoch)` on an IterableDataset before each epoch."""
    from timm.data import create_loader

    stream = SyntheticStream(caption_store, _generator(tiny_model), batch_size=4, epoch_size=8,
                             return_sample_ids=not prefetcher)
    loader = create_loader(stream, input_size=(3, 16, 16), batch_size=4, is_training=True, use_prefetcher=prefetcher,
                           num_workers=1, device=torch.device("cpu"), persistent_workers=True)
    seen = []
    for epoch in range(2):
        stream.set_epoch(epoch)  # timm train.py: `if hasattr(dataset_train, 'set_epoch')`
        for batch in loader:
            assert batch[0].shape == (4, 3, 16, 16) and batch[0].dtype == torch.float32
            if not prefetcher:
                seen.append(batch[2].tolist())
    if not prefetcher:  # each epoch its own samples, through timm's persistent workers
        assert [i for b in seen for i in b] == list(range(16))
