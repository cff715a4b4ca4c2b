"""`SyntheticStream`: an endless `IterableDataset` of fresh, labelled Stable Diffusion images, never stored.

How samples are laid out (all of it arithmetic on integers, so any process can compute any part of it):

- A *group* is one generation batch of `batch_size` new images. Group G of epoch e on rank r holds the sample ids
      e * S + (G * world_size + r) * batch_size + [0, batch_size),    S = ceil(epoch_size / replay)
  so ids never repeat across ranks, groups or epochs, and a sample is a pure function of (seed, sample id).
- With `replay = k`, each group yields k trainer batches in which every image appears exactly k times, in an order
  shuffled by a keyed permutation, each time with a fresh (seeded) augmentation. Only the current group is held in
  memory: the replay buffer of a worker is bounded by `batch_size` images.
- Loader workers play *logical workers*: logical worker l makes groups l, l + W, l + 2W, ... and its outputs are
  trainer batches t ≡ l (mod W). A `DataLoader` reads its workers round-robin, so trainer batches arrive as
  t = 0, 1, 2, ... With replay 1, batch t is group t: the order does not depend on the number of workers.
  To resume at batch t0, physical worker i plays logical worker (i + t0) mod W and skips what it had delivered.
- Epochs are trimmed to whole rounds of W groups, so `len()` can shrink by up to W - 1 groups.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..captions.store import CaptionStore
from ..prompts.templates import PromptTemplate, prompt_template
from ..synth.fast import FastPathOptions
from ..synth.loading import check_model_source
from ..synth.sampler import SynthesisConfig, Synthesizer, derive_seed
from ..synth.tiny import RANDOM_WEIGHTS_NOTICE, has_random_weights
from .feedback import SharedClassWeights
from .metrics import WorkerStats, peak_memory_bytes
from .resumable import seeded
from .sampling import CaptionSampler, SampleSpec, keyed_permutation

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


@dataclass(frozen=True)
class Position:
    """Where a logical worker stands: the next item it will yield in `epoch`."""

    epoch: int
    logical_worker: int
    item: int


class SyntheticStream(IterableDataset):
    """Yields `(image, label)` (or `(image, label, sample_id)`): Caption-in-Prompt images made on the fly.

    Args:
        captions: a caption store (path or `CaptionStore`).
        model: a Stable Diffusion hub id or diffusers folder, loaded with `from_pretrained` once per worker.
        prompt: `"cip"` (`a photo of {name}, {caption}`), `"basic"` (`a photo of {name}`) or a template.
        seed: the run seed; with the sample id it fixes class, caption, noise, augmentation and so the sample.
        epoch_size: trainer samples per virtual epoch over all ranks (replays included); `len()` is this rank's
            share. Default: the number of captions (one image per real caption, as the reference recipe makes).
        batch_size: the loader's batch size, also the generation group size. `loader()` sets it.
        replay: times each synthetic image is used (k); each use gets a fresh augmentation.
        image_size: side of the square images handed out (resized on the generator's device).
        devices: where workers generate; worker w uses `devices[w % len(devices)]`. Default: CUDA if present.
        dtype: "fp16", "bf16" or "fp32"; default fp16 on CUDA, fp32 on the CPU.
        scheduler: a scheduler name (see `streamsynth.synth.loading.SCHEDULERS`); default: the model's own.
        synthesis: steps, guidance scale, resolution and safety check.
        synth_batch_size: images per UNet batch in a worker (a group is made in chunks of this size).
        fast: fast-path options (Triton kernels, fused guidance step, attention backend, compile; see
            `streamsynth.synth.fast`); None runs the plain diffusers components.
        transform: applied to each uint8 CHW image, under a per-(sample, use) seed; default: float + normalise.
        cache: a folder for the optional WebDataset cache: every generated image is also written to tar shards.
        return_sample_ids: also yield each item's sample id (for audits and tests).
        rank, world_size: default from `torch.distributed` when it is initialised.
    """

    def __init__(
        self,
        captions: str | os.PathLike | CaptionStore,
        model: str | os.PathLike,
        *,
        prompt: str | PromptTemplate = "cip",
        seed: int = 0,
        epoch_size: int | None = None,
        batch_size: int = 1,
        replay: int = 1,
        image_size: int | None = 224,
        devices: Sequence[str] | None = None,
        dtype: str | None = None,
        scheduler: str | None = None,
        synthesis: SynthesisConfig | None = None,
        synth_batch_size: int = 8,
        fast: FastPathOptions | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: str | os.PathLike | None = None,
        return_sample_ids: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if replay < 1:
            raise ValueError(f"replay must be at least 1 (each image used once), got {replay}")
        self.store = captions if isinstance(captions, CaptionStore) else CaptionStore(captions)
        check_model_source(model)  # here, not in each worker after it started
        self.model = str(model)
        template = prompt if isinstance(prompt, PromptTemplate) else prompt_template(prompt)
        self.sampler = CaptionSampler(self.store, template, seed)
        self.seed = seed
        self.replay = replay
        self.image_size = image_size
        self.devices = list(devices) if devices else default_devices()
        self.dtype = dtype
        self.scheduler = scheduler
        self.synthesis = synthesis or SynthesisConfig()
        self.synth_batch_size = synth_batch_size
        self.fast = fast
        self.transform = transform if transform is not None else default_transform()
        self.cache = str(cache) if cache else None
        self.return_sample_ids = return_sample_ids
        dist_rank, dist_world = _distributed_rank_and_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        self.epoch_size = epoch_size or self.sampler.num_captions
        self.batch_size = batch_size
        self.num_workers = 1  # how many loader workers share this rank's groups; `loader()` sets it
        self.epoch = 0
        self._resume_batch = 0  # trainer batches of `epoch` already delivered; set by `resume_at`
        self._position: Position | None = None  # this process's progress, for `state_dict` in a worker
        self._restored: Position | None = None  # set by `load_state_dict` (torchdata's StatefulDataLoader)
        self.stats: WorkerStats | None = None  # shared counters, attached by `StreamLoader`
        self.shared_class_weights: SharedClassWeights | None = None  # reaches persistent workers; `StreamLoader`
        self.loader_ref: Callable[[], object] | None = None  # the `StreamLoader` iterating this stream, if any
        self.random_weights = has_random_weights(self.model)
        if self.random_weights:
            log.warning("SyntheticStream: %s", RANDOM_WEIGHTS_NOTICE)
        self._synthesizer: Synthesizer | None = None
        self.configure(batch_size, 1)

    # ----- layout -------------------------------------------------------------------------------------------------

    def configure(self, batch_size: int, num_workers: int) -> None:
        """Fix the batch size and worker count that the epoch layout depends on (`loader()` calls this)."""
        self.batch_size, self.num_workers = batch_size, max(1, num_workers)
        if self.groups_per_epoch == 0:
            raise ValueError(
                f"epoch_size {self.epoch_size} is smaller than one batch of {batch_size} per rank and loader worker "
                f"({self.world_size} ranks x {self.num_workers} workers, replay {self.replay}): raise epoch_size, "
                "or lower the batch size or the worker count"
            )

    @property
    def samples_per_epoch_generated(self) -> int:
        return math.ceil(self.epoch_size / self.replay)

    @property
    def groups_per_epoch(self) -> int:
        """Generation groups per epoch on this rank, a whole number of rounds of the loader workers."""
        groups = self.samples_per_epoch_generated // self.world_size // self.batch_size
        return groups - groups % self.num_workers

    @property
    def batches_per_epoch(self) -> int:
        return self.groups_per_epoch * self.replay

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.store.classes]

    def group_sample_ids(self, epoch: int, group: int) -> range:
        """The sample ids generated for this rank's group `group` of epoch `epoch`."""
        first = epoch * self.samples_per_epoch_generated + (group * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def batch_items(self, epoch: int, batch: int) -> list[tuple[int, int]]:
        """(sample id, use) of each item of trainer batch `batch` of `epoch` on this rank."""
        logical, output = batch % self.num_workers, batch // self.num_workers
        group = (output // self.replay) * self.num_workers + logical
        ids = self.group_sample_ids(epoch, group)
        return [self._replay_slot(epoch, group, (output % self.replay) * self.batch_size + p, ids)
                for p in range(self.batch_size)]

    def _replay_slot(self, epoch: int, group: int, slot: int, ids: range) -> tuple[int, int]:
        if self.replay == 1:
            return ids[slot], 0
        use = keyed_permutation(slot, self.replay * self.batch_size, derive_seed(self.seed, "replay", epoch, group))
        return ids[use % self.batch_size], use // self.batch_size

    def spec(self, sample_id: int) -> SampleSpec:
        return self.sampler(sample_id)

    @property
    def class_weights(self) -> list[float] | None:
        return self.sampler.class_weights

    def set_class_weights(self, weights: list[float] | None) -> None:
        """Sampling weights per class from the next iteration on (None: one image per caption per pass)."""
        self.sampler.class_weights = weights
        if self.shared_class_weights is not None:
            self.shared_class_weights.write(weights)

    # ----- epochs and state ---------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the virtual epoch, as `DistributedSampler.set_epoch` does; each epoch has fresh sample ids."""
        self.epoch, self._resume_batch, self._restored = epoch, 0, None

    def resume_at(self, epoch: int, batch: int) -> None:
        """Start the next iteration at trainer batch `batch` of `epoch` (what `StreamLoader` restores)."""
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"batch {batch} outside epoch of {self.batches_per_epoch} batches")
        self.epoch, self._resume_batch, self._restored = epoch, batch, None

    def state_dict(self) -> dict:
        """This process's position, in the form torchdata's `StatefulDataLoader` snapshots per worker."""
        position = self._position or self._start_position()
        return {**asdict(position), "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        self._check_layout(state["layout"])
        self._restored = Position(state["epoch"], state["logical_worker"], state["item"])

    def layout(self) -> dict:
        """What the sample order depends on; a resumed run must match it to see the same samples."""
        return {"seed": self.seed, "epoch_size": self.epoch_size, "replay": self.replay, "batch_size": self.batch_size,
                "num_workers": self.num_workers, "world_size": self.world_size, "rank": self.rank}

    def _check_layout(self, layout: dict) -> None:
        mine = self.layout()
        diff = {k: (layout.get(k), mine[k]) for k in mine if layout.get(k) != mine[k]}
        if diff:
            raise ValueError(
                f"cannot resume the stream exactly: {', '.join(f'{k} was {a}, now {b}' for k, (a, b) in diff.items())}. "
                "Run with the saved settings, or start a fresh epoch with set_epoch()"
            )

    def _physical_worker(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, 1
        if info.num_workers != self.num_workers:
            raise RuntimeError(
                f"the stream was configured for {self.num_workers} loader workers but runs in {info.num_workers}: "
                "build the loader with stream.loader(batch_size, num_workers) or call stream.configure() first"
            )
        return info.id, info.num_workers

    def _start_position(self) -> Position:
        if self._restored is not None:
            return self._restored
        worker, num_workers = self._physical_worker()
        logical = (worker + self._resume_batch) % num_workers
        delivered = max(0, math.ceil((self._resume_batch - logical) / num_workers))
        return Position(self.epoch, logical, delivered * self.batch_size)

    # ----- generation ---------------------------------------------------------------------------------------------

    def synthesizer(self) -> Synthesizer:
        """This process's generator, loaded on first use (so each worker loads the model once, on its device)."""
        if self._synthesizer is None:
            worker, _ = self._physical_worker()
            device = self.devices[worker % len(self.devices)]
            self._synthesizer = Synthesizer.from_pretrained(
                self.model, device=device, dtype=self.dtype, scheduler=self.scheduler, config=self.synthesis,
                fast=self.fast,
            )
        return self._synthesizer

    def generate(self, specs: Sequence[SampleSpec]) -> torch.Tensor:
        """uint8 images, (len(specs), 3, image_size, image_size), on the CPU, made in chunks of synth_batch_size."""
        synth = self.synthesizer()
        chunks = []
        for start in range(0, len(specs), self.synth_batch_size):
            part = specs[start:start + self.synth_batch_size]
            chunks.append(synth.generate_uint8([s.prompt for s in part], [s.seed for s in part], self.image_size).cpu())
        return torch.cat(chunks)

    def _make_group(self, epoch: int, group: int) -> tuple[list[SampleSpec], torch.Tensor]:
        started = time.perf_counter()
        specs = [self.spec(i) for i in self.group_sample_ids(epoch, group)]
        images = self.generate(specs)
        if self.cache:
            from .cache import write_group

            write_group(self.cache, self.store, specs, images, self.seed)
        if self.stats is not None:
            worker = self._physical_worker()[0]
            self.stats.record(worker, len(specs), time.perf_counter() - started,
                              peak_memory_bytes(self.synthesizer().device))
        return specs, images

    def _augment(self, image: torch.Tensor, sample_id: int, use: int) -> torch.Tensor:
        # A per-(sample, use) seed makes augmentation part of the sample's pure function, so resume is exact.
        return seeded(derive_seed(self.seed, "augment", sample_id, use), self.transform, image)

    def __iter__(self) -> Iterator[tuple]:
        start = self._start_position()
        self._restored = None
        if self.shared_class_weights is not None and get_worker_info() is not None:
            self.sampler.class_weights = self.shared_class_weights.read()
        epoch, logical = start.epoch, start.logical_worker
        outputs_per_group = self.replay
        groups_per_worker = self.groups_per_epoch // self.num_workers
        items_per_worker = groups_per_worker * outputs_per_group * self.batch_size
        current: tuple[int, list[SampleSpec], torch.Tensor] | None = None  # the replay buffer: one group
        for item in range(start.item, items_per_worker):
            output, slot_in_batch = divmod(item, self.batch_size)
            group = (output // outputs_per_group) * self.num_workers + logical
            if current is None or current[0] != group:
                current = (group, *self._make_group(epoch, group))
            _, specs, images = current
            ids = self.group_sample_ids(epoch, group)
            slot = (output % outputs_per_group) * self.batch_size + slot_in_batch
            sample_id, use = self._replay_slot(epoch, group, slot, ids)
            index = sample_id - ids.start
            self._position = Position(epoch, logical, item + 1)
            image = self._augment(images[index], sample_id, use)
            label = specs[index].label
            if self.stats is not None and slot_in_batch == self.batch_size - 1:
                self.stats.record_batch(self._physical_worker()[0])
            yield (image, label, sample_id) if self.return_sample_ids else (image, label)
        # A worker that finished its share moves on, so persistent workers start the next epoch by themselves.
        self._position = Position(epoch + 1, logical, 0)
        self.epoch, self._resume_batch = epoch + 1, 0

    def loader(self, batch_size: int, num_workers: int = 0, **kwargs) -> "StreamLoader":
        """A `StreamLoader` (a restartable, resumable DataLoader) over this stream; see `StreamLoader`."""
        from .loader import StreamLoader

        return StreamLoader(self, batch_size, num_workers, **kwargs)

    def describe(self) -> dict:
        """What this stream makes, for logs and checkpoints."""
        return {
            "captions": str(self.store.path),
            "model": self.model,
            "random_weights": self.random_weights,
            "prompt": self.sampler.template.template,
            "seed": self.seed,
            "epoch_size": self.epoch_size,
            "replay": self.replay,
            "image_size": self.image_size,
            "devices": self.devices,
            "dtype": self.dtype,
            "scheduler": self.scheduler,
            "synthesis": asdict(self.synthesis),
            "fast_path": asdict(self.fast) if self.fast else None,
            "num_classes": self.num_classes,
            "class_ids": [c.id for c in self.store.classes],
            "cache": self.cache,
        }

    def metrics(self) -> dict:
        """The metrics of the `StreamLoader` that iterates this stream (see `StreamLoader.metrics`)."""
        loader = self.loader_ref() if self.loader_ref else None
        if loader is None:
            raise RuntimeError("metrics are collected by StreamLoader: iterate the stream through stream.loader()")
        return loader.metrics()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_synthesizer"] = None  # each process loads its own model on its own device
        state["loader_ref"] = None  # the loader stays in the trainer's process
        return state
