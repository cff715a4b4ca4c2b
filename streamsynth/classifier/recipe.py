"""train.py's training recipe for classifiers trained inside another job: the privacy audit's shadow models and the
digits benchmarks' classifiers.

The recipe is train.py's: `build_classifier(arch)`, SGD with Nesterov momentum (`sgd_optimizer`), a linear warmup
then cosine (or step) decay (`learning_rate`), cross-entropy with label smoothing. What it trains on is the caller's:
any iterator of (images, labels, ...) batches, already augmented.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError
from .models import DEFAULT_IMAGE_SIZE, build_classifier, default_warmup, learning_rate, sgd_optimizer

# train.py's defaults, for a checkpoint that does not record its training arguments.
DEFAULT_WEIGHT_DECAY = 5e-5
DEFAULT_LABEL_SMOOTHING = 0.1


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that decides how a classifier is trained, except its data and seed."""

    arch: str
    num_classes: int
    image_size: int
    steps: int
    batch_size: int  # images per optimizer step
    peak_lr: float  # the learning rate at the end of warmup (train.py: --lr x batch size / 256)
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING
    warmup_steps: int | None = None  # None: 2% of the steps, as train.py
    lr_schedule: str = "cosine"

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else default_warmup(self.steps)

    def describe(self) -> str:
        return (f"{self.arch} at {self.image_size} px, {self.steps} steps of batch {self.batch_size}, peak lr "
                f"{self.peak_lr:.4g}, {self.lr_schedule}, label smoothing {self.label_smoothing:g}")

    def as_dict(self) -> dict:
        return asdict(self)


def recipe_from_checkpoint(
    checkpoint: Mapping, path: str = "the checkpoint", steps: int | None = None, batch_size: int | None = None,
    lr: float | None = None, image_size: int | None = None,
) -> TrainingRecipe:
    """The recipe a checkpoint was trained with: its architecture and image size, and the steps, batch size and
    learning rate train.py recorded (its resolved settings, `config`; before version 0.2 its flags, `args`); `steps`,
    `batch_size` and `lr` (peak for batch 256, scaled linearly with the batch size as train.py's --lr-base) override
    them. A checkpoint without recorded settings needs all three overrides."""
    config = checkpoint.get("config")
    recorded = config or checkpoint.get("args") or {}
    # One optimizer step of train.py sees batch_size x accum_steps images on each of its ranks (one data state each).
    ranks = len(checkpoint.get("data") or [None])
    recorded_batch = (recorded["batch_size"] * recorded.get("accum_steps", 1) * ranks
                      if recorded.get("batch_size") else None)
    recorded_lr = recorded.get("lr")
    if config and recorded_lr and recorded_batch:
        # `config` holds the peak learning rate of the run's own batch; the recipe's rate is per 256 images.
        recorded_lr = recorded_lr * 256 / recorded_batch
    chosen = {"steps": steps or recorded.get("steps"), "batch size": batch_size or recorded_batch,
              "lr": lr or recorded_lr}
    missing = [name for name, value in chosen.items() if not value]
    if missing:
        raise CheckpointError(
            f"{path} does not record its training {', '.join(missing)} (it was not written by train.py): give "
            "--shadow-steps, --shadow-batch-size and --shadow-lr, the settings it was trained with"
        )
    batch = int(chosen["batch size"])
    return TrainingRecipe(
        arch=checkpoint["arch"], num_classes=int(checkpoint["num_classes"]),
        image_size=image_size or int(checkpoint.get("image_size") or DEFAULT_IMAGE_SIZE),
        steps=int(chosen["steps"]), batch_size=batch, peak_lr=float(chosen["lr"]) * batch / 256,
        weight_decay=float(recorded.get("weight_decay", DEFAULT_WEIGHT_DECAY)),
        label_smoothing=float(recorded.get("label_smoothing", DEFAULT_LABEL_SMOOTHING)),
        # A recorded warmup belongs to the recorded number of steps; with other steps, take 2% of those.
        warmup_steps=recorded.get("warmup_steps") if not steps or steps == recorded.get("steps") else None,
        lr_schedule=recorded.get("lr_schedule", "cosine"),
    )


def train_classifier(recipe: TrainingRecipe, batches: Iterable[tuple], seed: int = 0,
                     device: torch.device | str = "cpu",
                     watch: Callable[[nn.Module], None] | None = None,
                     report: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> nn.Module:
    """A classifier trained by `recipe` on `recipe.steps` batches of `batches` ((images, labels, ...) tuples), its
    initialisation seeded with `seed`; returned in eval mode.

    For steering by the learner: `watch(model)` is called with the new model before the first batch, and
    `report(losses, labels, sample_ids)` with every batch's per-sample losses (batches then carry their sample ids
    third)."""
    torch.manual_seed(seed)
    model = build_classifier(recipe.arch, recipe.num_classes).to(device)
    if watch is not None:
        watch(model)
    optimizer = sgd_optimizer(model, recipe.peak_lr, recipe.weight_decay)
    model.train()
    iterator = iter(batches)
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.steps, recipe.peak_lr, recipe.warmup, recipe.lr_schedule)
        batch = next(iterator)
        labels = batch[1].to(device)
        losses = F.cross_entropy(model(batch[0].to(device)), labels, label_smoothing=recipe.label_smoothing,
                                 reduction="none")
        if report is not None:
            report(losses.detach(), labels, batch[2])
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
    return model.eval()
