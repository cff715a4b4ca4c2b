"""`SyntheticStream`: an endless `IterableDataset` of fresh, labelled Stable Diffusion images, never stored.

Order and identity. A rank's epoch is a sequence of batches; batch j of epoch e on rank r holds the sample ids
    ((e * batches_per_epoch + j) * world_size + r) * batch_size + [0, batch_size)
so ids are unique across ranks and epochs, gap-free, and independent of how many loader workers there are. Loader
worker w makes batches j ≡ w (mod num_workers), which is the order in which a `DataLoader` reads its workers, so the
batches arrive as j = 0, 1, 2, ... whatever the worker count. Each sample is a pure function of (seed, sample id).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..captions.store import CaptionStore
from ..prompts.templates import PromptTemplate, prompt_template
from ..synth.postprocess import resize_to_uint8
from ..synth.sampler import SynthesisConfig, Synthesizer
from ..synth.tiny import RANDOM_WEIGHTS_NOTICE, is_tiny_model
from .sampling import CaptionSampler, SampleSpec

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_transform() -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image → float, normalised with ImageNet statistics, as torchvision's classifiers expect."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _distributed_rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def default_devices() -> list[str]:
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


class SyntheticStream(IterableDataset):
    """Yields `(image, label)`: images made on the fly from a caption store's Caption-in-Prompt prompts.

    Args:
        captions: a caption store (path or `CaptionStore`).
        model: a Stable Diffusion hub id or diffusers folder, loaded with `from_pretrained` in each worker.
        prompt: `"cip"` (`a photo of {name}, {caption}`), `"basic"` (`a photo of {name}`) or a template.
        seed: the run seed; with the sample id it fixes class, caption, noise and so the image.
        epoch_size: samples in one virtual epoch over all ranks; `len()` is this rank's share. Default: the
            number of captions (one image per real caption, as in the reference recipe).
        batch_size: the loader's batch size; it lets the stream hand each worker whole batches so that the sample
            order does not depend on the worker count, and trims the epoch to whole batches. `loader()` sets it.
        image_size: side of the square images handed out (resized on the generator's device).
        devices: where workers generate; worker w uses `devices[w % len(devices)]`. Default: CUDA if present.
        dtype: "fp16", "bf16" or "fp32"; default fp16 on CUDA, fp32 on the CPU.
        scheduler: a scheduler name (see `streamsynth.synth.loading.SCHEDULERS`); default: the model's own.
        synthesis: steps, guidance scale, resolution and safety check.
        synth_batch_size: images generated per UNet batch in a worker.
        transform: applied to each uint8 CHW image; default: float + ImageNet normalisation.
    """

    def __init__(
        self,
        captions: str | os.PathLike | CaptionStore,
        model: str | os.PathLike,
        *,
        prompt: str | PromptTemplate = "cip",
        seed: int = 0,
        epoch_size: int | None = None,
        batch_size: int | None = None,
        image_size: int | None = 224,
        devices: Sequence[str] | None = None,
        dtype: str | None = None,
        scheduler: str | None = None,
        synthesis: SynthesisConfig | None = None,
        synth_batch_size: int = 8,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.store = captions if isinstance(captions, CaptionStore) else CaptionStore(captions)
        self.model = str(model)
        template = prompt if isinstance(prompt, PromptTemplate) else prompt_template(prompt)
        self.sampler = CaptionSampler(self.store, template, seed)
        self.seed = seed
        self.image_size = image_size
        self.devices = list(devices) if devices else default_devices()
        self.dtype = dtype
        self.scheduler = scheduler
        self.synthesis = synthesis or SynthesisConfig()
        self.synth_batch_size = synth_batch_size
        self.transform = transform if transform is not None else default_transform()
        dist_rank, dist_world = _distributed_rank_and_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        self.epoch_size = epoch_size or self.sampler.num_captions
        self.batch_size = batch_size or 1
        if self.epoch_size // self.world_size < self.batch_size:
            raise ValueError(
                f"epoch_size {self.epoch_size} gives each of {self.world_size} ranks fewer than one batch of "
                f"{self.batch_size}: raise epoch_size or lower the batch size"
            )
        self.epoch = 0
        self.random_weights = is_tiny_model(self.model)
        if self.random_weights:
            log.warning("SyntheticStream: %s", RANDOM_WEIGHTS_NOTICE)
        self._synthesizer: Synthesizer | None = None

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.store.classes]

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_size // self.world_size // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the virtual epoch, as `DistributedSampler.set_epoch` does: each epoch has fresh sample ids."""
        self.epoch = epoch

    def batch_sample_ids(self, epoch: int, batch: int) -> range:
        """The sample ids of this rank's batch `batch` of epoch `epoch`."""
        first = ((epoch * self.batches_per_epoch + batch) * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def spec(self, sample_id: int) -> SampleSpec:
        return self.sampler(sample_id)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def synthesizer(self) -> Synthesizer:
        """This process's generator, loaded on first use (so each worker loads the model once, on its device)."""
        if self._synthesizer is None:
            worker_id, _ = self._worker()
            device = self.devices[worker_id % len(self.devices)]
            self._synthesizer = Synthesizer.from_pretrained(
                self.model, device=device, dtype=self.dtype, scheduler=self.scheduler, config=self.synthesis
            )
        return self._synthesizer

    def _my_sample_ids(self) -> Iterator[int]:
        worker_id, num_workers = self._worker()
        for batch in range(worker_id, self.batches_per_epoch, num_workers):
            yield from self.batch_sample_ids(self.epoch, batch)

    def generate(self, specs: Sequence[SampleSpec]) -> torch.Tensor:
        """uint8 images, (len(specs), 3, image_size, image_size), on the CPU."""
        images = self.synthesizer().generate([s.prompt for s in specs], [s.seed for s in specs])
        return resize_to_uint8(images, self.image_size).cpu()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        chunk: list[SampleSpec] = []
        for sample_id in self._my_sample_ids():
            chunk.append(self.spec(sample_id))
            if len(chunk) == self.synth_batch_size:
                yield from self._emit(chunk)
                chunk = []
        if chunk:
            yield from self._emit(chunk)

    def _emit(self, specs: list[SampleSpec]) -> Iterator[tuple[torch.Tensor, int]]:
        for spec, image in zip(specs, self.generate(specs)):
            yield self.transform(image), spec.label

    def loader(self, batch_size: int, num_workers: int = 0, **kwargs) -> DataLoader:
        """A `DataLoader` over this stream: whole batches per worker, and the spawn method when workers use CUDA."""
        self.batch_size = batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"epoch_size {self.epoch_size} is smaller than one batch of {batch_size} per rank")
        if num_workers > 0 and any(str(d).startswith("cuda") for d in self.devices):
            kwargs.setdefault("multiprocessing_context", "spawn")
        return DataLoader(self, batch_size=batch_size, num_workers=num_workers, **kwargs)

    def describe(self) -> dict:
        """What this stream makes, for logs and checkpoints."""
        return {
            "captions": str(self.store.path),
            "model": self.model,
            "random_weights": self.random_weights,
            "prompt": self.sampler.template.template,
            "seed": self.seed,
            "epoch_size": self.epoch_size,
            "image_size": self.image_size,
            "devices": self.devices,
            "dtype": self.dtype,
            "scheduler": self.scheduler,
            "synthesis": asdict(self.synthesis),
            "num_classes": self.num_classes,
            "class_ids": [c.id for c in self.store.classes],
        }

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_synthesizer"] = None  # each process loads its own model on its own device
        return state

