"""Image statistics and the standard transforms, at the bottom of the package so that any layer can use them.

The stream hands out uint8 CHW tensors; these transforms take them (or PIL images, where noted) to what
torchvision's classifiers eat.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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


@dataclass(frozen=True)
class BatchAugment:
    """Random resized crop, horizontal flip and normalisation of a whole uint8 batch at once, each image under its
    own seed.

    The crop box follows torchvision's `RandomResizedCrop` (area uniform in `scale`, aspect ratio log-uniform in
    `ratio`, ten tries, then a centre crop), drawn from a generator seeded per image rather than from torch's global
    RNG, so no RNG state is saved and restored per image. The resize is bilinear as `interpolate` computes it on the
    crop (`align_corners=False`, no antialiasing: crops are mostly enlarged). On a GPU it is done for the whole
    batch at once by two row and two column lookups (`index_select`) and two blends; on a CPU by PyTorch's fused
    uint8 kernel per image, which is faster there. Flips and the normalisation are batched everywhere. `reference`
    makes one image with torchvision's functional ops from the same box: the batched resize agrees with it to float
    rounding, the uint8 one to one grey level (tested). Replayed uses of a group differ only in their seeds: k uses
    are k calls on the same uint8 tensor.
    """

    size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD

    def params(self, seed: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flipped) of the image with this seed."""
        generator = torch.Generator().manual_seed(seed)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u_area, u_ratio, u_top, u_left = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
                break
        else:  # the centre crop torchvision falls back to
            w, h = width, height
            if width / height < min(self.ratio):
                h = round(width / min(self.ratio))
            elif width / height > max(self.ratio):
                w = round(height * max(self.ratio))
            top, left = (height - h) // 2, (width - w) // 2
        flipped = self.flip and torch.rand(1, generator=generator).item() < 0.5
        return top, left, h, w, flipped

    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float (B, 3, size, size), on the images' device."""
        height, width = images.shape[-2:]
        boxes = [self.params(seed, height, width) for seed in seeds]
        if images.device.type == "cpu":
            with one_thread():
                return self._normalize(self._crop_each(images, boxes))
        return self._normalize(self._crop_batched(images, torch.tensor(boxes, device=images.device)))

    def _crop_each(self, images: torch.Tensor, boxes: list[tuple]) -> torch.Tensor:
        # On a CPU, PyTorch's fused uint8 bilinear kernel, called per image, beats batched lookups of float rows
        # and columns (measured: about 0.5 against 6 ms per 224-pixel image on one core), and keeps the crops uint8.
        from torchvision.transforms.v2 import functional as F

        crops = [F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=False)
                 for image, (top, left, h, w, _) in zip(images, boxes)]
        return torch.stack([crop.flip(-1) if box[4] else crop for crop, box in zip(crops, boxes)])

    def _crop_batched(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        # On a GPU, one pass for the whole batch: each output row and column is a blend of two source rows and
        # columns of the image's crop, looked up with index_select; a flipped image reads its columns backwards.
        batch, channels, height, width = images.shape
        top, left, box_h, box_w, flipped = boxes.unbind(1)
        offsets = torch.arange(batch, device=images.device)[:, None]
        y0, y1, wy = _bilinear_taps(top, box_h, self.size)
        slabs = images.permute(0, 2, 1, 3).reshape(batch * height, channels, width)
        low, high = (slabs.index_select(0, (offsets * height + y).flatten()).float() for y in (y0, y1))
        rows = torch.lerp(low, high, wy.reshape(-1, 1, 1)).view(batch, self.size, channels, width)
        x0, x1, wx = _bilinear_taps(left, box_w, self.size)
        x0, x1, wx = (torch.where(flipped.bool()[:, None], t.flip(-1), t) for t in (x0, x1, wx))
        slabs = rows.permute(0, 3, 1, 2).reshape(batch * width, self.size * channels)
        low, high = (slabs.index_select(0, (offsets * width + x).flatten()) for x in (x0, x1))
        columns = torch.lerp(low, high, wx.reshape(-1, 1)).view(batch, self.size, self.size, channels)
        return columns.permute(0, 3, 2, 1)  # (B, C, row, column)

    def reference(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """One image the plain way: torchvision's `resized_crop` and `hflip` from the same box, then normalised."""
        from torchvision.transforms.v2 import functional as F

        top, left, box_h, box_w, flipped = self.params(seed, *image.shape[-2:])
        out = F.resized_crop(image.float(), top, left, box_h, box_w, [self.size, self.size], antialias=False)
        return self._normalize((F.hflip(out) if flipped else out)[None])[0]

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """x / 255, then (x - mean) / std: one float copy, then a multiply and an add in place."""
        out = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if self.mean is None:
            return out.div_(255)
        std = torch.tensor(self.std, device=images.device)[:, None, None]
        mean = torch.tensor(self.mean, device=images.device)[:, None, None]
        return out.mul_(1 / (255 * std)).sub_(mean / std)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on the calling thread only, then restore the thread count. Per-image crops of a few hundred KB gain nothing from intra-op
    threads, whose spin-waits cost more CPU than the work (measured on 2 shared cores: 1.0 ms of CPU per 224-pixel
    image on one thread, 14 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _bilinear_taps(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Per image and output position along one axis: the two source indices and the weight of the second, as
    `interpolate(mode="bilinear", align_corners=False)` computes them on the crop [start, start + length)."""
    scale = (length.float() / size)[:, None]
    source = ((torch.arange(size, device=start.device) + 0.5) * scale - 0.5).clamp(min=0)
    last = (length - 1)[:, None]
    low = torch.minimum(source.long(), last)
    high = torch.minimum(low + 1, last)
    return start[:, None] + low, start[:, None] + high, source - low
