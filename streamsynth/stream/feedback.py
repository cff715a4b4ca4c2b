"""Feedback-driven sampling: draw more samples of the classes the classifier finds hard.

The trainer reports each sample's loss; at every epoch start the loader turns the running per-class mean loss into
class weights for that epoch:

    w_c = floor / K + (1 - floor) * L_c^power / sum_k L_k^power

so a share `floor` of every epoch is spread evenly over the K classes (no class is ever starved) and the rest follows
the loss. Weights change only at epoch boundaries and are saved with the loader's state, so a sample stays a pure
function of (seed, sample id, its epoch's weights) and resume stays exact.
"""

from __future__ import annotations

import torch


class ClassFeedback:
    """Per-class running loss, turned into sampling weights. Under DDP the counts are summed over ranks."""

    def __init__(self, num_classes: int, floor: float = 0.5, power: float = 1.0, momentum: float = 0.5):
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be in (0, 1] (the evenly spread share of each epoch), got {floor}")
        self.num_classes, self.floor, self.power, self.momentum = num_classes, floor, power, momentum
        self.loss_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mean_loss: torch.Tensor | None = None  # running per-class mean, across epochs

    @torch.no_grad()
    def update(self, losses: torch.Tensor, labels: torch.Tensor) -> None:
        """Record per-sample losses (unreduced cross-entropy) of one batch."""
        labels = labels.detach().cpu()
        self.loss_sum.index_add_(0, labels, losses.detach().double().cpu())
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def _synchronize(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # NCCL reduces only CUDA tensors; gloo takes CPU ones.
            nccl = torch.distributed.get_backend() == "nccl"
            both = torch.stack([self.loss_sum, self.count])
            both = both.to(torch.device("cuda", torch.cuda.current_device())) if nccl else both
            torch.distributed.all_reduce(both)
            self.loss_sum, self.count = both[0].to("cpu", copy=True), both[1].to("cpu", copy=True)

    def next_weights(self) -> list[float] | None:
        """Fold this epoch's losses into the running mean and return next epoch's weights (None before any loss)."""
        self._synchronize()
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
        hardness = self.mean_loss.clamp(min=1e-8) ** self.power
        weights = self.floor / self.num_classes + (1 - self.floor) * hardness / hardness.sum()
        return weights.tolist()

    def state_dict(self) -> dict:
        mean_loss = None if self.mean_loss is None else self.mean_loss.clone()
        return {"loss_sum": self.loss_sum.clone(), "count": self.count.clone(), "mean_loss": mean_loss}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum, self.count = state["loss_sum"].clone(), state["count"].clone()
        self.mean_loss = None if state["mean_loss"] is None else state["mean_loss"].clone()
