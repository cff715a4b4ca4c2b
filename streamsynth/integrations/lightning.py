"""The stream as a Lightning `LightningDataModule`, with exact resume from Lightning's own checkpoints.

    from lightning.pytorch import Trainer
    from streamsynth import GeneratorConfig, speed_preset
    from streamsynth.integrations.lightning import SyntheticDataModule

    data = SyntheticDataModule("imagenet-captions.lmdb", GeneratorConfig(model, **speed_preset("fast")),
                               batch_size=64, num_workers=2, replay=4)
    Trainer(accelerator="gpu", devices=4, strategy="ddp", max_epochs=90).fit(my_module, datamodule=data)

What Lightning does not do for an `IterableDataset`, the module does: each rank gets its own samples (the stream reads
its rank when iteration starts, so building the module before the process group exists is fine), each epoch gets
fresh samples (the loader advances its epoch itself; Lightning calls no `set_epoch` on a dataset), and each rank's
synthesis runs on its own GPU (`streamsynth.stream.devices`). The batches come from `StreamLoader` (whole generation
groups from fault-tolerant workers, spawned when synthesis runs on CUDA).

Resume is exact, from Lightning's own checkpoints, mid-epoch too: `StreamLoader` is a stateful loader (its
`state_dict` is the epoch and batch it has delivered), which Lightning saves with each checkpoint and restores on
`fit(ckpt_path=...)`. That position equals the batches the model trained on because Lightning 2.6 fetches no batch
ahead from a loader with a length; tests/test_integrations.py resumes from a checkpoint taken mid-epoch while training
went on, and fails if a Lightning release starts fetching ahead.
"""

from __future__ import annotations

import os
from typing import Callable

from lightning.pytorch import LightningDataModule

from ..stream.dataset import SyntheticStream
from ..stream.loader import StreamLoader
from ..synth.config import GeneratorConfig
from ..transforms import BatchAugment


class SyntheticDataModule(LightningDataModule):
    """Caption-in-Prompt synthetic training batches for a Lightning `Trainer`; see the module docstring.

    Args:
        captions: a caption store (path).
        generator: a `GeneratorConfig` (or a model id or folder). Its `devices` default to each rank's own GPU.
        batch_size: images per batch on each rank.
        num_workers: synthesis worker processes per rank.
        replay, prompt, seed, epoch_size, transform, return_sample_ids: as `SyntheticStream` takes them; the
            transform defaults to a `BatchAugment` at the generator's image size (random resized crop and flip,
            ImageNet normalisation).
        prefetch_factor, timeout, max_restarts: as `StreamLoader` takes them.
    """

    def __init__(self, captions: str | os.PathLike, generator: GeneratorConfig | str | os.PathLike, *,
                 batch_size: int, num_workers: int = 2, replay: int = 1, prompt: str = "cip", seed: int = 0,
                 epoch_size: int | None = None, transform: Callable | None = None, return_sample_ids: bool = False,
                 prefetch_factor: int = 2, timeout: float = 1800, max_restarts: int = 3):
        super().__init__()
        generator = generator if isinstance(generator, GeneratorConfig) else GeneratorConfig(generator)
        if transform is None:
            transform = BatchAugment(generator.image_size) if generator.image_size else None
        self.stream = SyntheticStream(captions, generator, prompt=prompt, seed=seed, epoch_size=epoch_size,
                                      batch_size=batch_size, replay=replay, transform=transform,
                                      return_sample_ids=return_sample_ids)
        self.loader_options = {"num_workers": num_workers, "prefetch_factor": prefetch_factor, "timeout": timeout,
                               "max_restarts": max_restarts}

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is not None and "LOCAL_WORLD_SIZE" not in os.environ:
            # Lightning's launcher sets LOCAL_RANK but not LOCAL_WORLD_SIZE; the stream splits a device list among a
            # node's ranks by both (its workers inherit the environment).
            os.environ["LOCAL_WORLD_SIZE"] = str(trainer.num_devices)

    def train_dataloader(self) -> StreamLoader:
        # A stateful loader: Lightning saves its state with each checkpoint and restores it on `fit(ckpt_path=...)`.
        return StreamLoader(self.stream, **self.loader_options)
