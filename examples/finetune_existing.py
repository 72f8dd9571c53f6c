"""Fine-tune an existing LightningModule, which knows nothing of lightning-cheapconv, into a cheaper one.

Step 1 trains a plain Lightning project briefly (stand-in for your existing run). Step 2 loads its
checkpoint and fine-tunes with a callback added. Compare the two `Trainer(...)` calls: the only
change is the `callbacks=[...]` line.

    python examples/finetune_existing.py --method ghost        # or --method structured
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cheapconv import DigitsDataModule, GhostConvCallback, StructuredConvCallback


class ExistingNet(pl.LightningModule):
    """A user's own module: its own layers, training_step, optimizer and scheduler."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("ghost", "structured"), default="ghost")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each step")
    parser.add_argument("--output", type=Path, default=Path("runs/finetune_existing"))
    parser.add_argument("--fast-dev-run", action="store_true")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    common = dict(max_epochs=args.epochs, accelerator="cpu", fast_dev_run=args.fast_dev_run, logger=False)

    # Step 1: the user's existing training run.
    trainer = pl.Trainer(**common, default_root_dir=args.output)
    trainer.fit(ExistingNet(), datamodule=datamodule)
    checkpoint = args.output / "existing.ckpt"
    trainer.save_checkpoint(checkpoint)
    before = trainer.validate(ExistingNet.load_from_checkpoint(checkpoint), datamodule=datamodule, verbose=False)

    # Step 2: the same module, fine-tuned from its checkpoint; the one new line is `callbacks=[...]`.
    if args.method == "ghost":
        callback = GhostConvCallback(ratio=2)
    else:
        callback = StructuredConvCallback(project_start_epoch=1, project_end_epoch=1)
    model = ExistingNet.load_from_checkpoint(checkpoint)
    trainer = pl.Trainer(**common, default_root_dir=args.output, callbacks=[callback])
    trainer.fit(model, datamodule=datamodule)
    after = trainer.validate(model, datamodule=datamodule, verbose=False)
    summary = {
        "val_acc_before": before[0].get("val_acc"),
        "val_acc_after": after[0].get("val_acc"),
        **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compression/")},
    }
    print(summary)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
