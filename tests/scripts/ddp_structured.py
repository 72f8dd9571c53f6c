"""StructuredConvCallback under DDP with 2 CPU processes; launched by tests/test_callback_structured.py.

``strategy="ddp"`` re-runs this script in each rank (that is why DDP tests cannot run inside pytest).
Usage::

    python tests/scripts/ddp_structured.py OUT_DIR

Each rank writes ``OUT_DIR/rank{r}.pt`` (a ``torch.save`` of primitives and tensors): its final state
dict, the types of the backbone's layers, the ``compression/*`` values logged at each validation epoch
end, the ``train/struct_reg`` values it logged, the residuals of the target layers just before the
fit-end decomposition, and the callback's ``decomposition_error``. The test compares the ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from nets import quiet_trainer, tiny_backbone
from pytorch_lightning.callbacks import Callback

from lightning_cheapconv import DigitsDataModule, ImageClassifier, StructuredConvCallback
from lightning_cheapconv.structure import structural_residual


class Recorder(Callback):
    """Placed before the structured callback for ``on_fit_end`` (residuals of the dense weights), and
    reads the logged metrics once each validation / training epoch has finished."""

    def __init__(self, structured: StructuredConvCallback) -> None:
        self.structured = structured
        self.compression: list[dict[str, float]] = []
        self.struct_reg: list[float] = []
        self.residuals_before_decomposition: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.compression.append({k: float(v) for k, v in metrics.items() if k.startswith("compression/")})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train/struct_reg_epoch" in trainer.callback_metrics:
            self.struct_reg.append(float(trainer.callback_metrics["train/struct_reg_epoch"]))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self.residuals_before_decomposition = {
                name: float(structural_residual(pl_module.get_submodule(name).weight, self.structured.specs[name]))
                for name in self.structured.targets
            }


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16, image_size=16, pin_memory=False)
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    structured = StructuredConvCallback(
        channel_ratio=0.5, reg_weight=1.0, project_start_epoch=1, project_end_epoch=2, verbose=0
    )
    recorder = Recorder(structured)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=4,
        limit_train_batches=4,
        limit_val_batches=2,
        callbacks=[recorder, structured],
    )
    trainer.fit(model, datamodule=dm)
    result: dict[str, Any] = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
        "types": {name: type(m).__name__ for name, m in model.backbone.named_children()},
        "targets": list(structured.targets),
        "compression": recorder.compression,
        "struct_reg": recorder.struct_reg,
        "residuals_before_decomposition": recorder.residuals_before_decomposition,
        "decomposition_error": structured.decomposition_error,
        "global_step": trainer.global_step,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
