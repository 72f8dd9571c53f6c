"""Budgets and distillation under DDP (2 CPU processes, gloo), launched by tests/test_callback_budget.py.

Usage: ``python ddp_budget.py OUT_DIR PACKAGE [MODE ...]`` with ``PACKAGE`` ``pytorch_lightning`` or
``lightning.pytorch``. Modes (one fit each, in the same processes; default ``ghost structured``): ``ghost``
(``GhostConvCallback(target_macs=0.6, start_epoch=1, distill=True, distill_logits=True)``: planned on rank 0 at the
first stage, mid-fit), ``structured`` (``StructuredConvCallback(target_macs=0.6, distill=True)``: planned after the
first training batch) and ``budget`` (``BudgetConvCallback(target_macs=0.6, start_epoch=1, distill=True)``: a mixed
plan on ``nets.MIXING_GRID``, Ghost layers fitted on rank 0's calibration batches).

Each rank writes ``OUT_DIR/{mode}_rank{r}.json``: the world size, the budget plan, a SHA-256 of all final parameters,
the MAC fraction counted after fit, the last epoch's logged ``train/distill`` and ``compression/*`` values (synced
across ranks) and Lightning's warnings that recommend ``sync_dist=True`` for one of the callback's metrics.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import warnings
from pathlib import Path

from nets import MIXING_GRID, user_project, user_trainer

from lightning_cheapconv import BudgetConvCallback, GhostConvCallback, StructuredConvCallback
from lightning_cheapconv import budget as budget_module
from lightning_cheapconv.complexity import count_complexity


def run(out_dir: Path, namespace: str, mode: str) -> None:
    lp = importlib.import_module(namespace)
    project = user_project(namespace)
    lp.seed_everything(0)
    model = project.Model(scheduler="none")
    before = count_complexity(model, input_shape=(1, 3, 8, 8)).macs
    if mode == "ghost":
        callback = GhostConvCallback(start_epoch=1, verbose=0, target_macs=0.6, distill=True, distill_logits=True)
    elif mode == "budget":
        budget_module.CHANNEL_RATIOS = MIXING_GRID
        callback = BudgetConvCallback(target_macs=0.6, start_epoch=1, calibration_batches=2, verbose=0, distill=True)
    else:
        callback = StructuredConvCallback(verbose=0, target_macs=0.6, distill=True)
    trainer = user_trainer(lp, max_epochs=3, devices=2, strategy="ddp", callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=project.DataModule(batch_size=4))
    ours = ("'train/distill'", "'compression/")
    unsynced = [
        str(w.message) for w in caught if "sync_dist=True" in str(w.message) and any(k in str(w.message) for k in ours)
    ]
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    result = {
        "world_size": trainer.world_size,
        "plan": callback.budget_plan,
        "sha256": digest.hexdigest(),
        "macs_fraction": count_complexity(model, input_shape=(1, 3, 8, 8)).macs / before,
        "distill": float(trainer.callback_metrics.get("train/distill", float("nan"))),
        "logged": {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/distill", "compression/"))
        },
        "unsynced": unsynced,
    }
    (out_dir / f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    for name in sys.argv[3:] or ("ghost", "structured"):
        run(Path(sys.argv[1]), sys.argv[2], name)
