"""The classifier checkpoint: what train.py writes and what evaluation and the privacy audit read back.

A checkpoint is a `torch.save`d dict, loadable with `torch.load(weights_only=True)` (so only tensors and plain Python
values in it). Required fields:

    model        the state_dict of the unwrapped model (not of its DDP or torch.compile wrapper)
    arch         a torchvision (or timm) classification model name, e.g. "resnet50"
    num_classes  the size of the output layer
    class_ids    the class ids of the outputs, in label order (the caption store's class order)

Optional: `image_size` (the training resolution; evaluation crops to it, default 224) and anything else train.py
wants to keep (epoch, optimizer state, the stream's `describe()`), as long as it is weights_only-loadable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

REQUIRED_FIELDS = ("model", "arch", "num_classes", "class_ids")
DEFAULT_IMAGE_SIZE = 224


def sgd_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """The training recipe's optimizer: SGD with Nesterov momentum 0.9."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def default_warmup(steps: int) -> int:
    """The recipe's warmup when none is given: 2% of the steps, at least one."""
    return max(1, steps // 50)


def learning_rate(step: int, steps: int, peak: float, warmup_steps: int, schedule: str = "cosine") -> float:
    """The recipe's learning rate at `step` of `steps`: a linear warmup to `peak` over `warmup_steps`, then a cosine
    decay to zero, or (`schedule="step"`) x0.1 at 1/3, 2/3 and 8/9 of the steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "step":
        return peak * 0.1 ** sum(step >= steps * f for f in (1 / 3, 2 / 3, 8 / 9))
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier with `num_classes` outputs: a torchvision model, else a timm one."""
    import torchvision

    if arch in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and arch in timm.list_models():
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    raise ValueError(
        f"unknown classifier architecture {arch!r}: use a torchvision classification model (e.g. resnet50, "
        "vit_b_16; see torchvision.models.list_models()) or a timm model name"
    )


def classifier_checkpoint(model: nn.Module, arch: str, class_ids: Sequence[str], **extra) -> dict:
    """The checkpoint dict for `model`; `extra` (e.g. image_size, epoch) is stored alongside."""
    return {
        "model": model.state_dict(),
        "arch": arch,
        "num_classes": len(class_ids),
        "class_ids": list(class_ids),
        **extra,
    }


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model of a checkpoint, on `device` and in eval mode, and the checkpoint dict itself."""
    from .checkpoints import CheckpointError, describe_state_mismatch, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist: give the file train.py wrote")
    checkpoint = read_checkpoint(path)  # weights_only: a malicious pickle is refused, never run
    missing = [f for f in REQUIRED_FIELDS if f not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks the checkpoint fields {missing}: write it with "
                              "streamsynth.classifier_checkpoint")
    if not isinstance(checkpoint["class_ids"], (list, tuple)) or checkpoint["num_classes"] != len(checkpoint["class_ids"]):
        raise CheckpointError(f"{path}: num_classes is {checkpoint['num_classes']!r} but class_ids is "
                              f"{checkpoint['class_ids']!r:.80}")
    model = build_classifier(checkpoint["arch"], checkpoint["num_classes"])
    mismatch = describe_state_mismatch(model, checkpoint["model"])
    if mismatch:
        raise CheckpointError(
            f"{path}: its weights do not fit a {checkpoint['arch']} with {checkpoint['num_classes']} classes "
            f"(save the unwrapped model's state_dict, not a DDP or compiled wrapper's): {mismatch}"
        )
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: its weights do not load ({str(err).splitlines()[0][:200]})") from None
    return model.to(device).eval(), checkpoint
