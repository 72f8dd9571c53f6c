"""A user's project under DDP (2 CPU processes, gloo), with either Lightning package: launched by
tests/test_lightning_projects.py.

Usage: ``python ddp_project.py OUT_DIR PACKAGE MODE [MODE ...]`` with ``PACKAGE`` ``pytorch_lightning`` or
``lightning.pytorch`` (the Trainer, the LightningModule base and ``strategy="ddp"`` all come from it), one fit per
mode in the same processes. Modes: ``ghost`` (``GhostConvCallback(start_epoch=1)``: converted mid-fit, after DDP
wrapped the model) and ``structured`` (``StructuredConvCallback()``: projection stages at epochs 1..2, decomposition
at fit end).

Each rank writes ``OUT_DIR/{mode}_rank{r}.json``: the world size, the type of every target layer, a SHA-256 of the
bytes of all final parameters (in ``named_parameters`` order), each parameter's sum, the logged ``compression/*``
figures and the user's own ``val_acc``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import torch
from nets import USER_TARGETS, user_project, user_trainer

from lightning_cheapconv import GhostConvCallback, StructuredConvCallback


def run(out_dir: Path, namespace: str, mode: str) -> None:
    lp = importlib.import_module(namespace)
    project = user_project(namespace)
    lp.seed_everything(0)
    model = project.Model()
    if mode == "ghost":
        callback = GhostConvCallback(start_epoch=1, verbose=0)
    elif mode == "structured":
        callback = StructuredConvCallback(verbose=0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    # 32 images, batch 4, 2 ranks: 4 steps per epoch on each rank.
    trainer = user_trainer(lp, max_epochs=3, devices=2, strategy="ddp", callbacks=[callback])
    trainer.fit(model, datamodule=project.DataModule(batch_size=4))
    digest = hashlib.sha256()
    sums = {}
    for name, param in model.named_parameters():
        data = param.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        sums[name] = float(data.double().sum())
    result = {
        "world_size": trainer.world_size,
        "types": {name: type(model.get_submodule(name)).__name__ for name in USER_TARGETS},
        "sha256": digest.hexdigest(),
        "sums": sums,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compression/")},
        "val_acc": float(trainer.callback_metrics.get("val_acc", torch.tensor(float("nan")))),
    }
    (out_dir / f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    for name in sys.argv[3:]:
        run(Path(sys.argv[1]), sys.argv[2], name)
