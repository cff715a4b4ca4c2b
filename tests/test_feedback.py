"""Feedback-driven sampling: hard classes are drawn more often, every class keeps its floor, resume stays exact."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from streamsynth import StreamLoader, SyntheticStream
from streamsynth.prompts import prompt_template
from streamsynth.stream import CaptionSampler
from streamsynth.stream.feedback import ClassFeedback


def _losses_hard_on(classes: set[int], num_classes: int = 10, per_class: int = 5):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    losses = torch.tensor([4.0 if int(c) in classes else 0.2 for c in labels])
    return losses, labels


def test_weights_follow_loss_and_keep_a_floor():
    feedback = ClassFeedback(10, floor=0.3)
    assert feedback.next_weights() is None  # no loss seen yet: the stream keeps its default order
    feedback.update(*_losses_hard_on({0, 1}))
    weights = feedback.next_weights()
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] == weights[1] > 5 * weights[5]
    assert min(weights) >= 0.3 / 10


def test_sampler_frequencies_shift_toward_hard_classes(caption_store):
    feedback = ClassFeedback(10, floor=0.2)
    feedback.update(*_losses_hard_on({3, 7}))
    sampler = CaptionSampler(caption_store, prompt_template("cip"), run_seed=1)
    uniform = Counter(sampler.locate(i)[0] for i in range(3000))
    sampler.class_weights = feedback.next_weights()
    weighted = Counter(sampler.locate(i)[0] for i in range(3000))
    assert weighted[3] > 2 * uniform[3] and weighted[7] > 2 * uniform[7]
    floor_count = 3000 * 0.2 / 10
    assert all(weighted[c] > 0.6 * floor_count for c in range(10))  # every class keeps (about) its floor
    assert all(0 <= sampler.locate(i)[1] < 6 for i in range(100))


def test_feedback_reaches_loader_workers_and_survives_resume(caption_store, small_generator):
    def make(feedback):
        stream = SyntheticStream(caption_store, small_generator, epoch_size=64, batch_size=8, return_sample_ids=True)
        return StreamLoader(stream, num_workers=2, feedback=feedback)

    feedback = ClassFeedback(10, floor=0.1)
    loader = make(feedback)
    first_epoch = Counter(label for _, labels, _ in loader for label in labels.tolist())
    feedback.update(*_losses_hard_on({2}))
    second_epoch = Counter(label for _, labels, _ in loader for label in labels.tolist())
    assert second_epoch[2] > first_epoch[2] + 10  # the workers drew with the new weights
    state = loader.state_dict()
    assert "epoch_weights" not in state and state["epoch"] == 2  # epoch 2's weights are decided when it begins

    # A new loader restored from that state draws the same third epoch as the original one.
    feedback.update(*_losses_hard_on({5}))
    restored_feedback = ClassFeedback(10, floor=0.1)
    restored = make(restored_feedback)
    restored.load_state_dict(loader.state_dict())
    original_third = [labels.tolist() for _, labels, _ in loader]
    assert [labels.tolist() for _, labels, _ in restored] == original_third
    assert Counter(label for batch in original_third for label in batch)[5] > first_epoch[5]

    # Resumed inside an epoch, the epoch keeps the weights it began with.
    def restored_at(state):
        loader = make(ClassFeedback(10, floor=0.1))
        loader.load_state_dict(state)
        return loader

    whole = restored_at({**restored.state_dict(), "epoch": 3, "batch": 0})
    batches = iter(whole)
    head = [next(batches)[1].tolist() for _ in range(3)]
    state = whole.state_dict()
    assert state["epoch_weights"] is not None and state["batch"] == 3
    tail = [labels.tolist() for _, labels, _ in restored_at(state)]
    assert head + tail == [labels.tolist() for _, labels, _ in restored_at({**state, "batch": 0})]


def test_class_weights_set_by_hand_reach_running_workers_and_resume(caption_store, small_generator):
    """Without feedback: weights set between epochs reach workers that are already running (StreamLoader's and a
    persistent DataLoader's), and a resumed StreamLoader draws the same epoch."""
    from torch.utils.data import DataLoader

    only_three = [0.0] * 10
    only_three[3] = 1.0
    stream = SyntheticStream(caption_store, small_generator, epoch_size=16, batch_size=8, return_sample_ids=True)
    loader = StreamLoader(stream, num_workers=2)
    first = [label for _, labels, _ in loader for label in labels.tolist()]
    stream.set_class_weights(only_three)
    state = loader.state_dict()
    second = [label for _, labels, _ in loader for label in labels.tolist()]
    assert set(first) != {3} and second == [3] * 16
    restored = StreamLoader(SyntheticStream(caption_store, small_generator, epoch_size=16, batch_size=8,
                                            return_sample_ids=True), num_workers=1)
    restored.load_state_dict(state)
    restored.stream.set_class_weights(only_three)  # the run's own setting, made again after the restart
    assert [label for _, labels, _ in restored for label in labels.tolist()] == second

    plain_stream = SyntheticStream(caption_store, small_generator, epoch_size=16, batch_size=8)
    plain = DataLoader(plain_stream, batch_size=8, num_workers=2, persistent_workers=True)
    assert set(label for _, labels in plain for label in labels.tolist()) != {3}
    plain_stream.set_class_weights(only_three)
    assert [label for _, labels in plain for label in labels.tolist()] == [3] * 16
