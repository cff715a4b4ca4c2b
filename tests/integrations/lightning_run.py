"""A Lightning run on the stream, as a user writes one (used by tests/test_integrations.py).

    python lightning_run.py OUT --captions STORE --sd-model MODEL --devices 2 --epochs 2 [--max-steps N]
        [--resume CKPT] [--checkpoint-every N]

Each rank appends what every training step took (rank, epoch, step, sample ids) to OUT/ids-rank{R}.txt. The data
module is built before the Trainer exists, so before the process group: the stream must still split by rank.
"""

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from streamsynth import GeneratorConfig, SynthesisConfig
from streamsynth.integrations.lightning import SyntheticDataModule


class TinyClassifier(LightningModule):
    def __init__(self, num_classes: int, out: Path):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, num_classes))
        self.out = out

    def training_step(self, batch, batch_idx):
        images, labels, ids = batch
        with open(self.out / f"ids-rank{self.global_rank}.txt", "a") as log:
            log.write(f"{self.global_rank} {self.current_epoch} {self.global_step} "
                      f"{' '.join(map(str, ids.tolist()))}\n")
        return torch.nn.functional.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--captions", required=True)
    parser.add_argument("--sd-model", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = GeneratorConfig(args.sd_model, synthesis=SynthesisConfig(num_inference_steps=1), image_size=16,
                                devices=("cpu",), batch_size=4)
    data = SyntheticDataModule(args.captions, generator, batch_size=2, num_workers=1, replay=2, epoch_size=16,
                               return_sample_ids=True)
    callbacks = [ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=args.checkpoint_every,
                                 save_top_k=-1)] if args.checkpoint_every else []
    trainer = Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                      max_epochs=args.epochs, max_steps=args.max_steps, callbacks=callbacks, logger=False,
                      enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    trainer.fit(TinyClassifier(data.stream.num_classes, out), datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    sys.exit(main())
