"""Feedback-driven sampling: draw more samples of the classes the classifier finds hard.

The trainer reports each sample's loss; at every epoch start the loader turns the running per-class mean loss into
class weights for that epoch:

    w_c = floor / K + (1 - floor) * L_c^power / sum_k L_k^power

so a share `floor` of every epoch is spread evenly over the K classes (no class is ever starved) and the rest follows
the loss. Weights change only at epoch boundaries and are saved with the loader's state, so a sample stays a pure
function of (seed, sample id, its epoch's weights) and resume stays exact. With `prefer="easy"` the weights follow
1 / L_c^power instead: steering towards the classes the learner already knows, the negative control of a steering
measurement.
"""

from __future__ import annotations

import torch

# Which way steering leans: towards what the learner finds hard, or (a negative control) towards what it knows.
PREFER = ("hard", "easy")


def check_prefer(prefer: str) -> None:
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER} (easy: the negative control), got {prefer!r}")


def summed_over_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The CPU tensors summed over the data-parallel ranks (themselves when there is no process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensors
    # NCCL reduces only CUDA tensors; gloo takes CPU ones.
    nccl = torch.distributed.get_backend() == "nccl"
    stacked = torch.stack(tensors)
    stacked = stacked.to(torch.device("cuda", torch.cuda.current_device())) if nccl else stacked
    torch.distributed.all_reduce(stacked)
    return tuple(t.to("cpu", copy=True) for t in stacked)


def check_floor(floor: float, share: str) -> None:
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1] (the evenly spread share {share}), got {floor}")


def floor_mixed(hardness: torch.Tensor, floor: float) -> torch.Tensor:
    """Sampling weights: a share `floor` spread evenly over the entries, the rest in proportion to `hardness`."""
    return floor / len(hardness) + (1 - floor) * hardness / hardness.sum()


class ClassFeedback:
    """Per-class running loss, turned into sampling weights. Under DDP the counts are summed over ranks."""

    def __init__(self, num_classes: int, floor: float = 0.5, power: float = 1.0, momentum: float = 0.5,
                 prefer: str = "hard"):
        check_floor(floor, "of each epoch")
        check_prefer(prefer)
        self.num_classes, self.floor, self.power, self.momentum, self.prefer = num_classes, floor, power, momentum, prefer
        self.loss_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mean_loss: torch.Tensor | None = None  # running per-class mean, across epochs

    @torch.no_grad()
    def update(self, losses: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor | None = None) -> None:
        """Record per-sample losses (unreduced cross-entropy) of one batch (the sample ids, which the caption and
        sample modes take, are not needed: a class is in the label)."""
        labels = labels.detach().cpu()
        self.loss_sum.index_add_(0, labels, losses.detach().double().cpu())
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def next_weights(self) -> list[float] | None:
        """Fold this epoch's losses into the running mean and return next epoch's weights (None before any loss)."""
        self.loss_sum, self.count = summed_over_ranks(self.loss_sum, self.count)
        seen = self.count > 0
        if seen.any():
            epoch_mean = torch.where(seen, self.loss_sum / self.count.clamp(min=1), torch.zeros_like(self.loss_sum))
            if self.mean_loss is None:
                self.mean_loss = torch.where(seen, epoch_mean, epoch_mean[seen].mean())
            else:
                blended = self.momentum * self.mean_loss + (1 - self.momentum) * epoch_mean
                self.mean_loss = torch.where(seen, blended, self.mean_loss)
        self.loss_sum.zero_()
        self.count.zero_()
        if self.mean_loss is None:
            return None
        hardness = self.mean_loss.clamp(min=1e-8) ** (self.power if self.prefer == "hard" else -self.power)
        return floor_mixed(hardness, self.floor).tolist()

    def state_dict(self) -> dict:
        mean_loss = None if self.mean_loss is None else self.mean_loss.clone()
        return {"loss_sum": self.loss_sum.clone(), "count": self.count.clone(), "mean_loss": mean_loss}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum, self.count = state["loss_sum"].clone(), state["count"].clone()
        self.mean_loss = None if state["mean_loss"] is None else state["mean_loss"].clone()
