"""Membership-inference attacks calibrated by reference models, and the figures they are judged by.

Both attacks score each audited image by comparing the audited classifier's output on it with the outputs of
reference ("shadow") models trained with the same recipe on data whose membership is known (`shadows`):

- **LiRA** (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022) works on the logit of
  the true-class confidence, log(p / (1 - p)), which is close to Gaussian across models. Online, it fits one
  Gaussian to the outputs of the reference models that trained on the image and one to those that did not, and
  scores the likelihood ratio of the two at the audited classifier's output. Offline (no reference model trained on
  the audited images), it scores how far that output lies above the OUT Gaussian. With the few reference models an
  audit affords, the variances are pooled over all images (the paper's "global variance", which it recommends below
  64 models); the means are each image's own.
- **RMIA** (Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks", ICML 2024) works on the
  true-class probability p. For image x it takes the ratio of the audited classifier's p(x) to p(x) averaged over
  reference models, and scores the share of population images z whose own ratio it beats by a factor gamma. Online,
  the average is over all reference models (each audited image in half of them); offline, over those that did not
  train on x, corrected as the paper proposes: p(x) ~ ((1 + a) p_OUT(x) + (1 - a)) / 2.

The figures are those of the membership-inference literature since LiRA: the true-positive rate at a low false-
positive rate (0.1% and 1%), and the whole ROC curve with its AUC, computed with scikit-learn's `roc_curve` and
`auc` (the `audit` extra). A finite audit cannot resolve every FPR: with n non-members the smallest non-zero
FPR is 1/n, so a 0.1% point with fewer than 1,000 non-members is reported as what it is, TPR at FPR <= 1/n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..errors import MissingExtraError

FPR_TARGETS = (0.001, 0.01)  # the operating points reported: 0.1% and 1% false positives
RMIA_GAMMA = 1.0  # RMIA's factor: x "beats" z when its likelihood ratio is at least gamma times z's
# RMIA offline: how much the OUT models' average understates p(x) averaged over IN and OUT models. The paper tunes a
# per dataset on reference models; 0.3 is the value the authors' released tooling uses by default.
RMIA_OFFLINE_A = 0.3
_MIN_STD = 1e-6  # a floor for pooled standard deviations: identical reference models must not divide by zero


def sklearn_metrics():
    """`sklearn.metrics`, or a one-line error naming the extra that installs it."""
    try:
        from sklearn import metrics
    except ImportError:
        raise MissingExtraError('the privacy audit computes its ROC metrics with scikit-learn, which is not '
                                'installed: pip install "streamsynth[audit]"') from None
    return metrics


def _pooled_std(values: np.ndarray, mask: np.ndarray, means: np.ndarray) -> float:
    """The standard deviation of `values` around each column's mean, pooled over the cells in `mask` of columns with
    at least two such cells (each column's mean takes one degree of freedom)."""
    counts = mask.sum(axis=0)
    usable = counts >= 2
    if not usable.any():
        raise ValueError("LiRA needs at least two reference models on each side of an image to estimate a variance")
    squares = np.where(mask, (values - means) ** 2, 0.0)[:, usable].sum()
    return max(math.sqrt(squares / (counts[usable] - 1).sum()), _MIN_STD)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mask, values, 0.0).sum(axis=0) / counts


def lira_scores(target: np.ndarray, references: np.ndarray, memberships: np.ndarray, online: bool) -> np.ndarray:
    """LiRA's score of every image (higher: more likely a member).

    `target`: the audited classifier's logit-scaled true-class confidence, log(p / (1 - p)), per image (N,);
    `references`: the same for each reference model (K, N); `memberships`: (K, N), True where reference model k
    trained on image n. Online: the log-likelihood ratio of the IN and OUT Gaussians; offline: the distance above the
    OUT Gaussian's mean in its standard deviations (a monotone function of the one-sided p-value the paper uses)."""
    target, references = np.asarray(target, np.float64), np.asarray(references, np.float64)
    outside = ~memberships
    out_mean = _masked_mean(references, outside)
    out_std = _pooled_std(references, outside, out_mean)
    if not online:
        return (target - out_mean) / out_std
    in_mean = _masked_mean(references, memberships)
    in_std = _pooled_std(references, memberships, in_mean)
    return (-0.5 * ((target - in_mean) / in_std) ** 2 - math.log(in_std)
            + 0.5 * ((target - out_mean) / out_std) ** 2 + math.log(out_std))


def rmia_scores(target: np.ndarray, references: np.ndarray, memberships: np.ndarray, online: bool,
                population: np.ndarray, gamma: float = RMIA_GAMMA, offline_a: float = RMIA_OFFLINE_A) -> np.ndarray:
    """RMIA's score of every image: the share of the population images z (`population`, a boolean mask over the N
    images) that x beats, p(x|target) / p(x) >= gamma * p(z|target) / p(z).

    `target`: the audited classifier's true-class probability per image (N,); `references`: the same for each
    reference model (K, N); `memberships` as for `lira_scores`."""
    target, references = np.asarray(target, np.float64), np.asarray(references, np.float64)
    if online:
        marginal = references.mean(axis=0)
    else:
        marginal = ((1 + offline_a) * _masked_mean(references, ~memberships) + (1 - offline_a)) / 2
    ratio = target / np.maximum(marginal, np.finfo(np.float64).tiny)
    others = np.sort(ratio[population])
    if len(others) == 0:
        raise ValueError("RMIA compares each image with population images: give at least one")
    share = np.searchsorted(others, ratio / gamma, side="right") / len(others)
    # The share moves in steps of 1/|population|, so a small population ties many images (all the members that beat
    # every z, say), and a tie spans FPRs the audit could otherwise resolve. Within a step, order images by their own
    # ratio, of which the share is a monotone function: the share is kept to within half a step.
    rank = np.argsort(np.argsort(ratio, kind="stable"), kind="stable")
    return share + rank / (2 * len(ratio) * len(others))


@lru_cache(maxsize=256)  # scipy builds a distribution object per call; audits ask for the same few again and again
def chance_tpr(members: int, non_members: int, false_positives: int, quantile: float | None = None) -> float:
    """The TPR a score with no membership signal gets at the threshold that admits `false_positives` of the
    non-members: on average (`quantile` None) or the given quantile over audits of these sizes.

    With exchangeable scores, the share of the score range above the (k+1)-th highest of n non-members is
    Beta(k+1, n-k) distributed and each member lands there independently, so the member count is beta-binomial."""
    k, n = false_positives, non_members
    if quantile is None:
        return (k + 1) / (n + 1)
    try:
        from scipy.stats import betabinom
    except ImportError:
        raise MissingExtraError('the privacy audit needs scikit-learn (and its scipy), which is not installed: '
                                'pip install "streamsynth[audit]"') from None
    return float(betabinom(members, k + 1, n - k).ppf(quantile)) / members


@dataclass
class OperatingPoint:
    """The attack's TPR at the highest threshold whose FPR is at most `fpr_bound` (fractions in [0, 1])."""

    fpr_target: float  # the FPR asked for (0.001, 0.01)
    fpr_bound: float  # the FPR this audit can resolve at or below it: the target, or 1/non-members if that is larger
    false_positives: int  # non-members admitted at that bound
    tpr: float
    chance_mean: float  # the TPR of a score with no membership signal, on average
    chance_95: float  # ... and its 95% quantile

    @property
    def resolved(self) -> bool:
        """False when the target FPR is below 1/non-members, the smallest non-zero FPR of this audit."""
        return self.fpr_bound <= self.fpr_target

    def label(self) -> str:
        if self.resolved:
            return f"FPR <= {100 * self.fpr_target:g}%"
        return f"FPR <= 1/{round(1 / self.fpr_bound)}"


@dataclass
class AttackResult:
    """One attack's figures on one audit: AUC, TPR at low FPRs, and the ROC curve (scikit-learn's, thinned to its
    corners)."""

    attack: str
    auc: float
    points: list[OperatingPoint]
    roc_fpr: list[float] = field(default_factory=list)
    roc_tpr: list[float] = field(default_factory=list)

    def point(self, fpr_target: float) -> OperatingPoint:
        return next(p for p in self.points if p.fpr_target == fpr_target)


def evaluate_attack(attack: str, scores: np.ndarray, is_member: np.ndarray,
                    fpr_targets: tuple[float, ...] = FPR_TARGETS) -> AttackResult:
    """The figures of `scores` (higher: more likely a member) against the truth `is_member` (booleans)."""
    metrics = sklearn_metrics()
    is_member = np.asarray(is_member, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    members, non_members = int(is_member.sum()), int((~is_member).sum())
    if members == 0 or non_members == 0:
        raise ValueError("an attack is judged on at least one member and one non-member")
    fpr, tpr, _ = metrics.roc_curve(is_member, scores, drop_intermediate=False)
    points = []
    for target in fpr_targets:
        allowed = max(1, math.floor(target * non_members + 1e-9))  # at least one: FPR 1/n is the finest step
        bound = allowed / non_members
        points.append(OperatingPoint(
            fpr_target=target, fpr_bound=bound if bound > target else target, false_positives=allowed,
            tpr=float(tpr[fpr <= bound + 1e-12].max()),
            chance_mean=chance_tpr(members, non_members, allowed),
            chance_95=chance_tpr(members, non_members, allowed, 0.95),
        ))
    # The operating points above need every threshold; the stored curve only its corners.
    corners_fpr, corners_tpr, _ = metrics.roc_curve(is_member, scores)
    return AttackResult(attack, float(metrics.auc(fpr, tpr)), points,
                        [round(float(v), 6) for v in corners_fpr], [round(float(v), 6) for v in corners_tpr])


def auc_chance_95(members: int, non_members: int) -> float:
    """95% of no-signal audits of these sizes have an AUC below this (normal approximation of Mann-Whitney's U)."""
    return 0.5 + 1.645 * math.sqrt((members + non_members + 1) / (12 * members * non_members))
