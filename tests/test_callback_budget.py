"""Budgets in the callbacks (``target_macs``/``target_params``/``target_latency_ms``): the plan made on a recorded
training batch, met when counted independently after fit (latency: by the plan's own predicted total, with a stubbed
timer), carried in the callback state across a resume, refused when unreachable with the model unchanged, and
identical on 2 DDP ranks (tests/scripts/ddp_budget.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from nets import USER_TARGETS, run_script, user_trainer
from torch import nn

from lightning_cheapconv import (
    BudgetConvCallback,
    GhostConv2d,
    GhostConvCallback,
    StructuredConv2d,
    StructuredConvCallback,
)
from lightning_cheapconv import budget as budget_module
from lightning_cheapconv.callbacks import base as base_module
from lightning_cheapconv.complexity import count_complexity
from lightning_cheapconv.deploy import Latency

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*"),
    pytest.mark.usefixtures("one_thread"),
]

SHAPE = (1, 3, 8, 8)


def macs(model: nn.Module) -> int:
    return count_complexity(model, input_shape=SHAPE).macs


@pytest.mark.parametrize(
    ("make", "kind", "key"),
    [
        (lambda: GhostConvCallback(start_epoch=1, verbose=0, target_macs=0.6), GhostConv2d, "macs"),
        (lambda: GhostConvCallback(verbose=0, target_params=0.6, stages=2, end_epoch=1), GhostConv2d, "params"),
        (lambda: StructuredConvCallback(verbose=0, target_macs=0.6), StructuredConv2d, "macs"),
    ],
    ids=["ghost-macs", "ghost-params-staged", "structured-macs"],
)
def test_budget_met_counted_independently(project: Any, make: Any, kind: type, key: str) -> None:
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    before = count_complexity(model, input_shape=SHAPE)
    callback = make()
    trainer = user_trainer(project.lp, max_epochs=3, callbacks=[callback])
    trainer.fit(model, datamodule=project.DataModule())
    after = count_complexity(model, input_shape=SHAPE)
    fraction = getattr(after, key) / getattr(before, key)
    assert fraction <= 0.6 + 1e-9
    assert callback.budget_plan is not None and set(callback.budget_plan) == set(USER_TARGETS)
    converted = {n for n, c in callback.budget_plan.items() if c["method"] != "dense"}
    assert converted and {n for n in USER_TARGETS if isinstance(model.get_submodule(n), kind)} == converted
    assert callback.todo == [n for n in USER_TARGETS if n in converted]
    if kind is GhostConv2d:
        assert {n: model.get_submodule(n).ratio for n in converted} == {
            n: callback.budget_plan[n]["ratio"] for n in converted
        }


def count_scored_layers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The layers scored by every planning pass so far (a layer once per calibration pass that scores it)."""
    scored: list[str] = []
    score = budget_module._Sensitivities.__call__

    def counting(self: Any, module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
        if name not in self.structured:
            scored.append(name)
        score(self, module, args, output, name)

    monkeypatch.setattr(budget_module._Sensitivities, "__call__", counting)
    return scored


def test_infeasible_budget_refused_after_the_first_batch_model_unchanged(
    project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored = count_scored_layers(monkeypatch)
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    callback = GhostConvCallback(start_epoch=1, verbose=0, target_macs=0.05)
    trainer = user_trainer(project.lp, max_epochs=3, callbacks=[callback])
    with pytest.raises(
        MisconfigurationException,
        match=r"epoch 0 \(first training batch\): .*macs=0.05 cannot be met: the smallest reachable .*the model is "
        r"unchanged \(restored to what fit received",
    ):
        trainer.fit(model, datamodule=project.DataModule())
    assert trainer.global_step == 1  # the first batch trained (its input was needed), and was undone:
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in USER_TARGETS)
    assert scored == []  # the early refusal counts costs only: no sensitivity was computed


@pytest.mark.parametrize(
    ("make", "example", "kept"),
    [
        (lambda: GhostConvCallback(start_epoch=1, verbose=0, target_macs=0.6), False, True),
        (lambda: GhostConvCallback(start_epoch=1, verbose=0, target_macs=0.6), True, False),  # checked at setup
        (lambda: GhostConvCallback(start_epoch=1, verbose=0, target_latency_ms=1e3), False, False),  # first stage
        (lambda: StructuredConvCallback(verbose=0, target_macs=0.6), True, False),
        (lambda: StructuredConvCallback(verbose=0, target_latency_ms=1e3), True, True),  # planned after batch 1
    ],
    ids=["ghost-macs", "ghost-macs-example", "ghost-latency", "structured-macs-example", "structured-latency"],
)
def test_state_kept_over_the_first_batch_only_where_it_may_refuse(
    project: Any, monkeypatch: pytest.MonkeyPatch, make: Any, example: bool, kept: bool
) -> None:
    """The copy of the module's state that a first-batch refusal restores is taken only where such a refusal can
    come (not once per fit for nothing: a model's worth of host memory and copying)."""
    copied: list[str] = []
    monkeypatch.setattr(base_module, "_copy", lambda value: copied.append("x") or value)
    monkeypatch.setattr(budget_module, "time_interleaved", lambda candidates, *a, **k: {
        label: Latency((1.0,)) for label in candidates
    })  # fmt: skip
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    if example:
        model.example_input_array = torch.zeros(SHAPE)
    user_trainer(project.lp, max_epochs=2, callbacks=[make()]).fit(model, datamodule=project.DataModule())
    assert bool(copied) == kept


def test_early_budget_check_counts_costs_only_and_the_stage_plans_once(
    project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored = count_scored_layers(monkeypatch)
    project.lp.seed_everything(0)
    callback = GhostConvCallback(start_epoch=1, verbose=0, target_macs=0.6)
    user_trainer(project.lp, max_epochs=2, callbacks=[callback]).fit(
        project.Model(scheduler="none"), datamodule=project.DataModule()
    )
    assert callback._budget_checked and callback.budget_plan is not None
    assert sorted(scored) == sorted(USER_TARGETS)  # one scoring pass: the first stage's plan


def test_infeasible_budget_refused_at_setup_with_example_input(project: Any) -> None:
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    model.example_input_array = torch.zeros(SHAPE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    callback = StructuredConvCallback(verbose=0, target_params=0.01)
    trainer = user_trainer(project.lp, max_epochs=1, callbacks=[callback])
    with pytest.raises(MisconfigurationException, match=r"at setup: .*params=0.01 cannot be met.*smallest reachable"):
        trainer.fit(model, datamodule=project.DataModule())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_budget_arguments_refused() -> None:
    with pytest.raises(MisconfigurationException, match=r"target_macs=1.5 .*valid range"):
        GhostConvCallback(target_macs=1.5)
    with pytest.raises(MisconfigurationException, match=r"target_latency_ms=0 .*valid range"):
        StructuredConvCallback(target_latency_ms=0)
    with pytest.raises(MisconfigurationException, match=r"dw_size=5 .*budget"):
        GhostConvCallback(target_macs=0.5, dw_size=5)
    with pytest.raises(MisconfigurationException, match=r"channel_multiple=0 is out of range; valid range is >= 1"):
        BudgetConvCallback(target_macs=0.5, channel_multiple=0)
    with pytest.raises(MisconfigurationException, match=r"channel_multiple=16\.0 is not an int; .*, got a float"):
        StructuredConvCallback(target_macs=0.5, channel_multiple=16.0)
    with pytest.warns(UserWarning, match=r"channel_multiple=16 has no effect without a budget"):
        GhostConvCallback(channel_multiple=16)
    with pytest.raises(MisconfigurationException, match=r"latency_runtime='onnxruntime' is where target_latency_ms"):
        BudgetConvCallback(target_macs=0.5, latency_runtime="onnxruntime")
    with pytest.raises(MisconfigurationException, match=r"latency_runtime='ort' is not valid; valid values are"):
        StructuredConvCallback(target_latency_ms=5.0, latency_runtime="ort")


def _fits_the_multiple(choice: dict[str, Any], in_channels: int, out_channels: int, multiple: int) -> bool:
    """Whether a plan's choice creates only channel counts that are multiples of ``multiple`` (``c = C`` allowed)."""
    if choice["method"] == "structured":
        return choice["channels"] in (in_channels, *range(0, in_channels + 1, multiple))
    if choice["method"] == "ghost":
        return -(-out_channels // choice["ratio"]) % multiple == 0
    return True


def test_channel_multiple_reaches_the_plan(project: Any) -> None:
    """``channel_multiple`` restricts the callback's plan; the same fit without it plans channel counts it rules out
    (the body convs are 16 -> 16, 16 -> 32 and 32 -> 32 at width 16)."""
    plans = {}
    for multiple in (1, 16):
        project.lp.seed_everything(0)
        model = project.Model(scheduler="none", width=16)
        shapes = {n: (model.get_submodule(n).in_channels, model.get_submodule(n).out_channels) for n in USER_TARGETS}
        callback = BudgetConvCallback(target_macs=0.45, verbose=0, channel_multiple=multiple, calibration_batches=2)
        user_trainer(project.lp, max_epochs=1, callbacks=[callback]).fit(model, datamodule=project.DataModule())
        assert macs(model) <= 0.45 * macs(project.Model(scheduler="none", width=16)) + 1e-9
        plans[multiple] = {n: _fits_the_multiple(callback.budget_plan[n], *shapes[n], 16) for n in USER_TARGETS}
    assert all(plans[16].values()), plans
    assert not all(plans[1].values()), plans


def test_changed_budget_arguments_warn_on_resume_and_evaluation(project: Any, tmp_path: Path) -> None:
    """A resumed fit whose callback asks another channel_multiple continues the checkpoint's plan and says so (other
    budgets and methods: tests/test_callback_budget_mixed.py); a validate whose callback asks another budget runs the
    checkpoint's plan and says so, and only then."""
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none", width=16)
    checkpoint = project.lp.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    callback = BudgetConvCallback(target_macs=0.6, verbose=0, methods="structured", calibration_batches=2)
    trainer = user_trainer(project.lp, max_epochs=1, callbacks=[callback, checkpoint], enable_checkpointing=True)
    trainer.fit(model, datamodule=project.DataModule())
    ckpt = tmp_path / "epoch=0.ckpt"
    resumed = BudgetConvCallback(
        target_macs=0.6, verbose=0, methods="structured", calibration_batches=2, channel_multiple=16
    )
    trainer = user_trainer(project.lp, max_epochs=2, callbacks=[resumed])
    with pytest.warns(
        UserWarning,
        match=r"made for target_macs=0\.6, methods=\['structured'\], continues; this run asks target_macs=0\.6, "
        r"channel_multiple=16, methods=\['structured'\]",
    ):
        trainer.fit(project.Model(scheduler="none", width=16), datamodule=project.DataModule(), ckpt_path=ckpt)
    assert resumed.budget_plan == callback.budget_plan
    for asked, warned in ((0.5, True), (0.6, False)):
        evaluating = BudgetConvCallback(target_macs=asked, verbose=0, methods="structured")
        trainer = user_trainer(project.lp, callbacks=[evaluating])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.validate(project.Model(scheduler="none", width=16), datamodule=project.DataModule(), ckpt_path=ckpt)
        assert evaluating.budget_plan == callback.budget_plan  # the plan validated, whatever this callback asks
        messages = [str(w.message) for w in caught if "runs the checkpoint's budget plan" in str(w.message)]
        assert messages == (
            [
                "BudgetConvCallback: validate runs the checkpoint's budget plan, made for target_macs=0.6, "
                "methods=['structured'], as the checkpoint's layers are; this callback's target_macs=0.5, "
                "methods=['structured'] apply to its next trainer.fit."
            ]
            if warned
            else []
        )


def test_resume_mid_planned_schedule_equals_uninterrupted(project: Any, tmp_path: Path) -> None:
    def run(root: Path, ckpt_path: str | None = None) -> tuple[Any, GhostConvCallback]:
        project.lp.seed_everything(0)
        model = project.Model(scheduler="none")
        callback = GhostConvCallback(stages=2, start_epoch=1, end_epoch=2, verbose=0, target_macs=0.5)
        checkpoint = project.lp.callbacks.ModelCheckpoint(
            dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1
        )
        trainer = user_trainer(
            project.lp, max_epochs=3, deterministic=True, callbacks=[callback, checkpoint], enable_checkpointing=True
        )
        trainer.fit(model, datamodule=project.DataModule(), ckpt_path=ckpt_path)
        return model, callback

    model_a, callback_a = run(tmp_path / "a")
    assert len(callback_a.schedule.groups) == 2  # a stage before the checkpoint, one after
    ckpt = tmp_path / "a" / "epoch=1.ckpt"
    model_b, callback_b = run(tmp_path / "b", ckpt_path=str(ckpt))
    assert callback_b.budget_plan == callback_a.budget_plan
    assert callback_b.schedule == callback_a.schedule
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_ddp_plan_identical_on_two_ranks(tmp_path: Path) -> None:
    done = run_script("ddp_budget.py", str(tmp_path), "pytorch_lightning", timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for mode in ("ghost", "structured"):
        ranks = [json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["world_size"] == 2
        assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["plan"]
        assert ranks[0]["sha256"] == ranks[1]["sha256"]
        assert ranks[0]["macs_fraction"] <= 0.6 + 1e-9
        assert ranks[0]["distill"] > 0
        assert ranks[0]["logged"].keys() == ranks[1]["logged"].keys() and "train/distill_epoch" in ranks[0]["logged"]
        assert ranks[0]["logged"] == ranks[1]["logged"]  # reduced across ranks (their batches differ)
        assert ranks[0]["unsynced"] == []  # no "use sync_dist=True" warning for the callback's metrics


# -- latency budgets, with a stubbed timer (no real timing in tests) -----------------------------------------------
MODEL_MS, DENSE_MS, STRUCTURED_MS = 10.0, 2.0, 1.5
"""The stubbed timer: the whole model 10 ms; each planned layer 2 ms dense, 2/s ms as a Ghost module with ratio s,
1.5 ms structured. The 3 planned layers (USER_TARGETS) leave 10 - 3·2 = 4 ms outside them."""


def _stub_ms(label: str) -> float:
    if label == "model":
        return MODEL_MS
    if label.startswith("ghost s="):
        return DENSE_MS / int(label.removeprefix("ghost s="))
    return DENSE_MS if label == "dense" else STRUCTURED_MS


def _form_ms(layer: nn.Module) -> float:
    """What the stub gives the form ``layer`` ended in."""
    if isinstance(layer, GhostConv2d):
        return DENSE_MS / layer.ratio
    return STRUCTURED_MS if isinstance(layer, StructuredConv2d) else DENSE_MS


@pytest.fixture
def stub_timing(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Replace the planner's timer with :func:`_stub_ms` and record each plan made (and the model's state and layer
    types when planning starts)."""
    seen: dict[str, list] = {"timed": [], "plans": [], "before": []}
    real_plan_budget = budget_module.plan_budget

    def fake_timer(candidates: dict, *args: Any, **kwargs: Any) -> dict[str, Latency]:
        seen["timed"].append(sorted(candidates))
        return {label: Latency((_stub_ms(label),)) for label in candidates}

    def recording_plan_budget(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        seen["before"].append((state, [(n, type(m)) for n, m in model.named_modules()]))
        plan = real_plan_budget(model, *args, **kwargs)
        seen["plans"].append(plan)
        return plan

    monkeypatch.setattr(budget_module, "time_interleaved", fake_timer)
    monkeypatch.setattr(budget_module, "plan_budget", recording_plan_budget)
    # The planned model as a whole takes what its layers add up to.
    monkeypatch.setattr(budget_module, "_measure_latency", lambda model, example, plan, *args: plan.total("latency_ms"))
    return seen


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: GhostConvCallback(start_epoch=1, verbose=0, target_latency_ms=8.5), GhostConv2d),
        (lambda: StructuredConvCallback(verbose=0, target_latency_ms=8.5), StructuredConv2d),
        (lambda: BudgetConvCallback(start_epoch=1, verbose=0, target_latency_ms=8.5), (GhostConv2d, StructuredConv2d)),
    ],
    ids=["ghost", "structured", "mixed"],
)
def test_latency_budget_met_by_the_plans_predicted_total(
    project: Any, stub_timing: dict[str, list], make: Any, kind: type
) -> None:
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    callback = make()
    trainer = user_trainer(project.lp, max_epochs=2, callbacks=[callback])
    trainer.fit(model, datamodule=project.DataModule())
    [plan] = stub_timing["plans"]  # planned once, on the recorded training batch
    assert ["model"] in stub_timing["timed"] and any("dense" in labels for labels in stub_timing["timed"])
    assert plan.budgets == {"latency_ms": 8.5} and [layer.name for layer in plan.layers] == list(USER_TARGETS)
    assert plan.before["latency_ms"] == MODEL_MS
    assert plan.fixed["latency_ms"] == pytest.approx(MODEL_MS - len(USER_TARGETS) * DENSE_MS)
    assert all(c.latency_ms == _stub_ms(c.label) for layer in plan.layers for c in layer.candidates)
    assert plan.total("latency_ms") <= 8.5
    # The converted model, read back through the stub, predicts the plan's total: the plan is what was applied.
    final = plan.fixed["latency_ms"] + sum(_form_ms(model.get_submodule(n)) for n in USER_TARGETS)
    assert final == pytest.approx(plan.total("latency_ms"))
    converted = {n for n, c in callback.budget_plan.items() if c["method"] != "dense"}
    assert converted == {layer.name for layer in plan.layers if layer.choice.method != "dense"} and converted
    assert {n for n in USER_TARGETS if isinstance(model.get_submodule(n), kind)} == converted


def test_latency_budget_measured_in_onnxruntime(project: Any) -> None:
    """``latency_runtime="onnxruntime"``: the plan's latencies come from ONNX Runtime sessions on the exported forms
    and the exported LightningModule (real exports: 3 layers x dense and Ghost s = 2, 3, 4, the model and its planned
    copy, exported without the Trainer)."""
    pytest.importorskip("onnxruntime")
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    callback = GhostConvCallback(start_epoch=1, verbose=0, target_latency_ms=1e3, latency_runtime="onnxruntime")
    exported: list[str] = []
    real_runner = budget_module.onnx_runner

    def recording_runner(module: nn.Module, *args: Any) -> Any:
        exported.append(type(module).__name__)
        return real_runner(module, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget_module, "onnx_runner", recording_runner)
        user_trainer(project.lp, max_epochs=2, callbacks=[callback]).fit(model, datamodule=project.DataModule())
    # Then the model, and its planned copy (all dense here) timed against it as a whole.
    assert exported == ["Conv2d", "GhostConv2d", "GhostConv2d", "GhostConv2d"] * 3 + ["UserModel"] * 2
    # 1 s per batch is met by the dense model: the plan keeps every layer dense.
    assert {n: c["method"] for n, c in callback.budget_plan.items()} == dict.fromkeys(USER_TARGETS, "dense")


@pytest.mark.parametrize(
    ("make", "smallest"),
    [
        # Every layer at its cheapest candidate: 4 ms outside + 3 x 2/4 ms (Ghost s=4), 3 x 1.5 ms (structured) or,
        # mixed (Ghost s=2 only where a layer may be structured), 3 x 1 ms.
        (lambda: GhostConvCallback(start_epoch=1, verbose=0, target_latency_ms=3.0), r"5\.5 ms"),
        (lambda: StructuredConvCallback(verbose=0, target_latency_ms=3.0), r"8\.5 ms"),
        (lambda: BudgetConvCallback(start_epoch=1, verbose=0, target_latency_ms=3.0), r"7 ms"),
    ],
    ids=["ghost", "structured", "mixed"],
)
def test_unreachable_latency_budget_refused_naming_the_smallest_reachable_model_unchanged(
    project: Any, stub_timing: dict[str, list], make: Any, smallest: str
) -> None:
    """Refused at the first stage (Ghost, mixed: epoch 1) the model keeps its training and no layer is converted;
    refused after the first batch (structured plans there) it is restored to what fit received."""
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    received = {k: v.clone() for k, v in model.state_dict().items()}
    callback = make()
    first_batch = isinstance(callback, StructuredConvCallback)
    trainer = user_trainer(project.lp, max_epochs=2, callbacks=[callback])
    outcome = r"the model is unchanged \(restored" if first_batch else r"no layer was converted \(the training so far"
    with pytest.raises(
        MisconfigurationException,
        match=rf"latency_ms=3 cannot be met: the smallest reachable value is {smallest} .*{outcome}",
    ):
        trainer.fit(model, datamodule=project.DataModule())
    assert stub_timing["plans"] == []  # refused, not planned
    [(at_planning, modules)] = stub_timing["before"]
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    state = received if first_batch else at_planning
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in USER_TARGETS)
