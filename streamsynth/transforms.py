"""Image statistics and the standard transforms, at the bottom of the package so that any layer can use them.

The stream hands out uint8 CHW tensors; these transforms take them (or PIL images, where noted) to what
torchvision's classifiers eat.
"""

from __future__ import annotations

from typing import Callable

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_transform() -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image → float, normalised with ImageNet statistics: the stream's default, with no augmentation."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(image_size: int, from_pil: bool = False) -> Callable:
    """Standard ImageNet training augmentation (random resized crop, flip), then float and normalise.

    Applied afresh to every (re)use of an image; `from_pil` for datasets that hand out PIL images (ImageFolder).
    """
    from torchvision.transforms import v2

    return v2.Compose([
        *([v2.ToImage()] if from_pil else []),
        v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
