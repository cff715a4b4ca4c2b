"""Sample-level steering: each sample of a group is the one, of a pool of candidates, that the learner is least sure of.

A group's sample ids stay the layout's (ids, cache records and augmentation seeds are the slots' own). Slot i's pool
is the plain stream's sample i and `pool - 1` candidates from a separate, keyed id space
(`CaptionSampler.candidate_pool`, ids i·(pool−1) .. i·(pool−1) + pool − 2), so no candidate is ever another slot's
sample. The worker generates the whole pool, scores every candidate with the learner's weights of the group's version
(handed over by `steering.Steering`), and keeps per slot the candidate with the highest uncertainty: the entropy of
the learner's prediction, or one minus its margin (top probability minus the second). Selection is per slot, so it
does not depend on how slots are split among ranks or workers, and it is a pure function of (seed, slot, the
version's weights); ties go to the lowest candidate. With `prefer="easy"` the most certain candidate is kept (a
negative control).

Cost, per slot of a steered group: `pool` images generated instead of one, `pool` forward passes of the learner in
the worker, on the worker's device; per version, one copy of the learner's weights (the trainer's part of the
hand-over) and one read of them per worker. Groups under version 0 (before the first version's first group) are the
plain stream's and cost nothing extra.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Callable, Sequence

import torch

from ..transforms import BatchAugment, normalize_transform
from .steering import Steering

SCORES = ("entropy", "margin")


def uncertainty(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Per row of logits, how unsure the prediction is (higher: less sure): the entropy of the softmax, or one minus
    the margin between its two largest probabilities."""
    probabilities = logits.float().softmax(1)
    if score == "entropy":
        return -(probabilities * probabilities.clamp(min=1e-12).log()).sum(1)
    if score == "margin":
        top = probabilities.topk(2, dim=1).values
        return 1 - (top[:, 0] - top[:, 1])
    raise ValueError(f"unknown uncertainty score {score!r}: choose one of {SCORES}")


def learner_view(transform, images: torch.Tensor) -> torch.Tensor:
    """What the learner is shown of uint8 candidates when it scores them: its own batch augmentation without the
    randomness (the whole frame, unflipped), or plain normalisation for a per-image transform."""
    if isinstance(transform, BatchAugment):
        whole = replace(transform, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
        return whole(images, [0] * len(images))
    return normalize_transform()(images)


class UncertaintySelection(Steering):
    """Sample-level steering; see the module docstring. Call `watch(model)` with the learner before the loader's first
    batch: a version is a copy of its weights (parameters and buffers) when the trainer begins the version's group."""

    mode = "sample"
    _trainer_only = (*Steering._trainer_only, "_learner")

    def __init__(self, pool: int = 4, every: int = 8, lag: int = 4, score: str = "entropy", prefer: str = "hard"):
        super().__init__(every, lag, prefer)
        if pool < 2:
            raise ValueError(f"a candidate pool needs at least 2 candidates per sample, got pool={pool}")
        if score not in SCORES:
            raise ValueError(f"unknown uncertainty score {score!r}: choose one of {SCORES}")
        self.pool, self.score = pool, score
        self._learner: torch.nn.Module | None = None
        self._scorer: torch.nn.Module | None = None  # the learner's architecture, on the CPU, for the workers

    def settings(self) -> dict:
        return {**super().settings(), "pool": self.pool, "score": self.score}

    def watch(self, model: torch.nn.Module) -> None:
        self._learner = model
        self._scorer = copy.deepcopy(model).to("cpu").eval().requires_grad_(False)

    def snapshot(self) -> dict[str, torch.Tensor]:
        if self._learner is None:
            raise ValueError("UncertaintySelection has no learner to steer by: call steering.watch(model) before the "
                             "loader's first batch")
        # The trainer's whole cost of a hand-over: this copy (the file is written by a background thread).
        return {name: value.detach().to("cpu", copy=True) for name, value in self._learner.state_dict().items()}

    def steer(self, payload: dict[str, torch.Tensor], maker, worker: int) -> Callable:
        device = torch.device(maker.device(worker))
        self._scorer.load_state_dict(payload)
        return PoolSelection(self._scorer.to(device), self.pool, self.score, self.prefer, device)


class PoolSelection:
    """A worker's way to make a group under one version of the learner: generate each slot's pool, keep per slot the
    candidate the learner is least (or, preferring easy, most) sure of."""

    def __init__(self, scorer: torch.nn.Module, pool: int, score: str, prefer: str, device: torch.device):
        self.scorer, self.pool, self.score, self.prefer, self.device = scorer, pool, score, prefer, device

    def __call__(self, maker, sample_ids: Sequence[int], worker: int) -> tuple[list, torch.Tensor, int, float]:
        candidates = maker.sampler.candidate_pool()
        specs = []
        for slot in sample_ids:
            specs.append(maker.sampler(slot))
            specs += [candidates(slot * (self.pool - 1) + j) for j in range(self.pool - 1)]
        images = maker.render(specs, worker)
        started = time.perf_counter()
        with torch.no_grad():
            logits = self.scorer(learner_view(maker.transform, images.to(self.device)))
        scores = uncertainty(logits, self.score).view(len(sample_ids), self.pool).cpu()
        chosen = scores.argmax(1) if self.prefer == "hard" else scores.argmin(1)  # the first of equal scores
        learner_s = time.perf_counter() - started
        picked = [slot * self.pool + int(c) for slot, c in enumerate(chosen)]
        kept = [replace(specs[p], sample_id=i) for p, i in zip(picked, sample_ids)]
        handed = images[picked].contiguous(memory_format=torch.channels_last)  # as the plain loop hands them
        return kept, handed, len(specs), learner_s
