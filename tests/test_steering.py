"""Steering by the learner: every mode is a pure function of (seed, sample id, the state saved with the loader), so it
resumes exactly after kill -9 and on another number of workers; the hand-over of the learner's weights never holds
the trainer; the negative control leans towards what the learner knows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from streamsynth import StreamLoader, SyntheticStream
from streamsynth.prompts import prompt_template
from streamsynth.stream import (CaptionFeedback, CaptionSampler, ClassFeedback, EpochsInARow, SteeringSchedule,
                                StreamLayout, UncertaintySelection)
from streamsynth.stream.handover import HandOver
from streamsynth.stream.selection import PoolSelection, uncertainty

ROOT = Path(__file__).resolve().parents[1]
# The trainer's part of a hand-over (a copy of the learner's weights and a queue put) for the small learner of these
# tests, allowed under a loaded 2-core machine; the writer below takes far longer.
HAND_OVER_BOUND_S = 0.25
SLOW_WRITE_S = 1.0

# A tiny run: 4 images a group, each used twice; 12 groups; a version every 2 groups, made 1 group ahead.
BATCHES, KILL_AT = 24, 9  # batch 9 is the second use of group 4: the run is killed inside a group
MODES = {
    "class": lambda: {"feedback": ClassFeedback(10, floor=0.2)},
    "caption": lambda: {"steering": CaptionFeedback(every=2, lag=1, floor=0.2)},
    "sample": lambda: {"steering": UncertaintySelection(pool=3, every=2, lag=1)},
}


def _learner() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))


def _loader(caption_store, generator, mode: str, workers: int) -> tuple[StreamLoader, torch.nn.Module]:
    stream = SyntheticStream(caption_store, generator, batch_size=4, replay=2, epoch_size=32, return_sample_ids=True)
    loader = StreamLoader(stream, workers, **MODES[mode]())
    learner = _learner()
    if loader.steering is not None:
        loader.steering.watch(learner)
    return loader, learner


def _train(loader: StreamLoader, learner: torch.nn.Module, batches: int, optimizer_state=None):
    """Train the learner on `batches` batches, reporting its losses; returns what each batch held."""
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    feedback = loader.feedback or loader.steering
    seen = []
    for images, labels, ids in islice(EpochsInARow(loader), batches):
        losses = torch.nn.functional.cross_entropy(learner(images), labels, reduction="none")
        feedback.update(losses.detach(), labels, ids)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        seen.append((ids.tolist(), labels.tolist(), images.clone()))
    return seen, optimizer


# The first part of a killed run of each mode, in one process of its own: train KILL_AT batches, save the
# checkpoint; then kill -9 the process, workers and all.
KILLED_PART = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from streamsynth import GeneratorConfig, SynthesisConfig
from streamsynth.captions import CaptionStore
import test_steering as t
generator = GeneratorConfig({model!r}, synthesis=SynthesisConfig(num_inference_steps=2), image_size=16,
                            devices=("cpu",), batch_size=4)
for mode in t.MODES:
    loader, learner = t._loader(CaptionStore({store!r}), generator, mode, 2)
    seen, optimizer = t._train(loader, learner, t.KILL_AT)
    torch.save({{"loader": loader.state_dict(), "learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                "seen": seen}}, os.path.join({folder!r}, mode + ".pt"))
os.killpg(0, signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def killed_checkpoints(tmp_path_factory, caption_store, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("killed")
    script = KILLED_PART.format(tests=str(ROOT / "tests"), model=str(tiny_model), store=str(caption_store.path),
                                folder=str(folder))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return folder


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_resumes_exactly_after_kill_9_on_another_worker_count(mode, caption_store, small_generator,
                                                                         killed_checkpoints):
    loader, learner = _loader(caption_store, small_generator, mode, 2)
    reference, _ = _train(loader, learner, BATCHES)
    reference_weights = learner.state_dict()

    state = torch.load(killed_checkpoints / f"{mode}.pt", weights_only=True)  # a checkpoint loads without pickled code
    resumed, learner = _loader(caption_store, small_generator, mode, 1)
    learner.load_state_dict(state["learner"])
    resumed.load_state_dict(state["loader"])
    rest, _ = _train(resumed, learner, BATCHES - KILL_AT, state["optimizer"])
    seen = state["seen"] + rest
    assert [s[:2] for s in seen] == [r[:2] for r in reference]
    assert all(torch.equal(s[2], r[2]) for s, r in zip(seen, reference))
    for name, value in reference_weights.items():
        torch.testing.assert_close(learner.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    # Groups 0-2 are the plain stream's in every mode (no version yet, or epoch 0's class weights); from group 4 (epoch 1;
    # versions 1 and up) on, every mode steers.
    plain = SyntheticStream(caption_store, small_generator, batch_size=4, replay=2, epoch_size=32)
    plain_labels = [[plain.spec(i).label for i in ids] for ids, _, _ in reference]
    labels = [labels for _, labels, _ in reference]
    assert labels[:6] == plain_labels[:6] and labels[8:] != plain_labels[8:]


def test_a_resumed_loader_refuses_other_steering(caption_store, small_generator):
    loader, learner = _loader(caption_store, small_generator, "sample", 0)
    _train(loader, learner, 2)
    state = loader.state_dict()
    other = StreamLoader(SyntheticStream(caption_store, small_generator, batch_size=4, replay=2, epoch_size=32),
                         steering=UncertaintySelection(pool=2, every=2, lag=1))
    with pytest.raises(ValueError, match="steering was .*'pool': 3.*now .*'pool': 2"):
        other.load_state_dict(state)
    plain = StreamLoader(SyntheticStream(caption_store, small_generator, batch_size=4, replay=2, epoch_size=32))
    with pytest.raises(ValueError, match="saved with sample steering, this loader has no"):
        plain.load_state_dict(state)
    with pytest.raises(ValueError, match="not both"):
        StreamLoader(plain.stream, feedback=ClassFeedback(10), steering=CaptionFeedback())


def test_the_hand_over_never_holds_the_trainer_while_the_disk_is_slow(caption_store, monkeypatch):
    """Each version's file takes SLOW_WRITE_S to write; taking versions still holds the trainer under the bound, and
    the workers get every version, whole."""
    write = HandOver._write

    def slow_write(self, version, payload):
        time.sleep(SLOW_WRITE_S)
        write(self, version, payload)

    monkeypatch.setattr(HandOver, "_write", slow_write)
    learner = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(10))
    learner(torch.zeros(1, 3, 16, 16))
    steering = UncertaintySelection(pool=2, every=1, lag=0)
    steering.watch(learner)
    layout = StreamLayout(seed=0, epoch_size=64, batch_size=4)
    sampler = CaptionSampler(caption_store, prompt_template("cip"))
    held, expected = [], {}
    for version in range(1, 5):  # with every=1, version v is taken when the trainer begins group v
        with torch.no_grad():
            learner[0].weight.add_(1.0)  # each version differs
        expected[version] = learner[0].weight.clone()
        started = time.perf_counter()
        steering.begin_group(version, layout, sampler)
        held.append(time.perf_counter() - started)
    assert max(held) < HAND_OVER_BOUND_S < SLOW_WRITE_S, held
    assert len(steering.hand_over_s()) == 4 and max(steering.hand_over_s()) <= max(held)
    handover = steering._handover
    assert handover.flush(timeout_s=4 * SLOW_WRITE_S + 30)
    assert 4 in handover.published_versions()
    for version in handover.published_versions():
        torch.testing.assert_close(handover.read(version)["0.weight"], expected[version])


def test_the_schedule_takes_a_version_before_any_group_needs_it():
    schedule = SteeringSchedule(every=4, lag=2)
    assert [schedule.version(g) for g in range(12)] == [0] * 6 + [1] * 4 + [2] * 2
    for group in range(100):  # version v of group g was taken by the time the trainer began group g - lag
        assert schedule.version(group) <= schedule.due(max(0, group - schedule.lag))
    with pytest.raises(ValueError, match="at least one group"):
        SteeringSchedule(every=0)


def test_the_negative_control_leans_towards_what_the_learner_knows(caption_store):
    labels = torch.arange(10).repeat_interleave(5)
    losses = torch.where(labels < 2, 3.0, 0.2)  # classes 0 and 1 are hard, the rest known
    hard, easy = ClassFeedback(10, floor=0.2), ClassFeedback(10, floor=0.2, prefer="easy")
    for feedback in (hard, easy):
        feedback.update(losses, labels)
    assert hard.next_weights()[0] > 0.1 > easy.next_weights()[0] and easy.next_weights()[5] > 0.1

    # Sample level: of two candidates per slot, the unsure one is kept, or under the control the sure one.
    sure, unsure = torch.tensor([[9.0] + [0.0] * 9]), torch.zeros(1, 10)
    assert uncertainty(unsure, "entropy") > uncertainty(sure, "entropy")
    assert uncertainty(unsure, "margin") > uncertainty(sure, "margin")

    class Scorer(torch.nn.Module):  # sure of flat images (the even candidates), unsure of the others
        def forward(self, images):
            return torch.where((images.std(dim=(2, 3)).amax(1) < 1e-3)[:, None], sure, unsure)

    class Maker:
        sampler = CaptionSampler(caption_store, prompt_template("cip"))
        transform = None

        def render(self, specs, worker):
            return torch.stack([torch.full((3, 4, 4), 0, dtype=torch.uint8) if i % 2 == 0 else
                                torch.randint(0, 255, (3, 4, 4), dtype=torch.uint8) for i in range(len(specs))])

    for prefer, kept in (("hard", 1), ("easy", 0)):
        specs, images, generated, _ = PoolSelection(Scorer(), 2, "entropy", prefer, torch.device("cpu"))(
            Maker(), [10, 11], 0)
        assert [s.sample_id for s in specs] == [10, 11] and generated == 4  # the slots keep their ids
        assert ((images.flatten(1).float().std(1) > 1) == bool(kept)).all()
        candidate = Maker.sampler.candidate_pool()(10) if kept else Maker.sampler(10)
        assert (specs[0].prompt, specs[0].seed) == (candidate.prompt, candidate.seed)


def test_caption_weights_follow_the_loss_of_each_caption(caption_store):
    sampler = CaptionSampler(caption_store, prompt_template("cip"), run_seed=3)
    layout = StreamLayout(seed=3, epoch_size=64, batch_size=8)
    weights = {}
    for prefer in ("hard", "easy"):
        feedback = CaptionFeedback(every=1, lag=0, floor=0.2, prefer=prefer)
        feedback.begin_group(0, layout, sampler)
        ids = torch.arange(8)
        hard_caption = sampler.flat_index(*sampler.locate(0))
        losses = torch.tensor([5.0 if sampler.flat_index(*sampler.locate(i)) == hard_caption else 0.1
                               for i in ids.tolist()])
        feedback.update(losses, torch.tensor([sampler.locate(i)[0] for i in ids.tolist()]), ids)
        feedback.begin_group(1, layout, sampler)
        weights[prefer] = feedback._versions[1]
        assert weights[prefer].sum().item() == pytest.approx(1.0) and weights[prefer].min() >= 0.2 / len(weights[prefer])
    assert weights["hard"][hard_caption] > 3 * weights["hard"].median()
    assert weights["easy"][hard_caption] < weights["easy"].median()
    steered = sampler.caption_weighted(weights["hard"].numpy())
    drawn = Counter(steered.flat_index(*steered.locate(i)) for i in range(4000))
    assert drawn[hard_caption] > 2 * 4000 / sampler.num_captions


@pytest.mark.slow
def test_train_py_steers_and_a_killed_run_resumes_on_another_worker_count(tmp_path, isolated_cache, caption_store,
                                                                        tiny_model):
    """train.py --steering sample, killed (-9) right after its first checkpoint and resumed with one worker instead of
    two: the same samples and, at the end, the uninterrupted run's weights."""
    run = ["--online-synthesis", "--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--steps", "8",
           "--batch-size", "4", "--image-size", "16", "--model", "resnet18", "--num-inference-steps", "1",
           "--synth-batch-size", "4", "--replay", "2", "--checkpoint-every", "4", "--log-sample-ids", "--steering",
           "sample", "--steer-every", "1", "--steer-lag", "1", "--steer-pool", "2"]
    env = {**os.environ, "STREAMSYNTH_CACHE": str(isolated_cache), "OMP_NUM_THREADS": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *run, "--workers", "2", "--out", str(reference)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "inject_faults.py"), "--fault-during", "checkpoint",
                             "--fault-call", "1", "--fault-signal", "SELF-KILL", "--", *run, "--workers", "2",
                             "--out", str(killed)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *run, "--workers", "1", "--out", str(killed),
                             "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in result.stdout
    logged = [(folder / "sample_ids-rank0.csv").read_text().splitlines() for folder in (reference, killed)]
    assert logged[1][-8:] == logged[0] and len(logged[0]) == 8  # the killed part's lines, then the resumed part's
    finished, uninterrupted = (torch.load(folder / "checkpoint.pt", weights_only=True) for folder in (killed, reference))
    for name, value in uninterrupted["model"].items():
        torch.testing.assert_close(finished["model"][name].float(), value.float(), rtol=1e-5, atol=1e-6)
    assert json.loads((reference / "run.json").read_text())["config"]["steering"] == "sample"


def test_train_py_refuses_to_resume_with_other_steering_settings(tmp_path):
    """Steering settings change the samples, so a resumed run may not change them (none is in RESUME_MAY_CHANGE)."""
    from streamsynth import train
    from streamsynth.commands import options

    def settings(*flags):
        return train.parse_args(["--online-synthesis", "--steering", "sample", *flags])

    saved = options.recorded(settings())
    for flags, said in [(["--steer-pool", "3"], "--steer-pool was 4, now 3"), (["--steer-every", "2"], "--steer-every"),
                        (["--steer-lag", "0"], "--steer-lag"), (["--steer-toward", "easy"], "--steer-toward"),
                        (["--steer-score", "margin"], "--steer-score")]:
        with pytest.raises(train.RunError, match=said):
            train.check_resumable_settings(tmp_path / "checkpoint.pt", saved, 1, settings(*flags), 1)
    train.check_resumable_settings(tmp_path / "checkpoint.pt", saved, 1, settings("--workers", "1"), 1)
    with pytest.raises(SystemExit):
        train.parse_args(["--online-synthesis", "--steering", "caption", "--feedback-sampling"])
