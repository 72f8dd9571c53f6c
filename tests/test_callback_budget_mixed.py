"""BudgetConvCallback: one per-layer plan mixing Ghost, structured and dense layers, made on a recorded training batch,
applied as planned, met when counted independently, carried across a resume, reloadable from its checkpoints, refused
with the model unchanged, and identical on 2 DDP ranks (tests/scripts/ddp_budget.py, under ``lightning.pytorch``)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from nets import MIXING_GRID, USER_TARGETS, run_script, user_trainer
from torch import nn

from lightning_cheapconv import (
    BudgetConvCallback,
    GhostConv2d,
    GhostConvCallback,
    StructuredConv2d,
    install_restructure_hook,
)
from lightning_cheapconv import budget as budget_module
from lightning_cheapconv.callbacks.distill import Distiller
from lightning_cheapconv.complexity import count_complexity
from lightning_cheapconv.structure import StructureSpec, structural_residual

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*"),
    pytest.mark.filterwarnings("error:.*the checkpoint was saved with target layers.*"),
    pytest.mark.usefixtures("one_thread"),
]

SHAPE = (1, 3, 8, 8)


@pytest.fixture(autouse=True)
def mixing_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans on :data:`nets.MIXING_GRID`, where this small model's plan mixes the methods."""
    monkeypatch.setattr(budget_module, "CHANNEL_RATIOS", MIXING_GRID)


def applied_as_planned(model: nn.Module, plan: dict[str, dict[str, Any]]) -> None:
    """Every planned layer has the planned form and hyper-parameters."""
    for name, choice in plan.items():
        layer = model.get_submodule(name)
        if choice["method"] == "dense":
            assert type(layer) is nn.Conv2d, name
        elif choice["method"] == "ghost":
            assert isinstance(layer, GhostConv2d) and layer.ratio == choice["ratio"], name
        else:
            assert isinstance(layer, StructuredConv2d), name
            assert layer.hidden_channels == choice["channels"], name
            assert list(layer.hidden_kernel_size) == choice["kernel_size"], name


def fit(project: Any, callback: BudgetConvCallback, root: Path | None = None, ckpt_path: str | None = None) -> Any:
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    callbacks: list[Any] = [callback]
    if root is not None:
        callbacks.append(
            project.lp.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        )
    trainer = user_trainer(
        project.lp, max_epochs=3, deterministic=True, callbacks=callbacks, enable_checkpointing=root is not None
    )
    trainer.fit(model, datamodule=project.DataModule(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("key", ["macs", "params"])
def test_mixed_plan_applied_and_met(project: Any, key: str) -> None:
    model_before = project.Model(scheduler="none")
    before = getattr(count_complexity(model_before, input_shape=SHAPE), key)
    callback = BudgetConvCallback(start_epoch=1, calibration_batches=2, verbose=0, **{f"target_{key}": 0.6})
    model, trainer = fit(project, callback)
    after = getattr(count_complexity(model, input_shape=SHAPE), key)
    assert after / before <= 0.6 + 1e-9
    plan = callback.budget_plan
    assert plan is not None and set(plan) == set(USER_TARGETS)
    applied_as_planned(model, plan)
    if key == "macs":  # this model's plan at 0.6 of the MACs mixes the methods (seeded, deterministic)
        assert {c["method"] for c in plan.values()} == {"dense", "ghost", "structured"}
    logged = trainer.callback_metrics[f"compression/{key}_ratio"]
    assert float(logged) == pytest.approx(before / after, rel=1e-6)


def test_methods_restrict_the_plan(project: Any) -> None:
    callback = BudgetConvCallback(target_macs=0.6, methods="structured", verbose=0)
    model, _ = fit(project, callback)
    assert callback.budget_plan is not None
    assert {c["method"] for c in callback.budget_plan.values()} <= {"dense", "structured"}
    applied_as_planned(model, callback.budget_plan)


def test_resume_mid_mixed_schedule_equals_uninterrupted(project: Any, tmp_path: Path) -> None:
    def make() -> BudgetConvCallback:
        return BudgetConvCallback(target_macs=0.6, stages=2, start_epoch=1, end_epoch=2, verbose=0, distill=True)

    callback_a = make()
    model_a, _ = fit(project, callback_a, tmp_path / "a")
    assert len(callback_a.schedule.groups) == 2  # a stage before the checkpoint, one after
    callback_b = make()
    model_b, _ = fit(project, callback_b, tmp_path / "b", ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))
    assert callback_b.budget_plan == callback_a.budget_plan
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)

    # Every epoch's checkpoint (dense, half-converted, mixed) loads into a fresh model with its structure: Ghost
    # layers as Ghost modules, structured layers dense and exactly projected (decomposed at fit end only).
    plan = callback_a.budget_plan
    x = torch.randn(4, 3, 8, 8)
    for epoch in range(3):
        checkpoint = torch.load(tmp_path / "a" / f"epoch={epoch}.ckpt", weights_only=True)
        fresh = project.Model(scheduler="none")
        install_restructure_hook(fresh)
        fresh.load_state_dict(checkpoint["state_dict"])
        converted = []
        for name, choice in plan.items():
            layer = fresh.get_submodule(name)
            if choice["method"] == "ghost" and isinstance(layer, GhostConv2d):
                converted.append(name)
            elif choice["method"] == "structured":
                spec = StructureSpec(choice["channels"], tuple(choice["kernel_size"]))
                assert type(layer) is nn.Conv2d
                if float(structural_residual(layer.weight.detach(), spec)) < 1e-6:
                    converted.append(name)
        assert len(converted) == {0: 0, 1: 1, 2: 2}[epoch]  # the plan converts 2 layers, one per stage
    torch.testing.assert_close(fresh.eval()(x), model_a.eval()(x), atol=1e-5, rtol=0)  # decomposition is exact

    # Resumed with another budget: the checkpoint's plan continues, and the run says so.
    other = BudgetConvCallback(target_macs=0.4, stages=2, start_epoch=1, end_epoch=2, verbose=0)
    with pytest.warns(UserWarning, match=r"plan, made for target_macs=0.6, .*continues; this run asks target_macs=0.4"):
        fit(project, other, tmp_path / "c", ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))
    assert other.budget_plan == callback_a.budget_plan
    other = BudgetConvCallback(target_macs=0.6, methods="structured", stages=2, start_epoch=1, end_epoch=2, verbose=0)
    with pytest.warns(
        UserWarning, match=r"methods=\['ghost', 'structured'\], continues; this run asks .*methods=\['structured'\]"
    ):
        fit(project, other, tmp_path / "d", ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))


def test_refusals_leave_the_model_unchanged(project: Any) -> None:
    with pytest.raises(MisconfigurationException, match=r"no budget given; pass at least one of target_macs"):
        BudgetConvCallback()
    with pytest.raises(MisconfigurationException, match=r"methods=\['ghost', 'pruning'\] is not valid"):
        BudgetConvCallback(target_macs=0.5, methods=["ghost", "pruning"])
    with pytest.raises(MisconfigurationException, match=r"target_params=0 .*valid range"):
        BudgetConvCallback(target_params=0)
    with pytest.raises(MisconfigurationException, match=r"distill_logits=True has no effect with distill=False"):
        BudgetConvCallback(target_macs=0.5, distill_logits=True)
    # After the first training batch (its recorded input), not at the stage of epoch 1: no layer converted.
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    trainer = user_trainer(project.lp, callbacks=[BudgetConvCallback(target_macs=0.05, start_epoch=1, verbose=0)])
    with pytest.raises(
        MisconfigurationException,
        match=r"epoch 0 \(first training batch\): .*macs=0.05 cannot be met: the smallest reachable",
    ):
        trainer.fit(model, datamodule=project.DataModule())
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in USER_TARGETS)
    # At setup, with example_input_array: before any training step, the model bit-identical.
    model = project.Model(scheduler="none")
    model.example_input_array = torch.zeros(SHAPE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = user_trainer(project.lp, callbacks=[BudgetConvCallback(target_params=0.01, verbose=0)])
    with pytest.raises(MisconfigurationException, match=r"at setup: .*params=0.01 cannot be met.*smallest reachable"):
        trainer.fit(model, datamodule=project.DataModule())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_report_and_plan_printed(
    project: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        fit(project, BudgetConvCallback(target_macs=0.6, start_epoch=1, verbose=1))
    assert "budget plan (target_macs=0.6)" in caplog.text and "structured c=" in caplog.text  # the plan is logged
    assert "3 layer(s) selected, 1 skipped (backbone.stem.0: first " in caplog.text  # verbose=1 names what it skips
    # The plan at 0.6 mixes the methods: the structured layers project first, then the Ghost ones convert; both lines
    # count over the layers the plan converts, by method.
    projected = re.search(
        r"projecting (\d) layer\(s\) \(\1 of (\d) target layers now converted \(\1 structured, 0 Ghost\)", caplog.text
    )
    assert projected is not None and int(projected[1]) < int(projected[2])
    total, structured = int(projected[2]), int(projected[1])
    converted = f"({total} of {total} target layers now converted ({structured} structured, {total - structured} Ghost)"
    assert converted in caplog.text
    assert "BudgetConvCallback: original vs converted" in capsys.readouterr().out  # the report printed


def test_ddp_mixed_plan_identical_on_two_ranks(tmp_path: Path) -> None:
    done = run_script("ddp_budget.py", str(tmp_path), "lightning.pytorch", "budget", timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"budget_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert {c["method"] for c in ranks[0]["plan"].values()} == {"dense", "ghost", "structured"}
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["macs_fraction"] <= 0.6 + 1e-9
    assert ranks[0]["distill"] > 0
    assert ranks[0]["logged"].keys() == ranks[1]["logged"].keys() and "train/distill_epoch" in ranks[0]["logged"]
    assert ranks[0]["logged"] == ranks[1]["logged"]  # reduced across ranks (their batches differ)
    assert ranks[0]["unsynced"] == []  # no "use sync_dist=True" warning for the callback's metrics


def test_diverging_distillation_warns_once() -> None:
    """The distillation loss of a step above 100x its first step's (or not finite) is reported once per teacher."""
    distiller = Distiller(1.0, logits=False, temperature=1.0)
    assert not distiller.diverged(0.5)  # the first step
    assert not distiller.diverged(49.0)
    assert distiller.diverged(51.0)
    assert not distiller.diverged(1e9)  # reported once
    distiller.load_state(None)  # a new teacher: watched again
    assert distiller.diverged(float("nan"))


def test_diverging_distillation_warns_in_fit(project: Any) -> None:
    """A fit whose distillation explodes warns (here: an absurd distill_weight at a large learning rate)."""
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none", lr=5.0)
    callback = GhostConvCallback(start_epoch=0, ratio=2, verbose=0, distill=True, distill_weight=1e3)
    trainer = user_trainer(project.lp, max_epochs=3, callbacks=[callback])
    with pytest.warns(UserWarning, match=r"distillation is diverging: the distillation loss of a step reached"):
        trainer.fit(model, datamodule=project.DataModule())
