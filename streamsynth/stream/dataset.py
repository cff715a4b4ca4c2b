"""`SyntheticStream`: an endless `IterableDataset` of fresh, labelled Stable Diffusion images, never stored.

The stream owns what a sample is (`CaptionSampler`: id → class, caption, prompt, seed), where it goes (its
`StreamLayout`, fixed at construction) and how a group of samples is made (`make_group`) and augmented
(`augment`). It works under any loader:

- a plain `DataLoader(stream, batch_size=stream.batch_size, num_workers=W)` or torchdata's `StatefulDataLoader`:
  each worker reads its index and count from `get_worker_info()` and makes groups w, w + W, ... of the epoch,
  yielding their samples; successive passes advance the epoch by themselves (`set_epoch` picks one), and
  `state_dict()`/`load_state_dict()` give a `StatefulDataLoader` its per-worker snapshots;
- `StreamLoader(stream, num_workers=W)`, which hands whole groups from its workers and adds restarts, exact resume
  from a checkpoint on any number of workers or ranks, and metrics (see `loader.py`).

With replay 1, or under `StreamLoader`, batch t of every epoch is the layout's batch t whatever the number of
workers. Under a plain DataLoader with replay k > 1 and W > 1 workers, the k batches of a group arrive interleaved
with the other workers' groups (a DataLoader takes one batch from each worker in turn); the samples are the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..captions.store import CaptionStore
from ..errors import StreamsynthError
from ..prompts.templates import PromptTemplate, prompt_template
from ..seeding import derive_seed, seeded
from ..synth.config import GeneratorConfig
from ..synth.loading import ModelLoadError
from ..synth.sampler import Synthesizer
from ..synth.tiny import RANDOM_WEIGHTS_NOTICE
from ..transforms import BatchAugment, normalize_transform
from .cache import write_cache_classes, write_group
from .layout import StreamLayout, worker_groups
from .sampling import CaptionSampler, SampleSpec
from .shared import PassClock, SharedClassWeights

log = logging.getLogger(__name__)


class TransformError(StreamsynthError, ValueError):
    """The stream's transform failed on a synthetic image; the message says what it was given and how to adapt."""


def distributed_rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_index_and_count() -> tuple[int, int]:
    """This process's loader worker index and the number of workers (0, 1 in the trainer's own process)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass(frozen=True)
class Group:
    """One generation group as this rank receives it: its samples and their uint8 images (B, 3, H, W)."""

    epoch: int
    index: int  # the group's number within its epoch
    specs: list[SampleSpec]
    images: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.specs])

    @property
    def sample_ids(self) -> torch.Tensor:
        return torch.tensor([s.sample_id for s in self.specs])


class SyntheticStream(IterableDataset):
    """Yields `(image, label)` (or `(image, label, sample_id)`): Caption-in-Prompt images made on the fly.

    Args:
        captions: a caption store (path or `CaptionStore`).
        generator: a `GeneratorConfig`, or a Stable Diffusion hub id or diffusers folder (then with the config's
            defaults). Each loader worker loads the model once, with `from_pretrained`.
        prompt: `"cip"` (`a photo of {name}, {caption}`), `"basic"` (`a photo of {name}`) or a template.
        seed: the run seed; with the sample id it fixes class, caption, noise, augmentation and so the sample.
        epoch_size: trainer samples per virtual epoch over all ranks (replays included); `len()` is this rank's
            share. Default: the number of captions (one image per real caption, as the reference recipe makes).
        batch_size: this rank's batch size, which is also its share of every generation group; give a
            `DataLoader` the same (`batch_size=stream.batch_size`).
        replay: times each synthetic image is used (k); each use gets a fresh augmentation.
        transform: a `BatchAugment` (crop, flip and normalisation of a whole group's use at once, on the device
            where the batches are consumed), or any callable applied to each image under a per-(sample, use) seed in
            the workers. A callable is given the uint8 CHW tensor, or a PIL image if it only takes those (a
            torchvision transform written for ImageFolder, with `ToTensor()`). Default: float and ImageNet
            normalisation, image by image.
        cache: a folder for the optional WebDataset cache: every generated image is also written to tar shards.
        return_sample_ids: also yield each item's sample id (for audits and tests).
        rank, world_size: default from `torch.distributed` when it is initialised.
    """

    def __init__(
        self,
        captions: str | os.PathLike | CaptionStore,
        generator: GeneratorConfig | str | os.PathLike,
        *,
        prompt: str | PromptTemplate = "cip",
        seed: int = 0,
        epoch_size: int | None = None,
        batch_size: int = 1,
        replay: int = 1,
        transform: Callable | None = None,
        cache: str | os.PathLike | None = None,
        return_sample_ids: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.store = captions if isinstance(captions, CaptionStore) else CaptionStore(captions)
        self.generator = generator if isinstance(generator, GeneratorConfig) else GeneratorConfig(generator)
        template = prompt if isinstance(prompt, PromptTemplate) else prompt_template(prompt)
        self.sampler = CaptionSampler(self.store, template, seed)
        dist_rank, dist_world = distributed_rank_and_world()
        self.layout = StreamLayout(
            seed=seed, epoch_size=epoch_size or self.sampler.num_captions, batch_size=batch_size, replay=replay,
            world_size=dist_world if world_size is None else world_size, rank=dist_rank if rank is None else rank,
        )
        self.transform = transform if transform is not None else normalize_transform()
        self.cache = os.fspath(cache) if cache else None
        if self.cache:
            write_cache_classes(self.cache, self.class_ids)
        self.return_sample_ids = return_sample_ids
        self._clock = PassClock()
        self._class_weights = SharedClassWeights(self.num_classes)
        if self.random_weights:
            log.warning("SyntheticStream: %s", RANDOM_WEIGHTS_NOTICE)
        # This process's own state; each worker process has its own copy.
        self._synthesizer: Synthesizer | None = None
        self._transform_input: str | None = None  # "tensor" or "pil", found on the first image
        self._passes_begun = 0
        self._position: tuple[int, int, int] | None = None  # (epoch, group, item) of the next item to yield
        self._restored: tuple[int, int, int] | None = None  # set by `load_state_dict`

    # ----- what the stream is ---------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.layout.batches_per_epoch

    def __len__(self) -> int:
        """This rank's samples per epoch."""
        return self.layout.batches_per_epoch * self.layout.batch_size

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.store.classes]

    @property
    def class_ids(self) -> list[str]:
        return [c.id for c in self.store.classes]

    @property
    def random_weights(self) -> bool:
        return self.generator.random_weights

    def spec(self, sample_id: int) -> SampleSpec:
        return self.sampler(sample_id)

    @property
    def class_weights(self) -> list[float] | None:
        return self._class_weights.read()

    def set_class_weights(self, weights: list[float] | None) -> None:
        """Sampling weights per class from the next pass on (None: one image per caption per pass)."""
        self.sampler.weighted(weights)  # validates
        self._class_weights.write(weights)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch`, as `DistributedSampler.set_epoch` does; each epoch has fresh samples."""
        self._clock.set_epoch(epoch)

    def describe(self) -> dict:
        """What this stream makes, for logs and checkpoints."""
        generator = asdict(self.generator)
        return {
            "captions": str(self.store.path),
            "generator": generator,
            "random_weights": self.random_weights,
            "prompt": self.sampler.template.template,
            "layout": asdict(self.layout),
            "num_classes": self.num_classes,
            "class_ids": self.class_ids,
            "cache": self.cache,
        }

    # ----- making and augmenting groups -----------------------------------------------------------------------------

    def synthesizer(self, worker: int = 0) -> Synthesizer:
        """This process's generator, loaded on first use (so each worker loads the model once, on its device)."""
        if self._synthesizer is None:
            device = self.generator.device(worker)
            try:
                self._synthesizer = Synthesizer.from_config(self.generator, device)
            except (ModelLoadError, torch.OutOfMemoryError):
                raise
            except Exception as err:  # a damaged checkpoint or a config diffusers refuses: loading again won't help
                raise ModelLoadError(f"could not load the generator {self.generator.model!r} on {device}: "
                                     f"{type(err).__name__}: {err}") from err
        return self._synthesizer

    def make_samples(self, sample_ids, worker: int = 0,
                     class_weights: list[float] | None = None) -> tuple[list[SampleSpec], torch.Tensor]:
        """The specs and uint8 images of any sample ids, made in chunks of the generator's batch size: the one
        generator loop, used for the stream's groups and by `streamsynth generate`."""
        sampler = self.sampler.weighted(class_weights) if class_weights is not None else self.sampler
        specs = [sampler(i) for i in sample_ids]
        synth, size, chunk = self.synthesizer(worker), self.generator.image_size, self.generator.batch_size
        images = torch.cat([
            synth.generate_uint8([s.prompt for s in specs[i:i + chunk]], [s.seed for s in specs[i:i + chunk]],
                                 size).contiguous(memory_format=torch.channels_last).cpu()  # see resize_to_uint8
            for i in range(0, len(specs), chunk)
        ])
        return specs, images

    def make_group(self, epoch: int, group: int, worker: int = 0,
                   class_weights: list[float] | None = None) -> Group:
        """Generate this rank's share of group `group` of `epoch` (and write it to the cache if there is one)."""
        specs, images = self.make_samples(self.layout.group_sample_ids(epoch, group), worker, class_weights)
        if self.cache:
            write_group(self.cache, self.class_ids, specs, images, self.layout.seed)
        return Group(epoch, group, specs, images)

    @property
    def augments_in_batches(self) -> bool:
        """True when the transform is a `BatchAugment`: a group's uses are augmented a batch at a time, wherever the
        batches are consumed; any other transform runs image by image."""
        return isinstance(self.transform, BatchAugment)

    def augment_seed(self, sample_id: int, use: int) -> int:
        """The seed of use `use` of a sample's image: augmentation is part of the sample's pure function."""
        return derive_seed(self.layout.seed, "augment", sample_id, use)

    def augment(self, image: torch.Tensor, sample_id: int, use: int):
        """Use `use` of an image, transformed image by image under its seed (a `BatchAugment` takes whole groups)."""
        seed = self.augment_seed(sample_id, use)
        if self._transform_input is None:
            self._transform_input = self._transform_takes(image, seed)
        view = image if self._transform_input == "tensor" else _to_pil(image)
        try:
            return seeded(seed, self.transform, view)
        except Exception as err:
            raise TransformError(f"the stream's transform failed on sample {sample_id}: "
                                 f"{type(err).__name__}: {err}") from err

    def augment_group(self, images: torch.Tensor, sample_ids: Sequence[int], use: int) -> torch.Tensor:
        """Use `use` of a group's uint8 images (on any device, for a `BatchAugment`), as one batch."""
        if self.augments_in_batches:
            return self.transform(images, [self.augment_seed(i, use) for i in sample_ids])
        return torch.stack([self.augment(image, i, use) for image, i in zip(images, sample_ids)])

    def _transform_takes(self, image: torch.Tensor, seed: int) -> str:
        """"tensor" when the transform takes the stream's uint8 CHW tensors, else "pil" if it takes PIL images."""
        try:
            out = seeded(seed, self.transform, image)
            taken = "tensor"
        except Exception as tensor_error:
            try:
                out = seeded(seed, self.transform, _to_pil(image))
            except Exception:
                raise TransformError(
                    f"the stream's transform fails on its uint8 (3, H, W) tensors ({type(tensor_error).__name__}: "
                    f"{tensor_error}) and on PIL images too: give a transform for either"
                ) from tensor_error
            taken = "pil"
            log.info("the stream's transform takes PIL images, so each image is converted to one (slower): "
                     "torchvision v2 transforms without ToTensor() take the uint8 tensors directly")
        if not isinstance(out, torch.Tensor):
            raise TransformError(
                f"the stream's transform returned a {type(out).__name__}, not a tensor, so batches cannot be formed: "
                "end it with ToTensor(), or with v2.ToImage() and v2.ToDtype(torch.float32, scale=True)"
            )
        return taken

    # ----- iteration under any DataLoader ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = worker_index_and_count()
        if self._restored is not None:
            epoch, group, item = self._restored
            self._clock.claim(epoch)
        else:
            info = get_worker_info()
            base_seed = info.seed - info.id if info is not None else None
            epoch, group, item = self._clock.epoch_of_pass(base_seed, self._passes_begun), worker, 0
        self._passes_begun += 1
        self._restored = None
        self._position = (epoch, group, item)  # a StatefulDataLoader may snapshot before the first item
        return self._samples(epoch, group, item, worker, num_workers)

    def _samples(self, epoch: int, first_group: int, first_item: int, worker: int,
                 num_workers: int) -> Iterator[tuple]:
        weights, per_group = self._class_weights.read(), self.layout.replay * self.layout.batch_size
        for group in worker_groups(first_group - worker, worker, num_workers, self.layout.groups_per_epoch):
            made, views = self.make_group(epoch, group, worker, weights), None
            ids = [spec.sample_id for spec in made.specs]
            for item in range(first_item, per_group):
                use, index = divmod(item, self.layout.batch_size)
                if views is None or index == 0:
                    views = self.augment_group(made.images, ids, use)
                spec = made.specs[index]
                self._position = (epoch, group, item + 1) if item + 1 < per_group else (epoch, group + num_workers, 0)
                yield (views[index], spec.label, spec.sample_id) if self.return_sample_ids else (views[index], spec.label)
            first_item = 0

    def state_dict(self) -> dict:
        """This worker's position, in the form torchdata's `StatefulDataLoader` snapshots per worker."""
        epoch, group, item = self._position or (0, worker_index_and_count()[0], 0)
        return {"epoch": epoch, "group": group, "item": item, "sequence": self.layout.sequence_key(),
                "rank": self.layout.rank, "world_size": self.layout.world_size,
                "num_workers": worker_index_and_count()[1]}

    def load_state_dict(self, state: dict) -> None:
        self.layout.check_resumable(state["sequence"])
        now = {"rank": self.layout.rank, "world_size": self.layout.world_size,
               "num_workers": worker_index_and_count()[1]}
        changed = [f"{key} was {state[key]}, now {value}" for key, value in now.items() if state[key] != value]
        if changed:
            raise ValueError(f"a per-worker snapshot resumes only on the same workers and ranks ({', '.join(changed)}):"
                             " resume through StreamLoader's state_dict to change them")
        self._restored = (state["epoch"], state["group"], state["item"])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_synthesizer"] = None  # each process loads its own model on its own device
        return state


def _to_pil(image: torch.Tensor):
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(image)
