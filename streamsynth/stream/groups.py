"""`GroupMaker`: how the stream's samples become images, one generation group at a time, in any process.

A group maker is a picklable value: the caption sampler (sample id → class, caption, prompt, seed), the generator's
config, the transform and the optional cache folder. Steering (`steering.py`) changes how a group's samples are chosen,
never which sample ids it holds: `make_group` takes a steering callable in place of its plain loop. It loads its generator in the process that first makes a
group (each loader worker loads the model once, on its own device) and never carries the loaded model across a
pickle. `SyntheticStream` (under any DataLoader) and `StreamLoader` (whole groups from fault-tolerant workers) make
their groups with the same maker, so a group is the same images whichever loader asks for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from ..errors import StreamsynthError
from ..seeding import derive_seed, seeded
from ..synth.config import GeneratorConfig
from ..synth.loading import ModelLoadError
from ..synth.sampler import Synthesizer
from ..transforms import BatchAugment
from .cache.writer import write_group
from .devices import check_usable_here, current_cuda_device, worker_device
from .layout import StreamLayout
from .sampling import CaptionSampler, SampleSpec

log = logging.getLogger(__name__)


class TransformError(StreamsynthError, ValueError):
    """The stream's transform failed on a synthetic image; the message says what it was given and how to adapt."""


@dataclass(frozen=True)
class Group:
    """One generation group as this rank receives it: its samples and their uint8 images (B, 3, H, W)."""

    epoch: int
    index: int  # the group's number within its epoch
    specs: list[SampleSpec]
    images: torch.Tensor
    generated: int = 0  # images generated to make it: more than its samples when steering chose them from a pool
    learner_s: float = 0.0  # seconds the learner's forward passes took in the worker (steering's scoring)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.specs])

    @property
    def sample_ids(self) -> torch.Tensor:
        return torch.tensor([s.sample_id for s in self.specs])


class Steer(Protocol):
    """How a steered group is made (`steering.Steering.group_steer`): the group's sample ids → their specs and uint8
    images, the number of images generated to make them, and the seconds the learner's forward passes took."""

    def __call__(self, maker: "GroupMaker", sample_ids: Sequence[int],
                 worker: int) -> tuple[list[SampleSpec], torch.Tensor, int, float]: ...


class GroupMaker:
    """Makes and augments generation groups; see the module docstring.

    Args:
        sampler: sample id → `SampleSpec`.
        generator: the generator's config; worker w generates on `worker_device(generator.devices, w)`.
        transform: a `BatchAugment` (a whole use of a group at once, wherever the batches are consumed) or any
            callable applied image by image under the per-(sample, use) seed.
        seed: the run seed (augmentation seeds derive from it).
        cache: a folder the made groups are also written to as WebDataset shards, or None.
    """

    def __init__(self, sampler: CaptionSampler, generator: GeneratorConfig, transform: Callable, seed: int,
                 cache: str | None = None):
        self.sampler, self.generator, self.transform, self.seed, self.cache = sampler, generator, transform, seed, cache
        self._synthesizer: Synthesizer | None = None  # this process's own; each worker loads its own
        self._transform_input: str | None = None  # "tensor" or "pil", found on the first image
        self._trainer_cuda_device: int | None = None  # the GPU the process that pickled this maker had chosen

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_synthesizer"] = None  # each process loads its own model on its own device
        # Pickled for a spawned loader worker, which has no CUDA device of its own yet: it takes the trainer's.
        chosen = current_cuda_device()
        state["_trainer_cuda_device"] = chosen if chosen is not None else self._trainer_cuda_device
        return state

    def device(self, worker: int = 0) -> str:
        """Where loader worker `worker` of this rank generates (`streamsynth.stream.devices`)."""
        return worker_device(self.generator.devices, worker, self._trainer_cuda_device)

    @property
    def class_ids(self) -> list[str]:
        return [c.id for c in self.sampler.store.classes]

    # ----- making -----------------------------------------------------------------------------------------------

    def synthesizer(self, worker: int = 0) -> Synthesizer:
        """This process's generator, loaded on first use (so each worker loads the model once, on its device)."""
        if self._synthesizer is None:
            device = self.device(worker)
            check_usable_here(device)
            try:
                self._synthesizer = Synthesizer.from_config(self.generator, device)
            except (ModelLoadError, torch.OutOfMemoryError):
                raise
            except Exception as err:  # a damaged checkpoint or a config diffusers refuses: loading again won't help
                raise ModelLoadError(f"could not load the generator {self.generator.model!r} on {device}: "
                                     f"{type(err).__name__}: {err}") from err
        return self._synthesizer

    def make_samples(self, sample_ids: Sequence[int], worker: int = 0,
                     class_weights: list[float] | None = None) -> tuple[list[SampleSpec], torch.Tensor]:
        """The specs and uint8 images of any sample ids, made in chunks of the generator's batch size: the one
        generator loop, used for the stream's groups, by `streamsynth generate` and by `streamsynth preview`."""
        sampler = self.sampler.weighted(class_weights) if class_weights is not None else self.sampler
        specs = [sampler(i) for i in sample_ids]
        return specs, self.render(specs, worker)

    def render(self, specs: Sequence[SampleSpec], worker: int = 0) -> torch.Tensor:
        """The uint8 images of `specs` (their prompts and seeds), in chunks of the generator's batch size."""
        synth, size, chunk = self.synthesizer(worker), self.generator.image_size, self.generator.batch_size
        return torch.cat([
            synth.generate_uint8([s.prompt for s in specs[i:i + chunk]], [s.seed for s in specs[i:i + chunk]],
                                 size).contiguous(memory_format=torch.channels_last).cpu()  # see resize_to_uint8
            for i in range(0, len(specs), chunk)
        ])

    def make_group(self, layout: StreamLayout, epoch: int, group: int, worker: int = 0,
                   class_weights: list[float] | None = None, steer: Steer | None = None) -> Group:
        """Generate `layout`'s rank's share of group `group` of `epoch` (and write it to the cache if there is one),
        plainly, with `class_weights`, or as `steer` makes it."""
        sample_ids = layout.group_sample_ids(epoch, group)
        if steer is None:
            specs, images = self.make_samples(sample_ids, worker, class_weights)
            generated, learner_s = len(specs), 0.0
        else:
            specs, images, generated, learner_s = steer(self, sample_ids, worker)
        if self.cache:
            write_group(self.cache, self.class_ids, specs, images, self.seed)
        return Group(epoch, group, specs, images, generated, learner_s)

    # ----- augmenting -------------------------------------------------------------------------------------------

    def set_transform(self, transform: Callable) -> None:
        self.transform, self._transform_input = transform, None

    @property
    def augments_in_batches(self) -> bool:
        """True when the transform is a `BatchAugment`: a group's uses are augmented a batch at a time, wherever the
        batches are consumed; any other transform runs image by image."""
        return isinstance(self.transform, BatchAugment)

    def augment_seed(self, sample_id: int, use: int) -> int:
        """The seed of use `use` of a sample's image: augmentation is part of the sample's pure function."""
        return derive_seed(self.seed, "augment", sample_id, use)

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
        if not isinstance(out, (torch.Tensor, np.ndarray)):  # what DataLoader's collate functions stack
            raise TransformError(
                f"the stream's transform returned a {type(out).__name__}, not a tensor or array, so batches cannot be "
                "formed: end it with ToTensor(), or with v2.ToImage() and v2.ToDtype(torch.float32, scale=True)"
            )
        return taken


def _to_pil(image: torch.Tensor):
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(image)
