"""`SyntheticStream`: an endless `IterableDataset` of fresh, labelled Stable Diffusion images, never stored.

The stream is thin: what a sample is and how a group of samples is made and augmented belong to its `GroupMaker`
(`groups.py`: sample id → class, caption, prompt, seed → image), where a sample goes to its `StreamLayout`
(`layout.py`), resolved for the process's rank when iteration starts. It works under any loader:

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
from dataclasses import asdict
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..captions.store import CaptionStore
from ..prompts.templates import PromptTemplate, prompt_template
from ..ranks import under_launcher
from ..synth.config import GeneratorConfig
from ..synth.tiny import RANDOM_WEIGHTS_NOTICE
from ..transforms import normalize_transform
from .cache.folder import write_cache_classes
from .groups import Group, GroupMaker, TransformError  # noqa: F401 - Group and TransformError are the stream's too
from .layout import StreamLayout, worker_groups
from .sampling import CaptionSampler, SampleSpec
from .shared import PassClock, SharedClassWeights

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int] | None:
    """This process's data-parallel rank and world size where it can be read: torch.distributed's once its process
    group exists (in the trainer, or a loader worker forked from it), else a launcher's environment (RANK and
    WORLD_SIZE, as torchrun sets them); None when neither says."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if under_launcher():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def worker_index_and_count() -> tuple[int, int]:
    """This process's loader worker index and the number of workers (0, 1 in the trainer's own process)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class SyntheticStream(IterableDataset):
    """Yields `(image, label)` (or `(image, label, sample_id)`): Caption-in-Prompt images made on the fly.

    Args:
        captions: a caption store (path or `CaptionStore`).
        generator: a `GeneratorConfig`, or a Stable Diffusion hub id or diffusers folder (then with the config's
            defaults). Each loader worker loads the model once, with `from_pretrained`, on its device
            (`streamsynth.stream.devices`: by default the rank's own GPU, else the CPU).
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
        rank, world_size: this process's share of every global batch. Default: read when iteration starts (in
            each loader worker), from torch.distributed once its process group exists, else from a launcher's
            RANK and WORLD_SIZE, else rank 0 of 1; so a stream built before `init_process_group` (a Lightning
            DataModule's `__init__`, a script that builds its data first) still partitions correctly.
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
        store = captions if isinstance(captions, CaptionStore) else CaptionStore(captions)
        generator = generator if isinstance(generator, GeneratorConfig) else GeneratorConfig(generator)
        template = prompt if isinstance(prompt, PromptTemplate) else prompt_template(prompt)
        self.maker = GroupMaker(CaptionSampler(store, template, seed), generator,
                                transform if transform is not None else normalize_transform(), seed,
                                os.fspath(cache) if cache else None)
        self._layout_settings = {"seed": seed, "epoch_size": epoch_size or self.maker.sampler.num_captions,
                                 "batch_size": batch_size, "replay": replay}
        self._explicit_rank = (rank, world_size)
        self._rank_at_pickling: tuple[int, int] | None = None
        self.layout  # a batch size, replay or epoch size that cannot work fails here, where the stream is built
        if self.cache:
            write_cache_classes(self.cache, self.class_ids)
        self.return_sample_ids = return_sample_ids
        self._clock = PassClock()
        self._class_weights = SharedClassWeights(self.num_classes)
        if self.random_weights:
            log.warning("SyntheticStream: %s", RANDOM_WEIGHTS_NOTICE)
        # This process's own iteration state; each worker process has its own copy.
        self._passes_begun = 0
        self._position: tuple[int, int, int] | None = None  # (epoch, group, item) of the next item to yield
        self._restored: tuple[int, int, int] | None = None  # set by `load_state_dict`

    # ----- what the stream is ---------------------------------------------------------------------------------------

    @property
    def layout(self) -> StreamLayout:
        """Which sample goes where, for this process's rank as it reads now (see `rank` in the class docstring)."""
        rank, world = self._explicit_rank
        if rank is None or world is None:
            found = rank_and_world() or self._rank_at_pickling or (0, 1)
            rank, world = (found[0] if rank is None else rank), (found[1] if world is None else world)
        return StreamLayout(**self._layout_settings, world_size=world, rank=rank)

    @property
    def store(self) -> CaptionStore:
        return self.maker.sampler.store

    @property
    def sampler(self) -> CaptionSampler:
        return self.maker.sampler

    @property
    def generator(self) -> GeneratorConfig:
        return self.maker.generator

    @property
    def transform(self) -> Callable:
        return self.maker.transform

    @transform.setter
    def transform(self, transform: Callable) -> None:
        """Loaders that set their dataset's transform (timm's `create_loader` does) set the stream's augmentation."""
        self.maker.set_transform(transform if transform is not None else normalize_transform())

    @property
    def cache(self) -> str | None:
        return self.maker.cache

    @property
    def batch_size(self) -> int:
        return self._layout_settings["batch_size"]

    @property
    def batches_per_epoch(self) -> int:
        return self.layout.batches_per_epoch

    def __len__(self) -> int:
        """This rank's samples per epoch."""
        layout = self.layout
        return layout.batches_per_epoch * layout.batch_size

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.store.classes]

    @property
    def class_ids(self) -> list[str]:
        return self.maker.class_ids

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
        """What this stream makes, for logs, checkpoints and manifests: every setting that changes a sample."""
        return {
            "captions": str(self.store.path),
            "generator": asdict(self.generator),
            "random_weights": self.random_weights,
            "prompt": self.sampler.template.template,
            "layout": asdict(self.layout),
            "num_classes": self.num_classes,
            "class_ids": self.class_ids,
            "cache": self.cache,
        }

    # ----- making samples (the group maker's, for callers that hold the stream) -------------------------------------

    def make_samples(self, sample_ids: Sequence[int], worker: int = 0,
                     class_weights: list[float] | None = None) -> tuple[list[SampleSpec], torch.Tensor]:
        return self.maker.make_samples(sample_ids, worker, class_weights)

    def make_group(self, epoch: int, group: int, worker: int = 0, class_weights: list[float] | None = None) -> Group:
        return self.maker.make_group(self.layout, epoch, group, worker, class_weights)

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
        return self._samples(self.layout, epoch, group, item, worker, num_workers)

    def _samples(self, layout: StreamLayout, epoch: int, first_group: int, first_item: int, worker: int,
                 num_workers: int) -> Iterator[tuple]:
        weights, per_group = self._class_weights.read(), layout.replay * layout.batch_size
        for group in worker_groups(first_group - worker, worker, num_workers, layout.groups_per_epoch):
            made, views = self.maker.make_group(layout, epoch, group, worker, weights), None
            ids = [spec.sample_id for spec in made.specs]
            for item in range(first_item, per_group):
                use, index = divmod(item, layout.batch_size)
                if views is None or index == 0:
                    views = self.maker.augment_group(made.images, ids, use)
                spec = made.specs[index]
                self._position = (epoch, group, item + 1) if item + 1 < per_group else (epoch, group + num_workers, 0)
                yield (views[index], spec.label, spec.sample_id) if self.return_sample_ids else (views[index], spec.label)
            first_item = 0

    def state_dict(self) -> dict:
        """This worker's position, in the form torchdata's `StatefulDataLoader` snapshots per worker."""
        layout = self.layout
        epoch, group, item = self._position or (0, worker_index_and_count()[0], 0)
        return {"epoch": epoch, "group": group, "item": item, "sequence": layout.sequence_key(),
                "rank": layout.rank, "world_size": layout.world_size, "num_workers": worker_index_and_count()[1]}

    def load_state_dict(self, state: dict) -> None:
        layout = self.layout
        layout.check_resumable(state["sequence"])
        now = {"rank": layout.rank, "world_size": layout.world_size, "num_workers": worker_index_and_count()[1]}
        changed = [f"{key} was {state[key]}, now {value}" for key, value in now.items() if state[key] != value]
        if changed:
            raise ValueError(f"a per-worker snapshot resumes only on the same workers and ranks ({', '.join(changed)}):"
                             " resume through StreamLoader's state_dict to change them")
        self._restored = (state["epoch"], state["group"], state["item"])

    def __getstate__(self) -> dict:
        # Pickled for a spawned loader worker, which has no process group of its own: it takes the rank of the
        # process that started it.
        state = self.__dict__.copy()
        state["_rank_at_pickling"] = rank_and_world() or self._rank_at_pickling
        return state
