"""Does a generator hand out its training images? Nearest-neighbour distances of synthetic images to the generator's
training images, against those of held-out real images, in a named feature space.

A generator that draws new images from the data distribution puts its samples as far from the training images as
fresh real images from that distribution are; one that memorised puts some of them much closer (Carlini et al.,
"Extracting Training Data from Diffusion Models", USENIX Security 2023, found over a thousand near copies of
training images among Stable Diffusion's samples). The check reports, in one feature space:

- the distance from each synthetic image to its nearest training image, beside the same for held-out real images
  (quantiles, and the AUC of "the synthetic image is closer than the held-out one": 50% means alike), and for each
  training image to its nearest other training image: a reference from the training distribution itself, for when
  the held-out images differ from the training ones (other photographers, other writers);
- near copies: synthetic images closer to a training image than every held-out real image is to its own nearest.
  For a generator that draws fresh images, each synthetic image is such a copy with probability 1/(n+1) for n
  held-out images, and the count is beta-binomial, which gives the chance level printed beside it.

Nearness is only as meaningful as the features: pixels suit 8x8 digits; photographs need a copy-detection
embedding (e.g. SSCD) or DINO/CLIP features, computed by the caller and handed in as vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .attacks import chance_tpr, sklearn_metrics

QUANTILES = (0.01, 0.05, 0.5)


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, chunk: int = 1024,
                       exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Euclidean distance, index) of each query's nearest reference; both (N, D) feature vectors (images are
    flattened). `exclude_self`: the queries are the references, and each one's nearest other is wanted. Computed in
    chunks of queries, so memory stays at chunk x M distances."""
    queries, references = queries.flatten(1).double(), references.flatten(1).double()
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features and references {references.shape[1]}: compare "
                         "images of one size in one feature space")
    found = []
    for start in range(0, len(queries), chunk):
        # Exact differences, not the matrix-product shortcut, whose rounding would hide an exact copy (distance 0).
        distances = torch.cdist(queries[start:start + chunk], references,
                                compute_mode="donot_use_mm_for_euclid_dist")
        if exclude_self:
            rows = torch.arange(len(distances))
            distances[rows, rows + start] = float("inf")
        found.append(distances.min(dim=1))
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


@dataclass
class MemorisationCheck:
    """Distances to the nearest training image, synthetic against held-out real, and the near copies."""

    feature_space: str
    synthetic: int
    held_out: int
    training: int
    synthetic_quantiles: dict[str, float]  # "1%", "5%", "50%" -> distance
    held_out_quantiles: dict[str, float]
    training_quantiles: dict[str, float]  # each training image to its nearest other training image
    closer_auc: float  # P(a synthetic image is nearer its nearest training image than a held-out one is)
    near_copy_distance: float  # the smallest distance of a held-out image to a training image
    near_copies: int  # synthetic images nearer than that
    chance_mean: float  # the near-copy fraction of a generator that draws fresh images, on average
    chance_95: float  # ... and its 95% quantile
    closest: list[dict] = field(default_factory=list)  # the nearest synthetic-training pairs: indices and distance

    @property
    def near_copy_fraction(self) -> float:
        return self.near_copies / self.synthetic

    def report(self) -> str:
        def quantiles(values: dict[str, float]) -> str:
            return ", ".join(f"{q} {v:.3f}" for q, v in values.items())

        if self.near_copy_fraction > self.chance_95:
            verdict = "NEAR COPIES: more synthetic images sit on a training image than chance gives"
        else:
            verdict = "no sign of copying: no more near copies than a generator of fresh images makes"
        return "\n".join([
            f"memorisation check ({self.feature_space}): {self.synthetic} synthetic images, {self.training} training "
            f"images, {self.held_out} held-out real images",
            f"  distance to the nearest training image, quantiles: synthetic {quantiles(self.synthetic_quantiles)}",
            f"  {'':<49}held-out real {quantiles(self.held_out_quantiles)}",
            f"  {'':<38}training to other training {quantiles(self.training_quantiles)}",
            f"  a synthetic image is nearer than a held-out one with probability {100 * self.closer_auc:.1f}% "
            "(50%: alike; above: the generator stays closer to its training images than new real images do)",
            f"  near copies (nearer than any held-out real image, distance < {self.near_copy_distance:.3f}): "
            f"{self.near_copies} ({100 * self.near_copy_fraction:.2f}%); chance {100 * self.chance_mean:.2f}%, "
            f"below {100 * self.chance_95:.2f}% in 95% of checks",
            f"  verdict: {verdict}",
        ])


def memorisation_check(synthetic: torch.Tensor, held_out: torch.Tensor, training: torch.Tensor, feature_space: str,
                       closest: int = 8) -> MemorisationCheck:
    """Compares the nearest-training-image distances of `synthetic` and `held_out` (feature vectors or images of one
    shape, in the space `feature_space` names); keeps the `closest` nearest synthetic-training pairs."""
    synthetic_distance, synthetic_index = nearest_neighbours(synthetic, training)
    held_out_distance, _ = nearest_neighbours(held_out, training)
    training_distance, _ = nearest_neighbours(training, training, exclude_self=True)
    syn, held = synthetic_distance.numpy(), held_out_distance.numpy()
    is_synthetic = np.concatenate([np.ones(len(syn), bool), np.zeros(len(held), bool)])
    closer_auc = sklearn_metrics().roc_auc_score(is_synthetic, -np.concatenate([syn, held]))
    floor = float(held.min())
    order = np.argsort(syn, kind="stable")[:closest]
    return MemorisationCheck(
        feature_space=feature_space, synthetic=len(syn), held_out=len(held), training=len(training),
        synthetic_quantiles={f"{100 * q:g}%": float(np.quantile(syn, q)) for q in QUANTILES},
        held_out_quantiles={f"{100 * q:g}%": float(np.quantile(held, q)) for q in QUANTILES},
        training_quantiles={f"{100 * q:g}%": float(np.quantile(training_distance.numpy(), q)) for q in QUANTILES},
        closer_auc=float(closer_auc), near_copy_distance=floor, near_copies=int((syn < floor).sum()),
        chance_mean=chance_tpr(len(syn), len(held), 0), chance_95=chance_tpr(len(syn), len(held), 0, 0.95),
        closest=[{"synthetic": int(i), "training": int(synthetic_index[i]), "distance": float(syn[i])} for i in order],
    )
