"""Shadow (reference) models for membership inference: which images each one trains on, training them with the audited
classifier's recipe, and every model's outputs on every image of the pool.

The pool is every image the attacker holds: a population of real images from the audited classifier's distribution
and the audited images themselves (members and non-members, whose labels the attacker does not know). Online, as in
LiRA, each shadow model trains on a random half of the whole pool, drawn so that every image is in exactly half of
the models: each audited image then has as many models that saw it (IN) as models that did not (OUT). Offline, the
shadow models train on random halves of the population only, and every audited image is OUT of all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, default_collate

from ..limits import SharedCollate, plan_workers
from ..seeding import derive_seed
from .recipe import TrainingRecipe, train_classifier


def check_shadow_count(shadow_models: int, online: bool) -> None:
    """Each image is in exactly half of the shadow models, and LiRA estimates a spread on each side of it."""
    least = 4 if online else 2
    if shadow_models < least or shadow_models % 2:
        raise ValueError(f"--shadow-models {shadow_models}: give an even number, at least {least} "
                         f"{'online (2 IN and 2 OUT per audited image)' if online else 'offline'}")


def shadow_memberships(pool_size: int, shadow_models: int, audited: np.ndarray, online: bool,
                       seed: int) -> np.ndarray:
    """(shadow_models, pool_size) booleans: True where shadow model k trains on pool image n. Every image is in
    exactly half of the models, except that offline no audited image (the mask `audited`) is in any."""
    check_shadow_count(shadow_models, online)
    rng = np.random.default_rng(derive_seed(seed, "shadow memberships"))
    # Each image's own random order of the models; the first half of that order trains on it.
    rank = rng.random((shadow_models, pool_size)).argsort(axis=0).argsort(axis=0)
    memberships = rank < shadow_models // 2
    if not online:
        memberships[:, np.asarray(audited, dtype=bool)] = False
    return memberships


@torch.no_grad()
def true_class_signals(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(log p, log(p / (1 - p))) of each image's true class under `model`. Both come from the logits, so a
    confidence of 1 - 1e-12 keeps its distance from 1 (a float32 softmax would round it to 1)."""
    logits = model(images).double()
    labels = labels.to(logits.device)[:, None]
    true = logits.gather(1, labels).squeeze(1)
    others = logits.scatter(1, labels, float("-inf")).logsumexp(1)
    log_p = true - logits.logsumexp(1)
    return log_p.cpu().numpy(), (true - others).cpu().numpy()


@torch.no_grad()
def loader_signals(model: nn.Module, loader: Iterable[tuple],
                   device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """`true_class_signals` over a loader of (images, labels) batches, in the loader's order; the model's train/eval
    mode is restored."""
    was_training = model.training
    model.eval()
    try:
        parts = [true_class_signals(model, images.to(device), labels) for images, labels, *_ in loader]
    finally:
        model.train(was_training)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@dataclass
class ShadowSignals:
    """The shadow models' outputs on the pool, (K, N) each, and what they cost."""

    log_confidence: np.ndarray
    logit_confidence: np.ndarray
    seconds: float  # training and scoring all K models


def train_shadow_models(
    recipe: TrainingRecipe,
    memberships: np.ndarray,
    batches_of: Callable[[np.ndarray, int], Iterator[tuple]],
    signals_of: Callable[[nn.Module], tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> ShadowSignals:
    """Trains one model per row of `memberships` by `recipe`, on `batches_of(pool indices, seed)` (endless
    augmented (images, labels) batches of those images), and scores the whole pool with `signals_of(model)`; only the
    scores are kept, so one model is in memory at a time."""
    started = time.perf_counter()
    log_confidence, logit_confidence = [], []
    for k, row in enumerate(memberships):
        model_seed = derive_seed(seed, "shadow model", k)
        model = train_classifier(recipe, batches_of(np.flatnonzero(row), model_seed), model_seed, device)
        log_p, logit = signals_of(model)
        log_confidence.append(log_p)
        logit_confidence.append(logit)
        del model
        if progress:
            progress(f"shadow model {k + 1}/{len(memberships)} trained on {int(row.sum())} images "
                     f"({time.perf_counter() - started:.0f} s so far)")
    return ShadowSignals(np.stack(log_confidence), np.stack(logit_confidence), time.perf_counter() - started)


def endless_batches(dataset, indices: np.ndarray, batch_size: int, seed: int, workers: int = 0,
                    collate_fn: Callable | None = None) -> Iterator[tuple]:
    """Batches of `dataset[indices]` (each item transformed afresh, e.g. augmented), reshuffled every epoch by a
    generator seeded with `seed`, without end; whole batches only."""
    if len(indices) < batch_size:
        raise ValueError(f"a shadow model's share of the pool, {len(indices)} images, does not fill one batch of "
                         f"{batch_size}: give a larger population or a smaller --shadow-batch-size")
    generator = torch.Generator().manual_seed(seed)
    subset = Subset(dataset, indices.tolist())
    first = subset[0][0]
    batch_bytes = batch_size * (first.nbytes if isinstance(first, torch.Tensor) else 0)
    plan = plan_workers(workers, lambda w: batch_bytes, what="a shadow model's batches", fewer="a smaller "
                        "--shadow-batch-size")
    loader = DataLoader(subset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                        persistent_workers=plan.workers > 0, collate_fn=SharedCollate(collate_fn or default_collate),
                        **plan.loader_options())
    while True:
        yield from loader
