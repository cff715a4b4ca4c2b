"""Membership inference: can an attacker tell the classifier's training images from images it never saw?

The attack is the classic confidence threshold: call an image a member when the model's softmax confidence in its
true class is at least t. We report the best balanced accuracy over every t (the attacker is handed the best
threshold, so this is an upper bound for this attack) and the threshold-free ROC AUC. 50% means the two sets are
indistinguishable by confidence: no measurable leakage.

Even without leakage, the best of many thresholds on finite samples beats 50% a little. For m members and n
non-members drawn from one distribution, that maximum is a one-sided two-sample Kolmogorov-Smirnov statistic, so
the best balanced accuracy is about 0.5 + 0.31 * sqrt(1/m + 1/n) on average and below 0.5 + 0.61 * sqrt(1/m + 1/n)
in 95% of audits (asymptotic; ties only make it smaller). The report gives both, so a reader can tell a small
leak from sampling noise.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .evaluate import (EvalFolderError, LabelledImageFolder, check_eval_folder, eval_transform, scoring_loader,
                       suite_folder_labels, warn_unreadable)

# sup of a Brownian bridge, P(sup > x) = exp(-2 x^2): its mean sqrt(pi/8) and its 95% quantile sqrt(ln(20)/2),
# halved because balanced accuracy is 0.5 + (TPR - FPR) / 2.
log = logging.getLogger(__name__)

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
            f"{self.non_members} non-members)",
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
    scores = np.concatenate([member_scores, non_member_scores])
    is_member = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    # Lowering the threshold past each distinct score admits all images with that score at once.
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    tpr = np.concatenate([[0.0], np.cumsum(is_member)[last_of_tie] / len(member_scores)])
    fpr = np.concatenate([[0.0], np.cumsum(1 - is_member)[last_of_tie] / len(non_member_scores)])
    thresholds = np.concatenate([[np.inf], scores[last_of_tie]])
    balanced = (tpr + 1 - fpr) / 2
    best = int(np.argmax(balanced))
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return float(balanced[best]), float(thresholds[best]), auc


@torch.no_grad()
def true_class_log_confidence(
    model: nn.Module, loader: DataLoader, device: torch.device | str, unreadable: list[str] | None = None
) -> np.ndarray:
    """log softmax probability of each image's true class. Logs keep members' near-1 confidences distinct.

    `loader` yields (images, labels) or, from `evaluate.scoring_loader`, (images or None, labels, unreadable)."""
    scores = [torch.empty(0)]
    for images, labels, *rest in tqdm(loader, leave=False, disable=None):
        if rest and unreadable is not None:
            unreadable.extend(rest[0])
        if images is None:
            continue
        log_probs = F.log_softmax(model(images.to(device)).float(), dim=1)
        scores.append(log_probs.gather(1, labels.to(log_probs.device)[:, None]).squeeze(1).cpu())
    return torch.cat(scores).numpy()


def _labelled_folder(
    root: str | os.PathLike, class_ids: Sequence[str], transform: Callable, role: str
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
            true_class_log_confidence(model, scoring_loader(d, batch_size, workers), device, unreadable)
            for d in datasets
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
