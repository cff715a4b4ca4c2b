"""Membership inference: can an attacker tell the classifier's training images from images it never saw?

Two audits over ImageFolders of members (training images) and non-members:

- `audit_membership`, the method paper's: the classic confidence threshold. Call an image a member when the model's
  softmax confidence in its true class is at least t; report the best balanced accuracy over every t (the attacker
  is handed the best threshold, so this is an upper bound for this attack) and the threshold-free ROC AUC. Kept for
  comparison with the paper; 50% means the two sets are indistinguishable by confidence.
- `audit_with_shadow_models`, today's standard: LiRA and RMIA (`attacks`), calibrated by shadow models trained with
  the audited classifier's recipe on a population of real images (`shadows`), judged by the TPR at 0.1% and 1% FPR
  and the ROC AUC.

Even without leakage, the best of many thresholds on finite samples beats 50% a little. For m members and n
non-members drawn from one distribution, that maximum is a one-sided two-sample Kolmogorov-Smirnov statistic, so
the best balanced accuracy is about 0.5 + 0.31 * sqrt(1/m + 1/n) on average and below 0.5 + 0.61 * sqrt(1/m + 1/n)
in 95% of audits (asymptotic; ties only make it smaller). The report gives both, so a reader can tell a small
leak from sampling noise; the reference audit gives the same for each TPR (`attacks.chance_tpr`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..transforms import train_transform
from .attacks import (FPR_TARGETS, AttackResult, auc_chance_95, evaluate_attack, lira_scores, rmia_scores,
                      sklearn_metrics)
from .evaluate import (EvalFolderError, ImagesOrReasons, LabelledImageFolder, check_eval_folder, eval_transform,
                       images_loader, scoring_loader, suite_folder_labels, warn_unreadable)
from .recipe import TrainingRecipe
from .shadows import (check_shadow_count, endless_batches, loader_signals, shadow_memberships, train_shadow_models,
                      true_class_signals)

log = logging.getLogger(__name__)

# sup of a Brownian bridge, P(sup > x) = exp(-2 x^2): its mean sqrt(pi/8) and its 95% quantile sqrt(ln(20)/2),
# halved because balanced accuracy is 0.5 + (TPR - FPR) / 2.
_CHANCE_MEAN = math.sqrt(math.pi / 8) / 2
_CHANCE_95 = math.sqrt(math.log(20) / 2) / 2


@dataclass
class MembershipAudit:
    """The result of a threshold attack; accuracies and AUC are fractions in [0, 1]."""

    members: int
    non_members: int
    balanced_accuracy: float  # best over all thresholds
    threshold: float  # the true-class confidence that achieves it ("member" if confidence >= threshold)
    auc: float
    member_mean_confidence: float
    non_member_mean_confidence: float
    unreadable: list[str] = field(default_factory=list)  # "path: reason" of images that could not be scored

    @property
    def chance_mean(self) -> float:
        """The best balanced accuracy a no-leakage audit of these sizes gets on average."""
        return 0.5 + _CHANCE_MEAN * math.sqrt(1 / self.members + 1 / self.non_members)

    @property
    def chance_95(self) -> float:
        """95% of no-leakage audits of these sizes score below this."""
        return 0.5 + _CHANCE_95 * math.sqrt(1 / self.members + 1 / self.non_members)

    def report(self) -> str:
        if self.balanced_accuracy <= self.chance_95:
            verdict = "no measurable leakage: within what chance gives for sets of these sizes"
        else:
            verdict = "LEAKAGE: the model is measurably more confident on its training images"
        return "\n".join([
            f"membership inference, confidence-threshold attack ({self.members} members, "
            f"{self.non_members} non-members; the method paper's figures)",
            f"  best balanced accuracy  {100 * self.balanced_accuracy:6.2f}%  (at true-class confidence >= "
            f"{self.threshold:.4g})",
            f"  ROC AUC                 {100 * self.auc:6.2f}%",
            f"  mean true-class confidence: members {self.member_mean_confidence:.4f}, "
            f"non-members {self.non_member_mean_confidence:.4f}",
            f"  chance, for these sizes: {100 * self.chance_mean:.1f}% on average, below {100 * self.chance_95:.1f}% "
            "in 95% of audits",
            f"  verdict: {verdict}",
            *([f"  {len(self.unreadable)} unreadable images were left out, e.g. {self.unreadable[0]}"]
              if self.unreadable else []),
            "  How to read it: 50% means an attacker cannot tell training images from unseen ones by the model's "
            "confidence; 100% means every training image is exposed. See docs/privacy.md.",
        ])


def threshold_attack(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[float, float, float]:
    """(best balanced accuracy, its threshold, ROC AUC) of "member if score >= threshold", over all thresholds."""
    member_scores = np.asarray(member_scores, dtype=np.float64)
    non_member_scores = np.asarray(non_member_scores, dtype=np.float64)
    if len(member_scores) == 0 or len(non_member_scores) == 0:
        raise ValueError("the attack needs at least one member and one non-member score")
    metrics = sklearn_metrics()
    scores = np.concatenate([member_scores, non_member_scores])
    is_member = np.concatenate([np.ones(len(member_scores), bool), np.zeros(len(non_member_scores), bool)])
    # Every distinct score is a threshold (the first, infinity, admits nothing): balanced accuracy at each of them.
    fpr, tpr, thresholds = metrics.roc_curve(is_member, scores, drop_intermediate=False)
    balanced = (tpr + 1 - fpr) / 2
    best = int(np.argmax(balanced))
    return float(balanced[best]), float(thresholds[best]), float(metrics.auc(fpr, tpr))


def _labelled_folder(
    root: str | os.PathLike, class_ids: Sequence[str], transform: Callable | None, role: str
) -> LabelledImageFolder:
    folder_labels, skipped = suite_folder_labels(root, class_ids, None, role)
    if not folder_labels:
        raise EvalFolderError(
            f"no class folder of {role} folder {root} is a class of the classifier: name class folders by the "
            f"checkpoint's class ids (e.g. {list(class_ids[:3])})"
        )
    check_eval_folder(root, role, class_ids)  # no empty or unreadable class folder
    if skipped:
        log.warning("%s: skipping %d class folders the classifier does not know: %s", role, len(skipped), skipped[:5])
    return LabelledImageFolder(root, folder_labels, transform)


@torch.no_grad()
def _log_confidence(model: nn.Module, loader: Iterable, device: torch.device | str,
                    unreadable: list[str]) -> np.ndarray:
    """log softmax probability of each readable image's true class; the reasons of the others go to `unreadable`."""
    scores = [np.empty(0)]
    for images, labels, reasons in tqdm(loader, leave=False, disable=None):
        unreadable.extend(reasons)
        if images is not None:
            scores.append(true_class_signals(model, images.to(device), labels)[0])
    return np.concatenate(scores)


def audit_membership(
    model: nn.Module,
    members: str | os.PathLike,
    non_members: str | os.PathLike,
    class_ids: Sequence[str],
    transform: Callable | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    workers: int = 4,
) -> MembershipAudit:
    """Runs the confidence-threshold attack with the ImageFolders `members` (training images) and `non_members`.

    Class folders are mapped to the model's labels as in evaluation; folders of classes the model lacks are
    skipped (their true-class confidence does not exist). The model's train/eval mode is restored.
    """
    transform = transform or eval_transform()
    datasets = [_labelled_folder(root, class_ids, transform, role)
                for root, role in [(members, "members"), (non_members, "non-members")]]
    was_training = model.training
    model.eval()
    unreadable: list[str] = []
    try:
        member_scores, non_member_scores = [
            _log_confidence(model, scoring_loader(d, batch_size, workers), device, unreadable) for d in datasets
        ]
    finally:
        model.train(was_training)
    warn_unreadable("audit-privacy", unreadable)
    for scores, root, role in [(member_scores, members, "members"), (non_member_scores, non_members, "non-members")]:
        if len(scores) == 0:
            raise EvalFolderError(f"no image of the {role} folder {root} could be read ({len(unreadable)} unreadable, "
                                  f"e.g. {unreadable[0] if unreadable else '-'}); the audit needs both sets")
    balanced, log_threshold, auc = threshold_attack(member_scores, non_member_scores)
    return MembershipAudit(
        members=len(member_scores),
        non_members=len(non_member_scores),
        balanced_accuracy=balanced,
        threshold=math.exp(log_threshold),
        auc=auc,
        member_mean_confidence=float(np.exp(member_scores).mean()),
        non_member_mean_confidence=float(np.exp(non_member_scores).mean()),
        unreadable=unreadable,
    )


# ----- the reference audit: LiRA and RMIA with shadow models -----------------------------------------------------


def membership_attacks(
    target_log_confidence: np.ndarray, target_logit_confidence: np.ndarray, reference_log_confidence: np.ndarray,
    reference_logit_confidence: np.ndarray, memberships: np.ndarray, audited: np.ndarray, is_member: np.ndarray,
    online: bool, fpr_targets: tuple[float, ...] = FPR_TARGETS,
) -> list[AttackResult]:
    """The confidence threshold, LiRA and RMIA, judged on the audited images of the pool.

    Per pool image (N): the audited classifier's log true-class confidence and its logit, log(p / (1 - p)); per
    reference model and image (K, N): the same; `memberships` (K, N): which images each reference model trained on;
    `audited` (N booleans): the audited images, the others being the population; `is_member`: the truth for the
    audited images, in pool order; `fpr_targets`: the FPRs to report the TPR at."""
    mode = "online" if online else "offline"
    audited = np.asarray(audited, dtype=bool)
    lira = lira_scores(target_logit_confidence, reference_logit_confidence, memberships, online)
    rmia = rmia_scores(np.exp(target_log_confidence), np.exp(reference_log_confidence), memberships, online,
                       population=~audited)
    return [evaluate_attack("confidence threshold", target_log_confidence[audited], is_member, fpr_targets),
            evaluate_attack(f"LiRA ({mode})", lira[audited], is_member, fpr_targets),
            evaluate_attack(f"RMIA ({mode})", rmia[audited], is_member, fpr_targets)]


@dataclass
class ReferenceAudit:
    """LiRA and RMIA against one classifier, with what the shadow models were and what they cost."""

    online: bool
    shadow_models: int
    recipe: dict  # `TrainingRecipe.as_dict()`
    members: int
    non_members: int
    population: int
    attacks: list[AttackResult]
    seconds: float  # training and scoring the shadow models
    unreadable: list[str] = field(default_factory=list)

    @property
    def auc_chance_95(self) -> float:
        return auc_chance_95(self.members, self.non_members)

    def report(self) -> str:
        recipe = TrainingRecipe(**self.recipe)
        pool = self.population + (self.members + self.non_members if self.online else 0)
        points = self.attacks[0].points
        header = f"  {'attack':<24}" + "".join(f"{'TPR at ' + p.label():>22}" for p in points) + f"{'ROC AUC':>10}"
        rows = [f"  {a.attack:<24}" + "".join(f"{100 * p.tpr:21.2f}%" for p in a.points) + f"{100 * a.auc:9.1f}%"
                for a in self.attacks]
        rows.append(f"  {'chance (no signal)':<24}" + "".join(f"{100 * p.chance_mean:21.2f}%" for p in points)
                    + f"{50:9.1f}%")
        rows.append(f"  {'  95% of audits below':<24}" + "".join(f"{100 * p.chance_95:21.2f}%" for p in points)
                    + f"{100 * self.auc_chance_95:9.1f}%")
        unresolved = [p for p in points if not p.resolved]
        lowest = [a for a in self.attacks if a.points[0].tpr > a.points[0].chance_95]
        verdict = (f"LEAKAGE: {', '.join(a.attack for a in lowest)} identify members at {points[0].label()} above "
                   "what chance gives" if lowest else
                   f"no measurable leakage at {points[0].label()}: every attack is within what chance gives")
        return "\n".join([
            f"membership inference with {self.shadow_models} shadow models, {'online' if self.online else 'offline'}"
            f" ({self.members} members, {self.non_members} non-members, {self.population} population images)",
            f"  each shadow model: {recipe.describe()}",
            f"  trained on a random half of {pool} images ("
            + (f"each audited image in {self.shadow_models // 2} of them)" if self.online
               else "the population only)"),
            f"  cost: {self.shadow_models} models trained and scored in {self.seconds:.0f} s",
            header, *rows,
            *([f"  {100 * p.fpr_target:g}% FPR is below what {self.non_members} non-members resolve (the smallest "
               f"non-zero FPR is 1/{self.non_members}): that column is TPR at {p.label()}" for p in unresolved]),
            f"  verdict: {verdict}",
            *([f"  {len(self.unreadable)} unreadable images were left out, e.g. {self.unreadable[0]}"]
              if self.unreadable else []),
            "  How to read it: TPR at a low FPR is the share of training images an attacker identifies while wrongly "
            "accusing almost no one; without leakage it equals the FPR. See docs/privacy.md.",
        ])


def _collate_with_mask(items: list) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[str]]:
    """(the usable images stacked, their labels, which items were usable, the reasons of the others)."""
    usable = torch.tensor([image is not None for image, _, _ in items])
    images = [image for image, _, _ in items if image is not None]
    labels = torch.tensor([label for image, label, _ in items if image is not None], dtype=torch.int64)
    return (torch.stack(images) if images else None), labels, usable, [r for *_, r in items if r]


def _collate_readable(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: every image was readable when the pool was first scored; one that no longer is fails."""
    for image, _, reason in items:
        if image is None:
            raise EvalFolderError(f"{reason} (it was readable when the audit started)")
    return torch.stack([image for image, _, _ in items]), torch.tensor([label for _, label, _ in items])


@torch.no_grad()
def _readable_signals(model: nn.Module, samples: list, transform: Callable, device: torch.device | str,
                      batch_size: int, workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The model's log confidence and its logit per readable image of `samples`, which images were readable, and
    the reasons of the others."""
    loader = images_loader(ImagesOrReasons(samples, transform), batch_size, workers, what="scoring the audited images",
                           collate=_collate_with_mask)
    log_p, logit, readable, reasons = [np.empty(0)], [np.empty(0)], [], []
    for images, labels, usable, why in tqdm(loader, leave=False, disable=None):
        readable.append(usable.numpy())
        reasons.extend(why)
        if images is not None:
            batch_log_p, batch_logit = true_class_signals(model, images.to(device), labels)
            log_p.append(batch_log_p)
            logit.append(batch_logit)
    return np.concatenate(log_p), np.concatenate(logit), np.concatenate(readable), reasons


def audit_with_shadow_models(
    model: nn.Module,
    recipe: TrainingRecipe,
    members: str | os.PathLike,
    non_members: str | os.PathLike,
    population: str | os.PathLike,
    class_ids: Sequence[str],
    *,
    shadow_models: int = 8,
    online: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    workers: int = 4,
    progress: Callable[[str], None] | None = None,
) -> ReferenceAudit:
    """LiRA and RMIA against `model` on the ImageFolders `members` and `non_members`, with `shadow_models` shadow
    models trained by `recipe` on halves of the ImageFolder `population` (online: and of the audited images), with
    train.py's real-image augmentation. The model's train/eval mode is restored."""
    check_shadow_count(shadow_models, online)  # before any image is read
    folders = [_labelled_folder(root, class_ids, None, role)
               for root, role in [(population, "population"), (members, "members"), (non_members, "non-members")]]
    samples = [sample for folder in folders for sample in folder.samples]
    role = np.repeat([0, 1, 2], [len(folder.samples) for folder in folders])  # population, member, non-member
    view = eval_transform(recipe.image_size)
    was_training = model.training
    model.eval()
    try:
        target_log_p, target_logit, readable, unreadable = _readable_signals(model, samples, view, device,
                                                                              batch_size, workers)
    finally:
        model.train(was_training)
    warn_unreadable("audit-privacy", unreadable)
    samples, role = [s for s, ok in zip(samples, readable) if ok], role[readable]
    for code, root, what in [(0, population, "population"), (1, members, "members"), (2, non_members, "non-members")]:
        if not (role == code).any():
            raise EvalFolderError(f"no image of the {what} folder {root} could be read; the audit needs all three")
    audited = role > 0
    memberships = shadow_memberships(len(samples), shadow_models, audited, online, seed)
    training_images = ImagesOrReasons(samples, train_transform(recipe.image_size, from_pil=True))
    pool_loader = images_loader(ImagesOrReasons(samples, view), batch_size, workers, what="scoring the shadow pool",
                                collate=_collate_readable)
    shadows = train_shadow_models(
        recipe, memberships,
        batches_of=lambda indices, shadow_seed: endless_batches(training_images, indices, recipe.batch_size,
                                                                shadow_seed, workers, _collate_readable),
        signals_of=lambda shadow: loader_signals(shadow, pool_loader, device),
        seed=seed, device=device, progress=progress,
    )
    attacks = membership_attacks(target_log_p, target_logit, shadows.log_confidence, shadows.logit_confidence,
                                 memberships, audited, role[audited] == 1, online)
    return ReferenceAudit(online=online, shadow_models=shadow_models, recipe=recipe.as_dict(),
                          members=int((role == 1).sum()), non_members=int((role == 2).sum()),
                          population=int((role == 0).sum()), attacks=attacks, seconds=shadows.seconds,
                          unreadable=unreadable)
