"""GhostConvCallback under DDP (2 CPU processes, gloo): launched by tests/test_callback_ghost.py.

Usage: ``python ddp_ghost.py OUT_DIR MODE [MODE ...]``, one fit per mode in the same processes
(imports and process-group start-up are paid once). Modes: ``progressive`` (two stages converted
mid-fit, kernel-space inheritance), ``setup`` (the first stage in setup, the second mid-fit, with
the default verbose output and fit-end report) and ``calibration`` (one stage at epoch 1, fitted on
real activations of 2 batches; the ranks see different batches, so only rank 0's broadcast fit
keeps them equal).

Each rank writes ``OUT_DIR/{mode}_rank{r}.pt``: its final state dict, the layers' types, whether
the optimizer lists exactly the model's parameters in order, the training losses, the fit errors,
the learning rates seen at each epoch start, the parameters that did not move in the last epoch,
and the logged ``compression/*`` figures. Kept small (8x8 random images) so a run takes seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from nets import GHOST_TARGETS, TinyNet, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_cheapconv import GhostConv2d, GhostConvCallback

TARGETS = GHOST_TARGETS


def run(out_dir: Path, mode: str) -> None:
    pl.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    val_loader = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)
    model = TinyNet()
    if mode == "progressive":
        callback = GhostConvCallback(stages=2, start_epoch=1, end_epoch=2, verbose=0)
    elif mode == "setup":  # stage 1 in setup (before DDP wraps the model), stage 2 mid-fit; default verbosity
        callback = GhostConvCallback(stages=2, start_epoch=0, end_epoch=1)
    elif mode == "calibration":
        callback = GhostConvCallback(start_epoch=1, calibration_batches=2, verbose=0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    trainer = quiet_trainer(max_epochs=3, devices=2, strategy="ddp", callbacks=[callback])
    trainer.fit(model, loader, val_loader)
    in_optimizer = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    torch.save(
        {
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            "types": {name: type(model.get_submodule(name)).__name__ for name in TARGETS},
            "ghosts": [name for name in TARGETS if isinstance(model.get_submodule(name), GhostConv2d)],
            "optimizer_matches": [id(p) for p in in_optimizer] == [id(p) for p in model.parameters()],
            "optimizer_params": len(in_optimizer),
            "model_params": len(list(model.parameters())),
            "numel": sum(p.numel() for p in model.parameters()),
            "losses": model.losses,
            "fit_errors": dict(callback.fit_errors),
            "epoch_lrs": model.epoch_lrs,
            "unchanged_in_last_epoch": [
                n for n, p in model.named_parameters() if torch.equal(p.detach(), model.at_epoch_start[n])
            ],
            "world_size": trainer.world_size,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compression/")},
        },
        out_dir / f"{mode}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    for name in sys.argv[2:]:
        run(Path(sys.argv[1]), name)
