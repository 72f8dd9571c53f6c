"""GhostConvCallback (lightning_cheapconv/callbacks/ghost.py): end-to-end Trainer runs on CPU.

All-at-start and progressive conversion, the live optimizer after each stage, LR schedulers across a conversion,
resume between stages, calibration on real activations, checkpoints of every stage, compression logging (and the
paper's CIFAR figures), a user's own LightningModule, DDP (in a subprocess: tests/scripts/ddp_ghost.py), and the
arguments and strategies it refuses.
"""

from __future__ import annotations

import copy
import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.utilities.exceptions import MisconfigurationException
from nets import GHOST_TARGETS, TinyNet, quiet_trainer, run_script
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cheapconv import (
    DigitsDataModule,
    GhostConv2d,
    GhostConvCallback,
    ImageClassifier,
    convert_to_ghost,
    count_complexity,
)
from lightning_cheapconv.convert import capture_inputs, ghost_from_conv
from lightning_cheapconv.models import vgg16

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.usefixtures("one_thread"),
]


TARGETS = GHOST_TARGETS


# ---------------------------------------------------------------------------------------------- helpers
class GroupedNet(TinyNet):
    """A user's optimizer with its own groups (AdamW, body and head at different learning rates, no decay on
    ndim<=1 parameters), built in an order that is not the model's."""

    def configure_optimizers(self) -> Any:
        head = list(self.fc.parameters())
        body = [p for n, p in self.named_parameters() if not n.startswith("fc.")]
        return torch.optim.AdamW(
            [
                {"params": head, "lr": 1e-2},
                {"params": [p for p in body if p.ndim > 1], "lr": 1e-3, "weight_decay": 1e-4},
                {"params": [p for p in body if p.ndim <= 1], "lr": 1e-3, "weight_decay": 0.0},
            ]
        )


class ManualNet(TinyNet):
    """Manual optimization: the user's training_step steps the optimizer itself."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n: int = 64, batch_size: int = 16, size: int = 8) -> DataLoader:
    """Fixed random 4-class images, no shuffle (deterministic runs)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def make_trainer(**kwargs: Any) -> pl.Trainer:
    return quiet_trainer(**{"max_epochs": 3, "deterministic": True, **kwargs})


def param_ids(params: Any) -> list[int]:
    return [id(p) for p in params]


def group_ids(optimizer: torch.optim.Optimizer) -> list[list[int]]:
    return [param_ids(g["params"]) for g in optimizer.param_groups]


def fresh_group_ids(model: pl.LightningModule) -> list[list[int]]:
    """The param groups a fresh ``configure_optimizers`` on the (converted) model gives."""
    config = model.configure_optimizers()
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    return group_ids(optimizer)


def ghosts(model: nn.Module) -> set[str]:
    return {n for n in TARGETS if isinstance(model.get_submodule(n), GhostConv2d)}


def tensors(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["epoch"]): float(r[key]) for r in rows if r.get(key)}


class OptimizerProbe(Callback):
    """Placed after the GhostConvCallback: at each epoch start (after any conversion) record which layers are
    Ghost and check the live optimizer against the model."""

    def __init__(self) -> None:
        self.ghosts_at: dict[int, set[str]] = {}
        self.params_at: dict[int, dict[str, torch.Tensor]] = {}
        self.problems: list[str] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.ghosts_at[epoch] = ghosts(pl_module)
        self.params_at[epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        model_ids = param_ids(pl_module.parameters())
        in_optimizer = [i for group in group_ids(trainer.optimizers[0]) for i in group]
        if sorted(in_optimizer) != sorted(model_ids) or len(set(in_optimizer)) != len(in_optimizer):
            self.problems.append(f"epoch {epoch}: optimizer parameters are not exactly the model's")
        stale = [p for p in trainer.optimizers[0].state if id(p) not in set(model_ids)]
        if stale:
            self.problems.append(f"epoch {epoch}: optimizer state kept for {len(stale)} removed parameter(s)")
        # Conversions at this epoch's start (not calibrated ones later in an epoch) have not stepped yet.
        converted_now = self.ghosts_at[epoch] - self.ghosts_at.get(epoch - 1, set())
        new_params = [p for name in converted_now for p in pl_module.get_submodule(name).parameters()]
        if any(trainer.optimizers[0].state.get(p) for p in new_params):
            self.problems.append(f"epoch {epoch}: new parameters start with optimizer state")


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ratio": 1}, "ratio"),
        ({"ratio": 2.5}, "ratio"),
        ({"dw_size": 2}, "dw_size"),
        ({"dw_size": 0}, "dw_size"),
        ({"init": "foo"}, "init"),
        ({"stages": 0}, "stages"),
        ({"start_epoch": 3, "end_epoch": 1}, "end_epoch"),
        ({"end_epoch": 1.5}, "end_epoch"),
        ({"end_epoch": True}, "end_epoch"),
        ({"stages": True}, "stages"),
        ({"start_epoch": -1}, "start_epoch"),
        ({"calibration_batches": -2}, "calibration_batches"),
        ({"order": "middle_first"}, "order"),
        ({"verbose": 3}, "verbose"),
        ({"include": 5}, "include"),
        ({"exclude": [1, 2]}, "exclude"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(MisconfigurationException, match=name):
        GhostConvCallback(**kwargs)


def test_include_matching_nothing_fails_at_setup_with_reasons() -> None:
    trainer = make_trainer(callbacks=[GhostConvCallback(include="nothing.*", verbose=0)])
    with pytest.raises(MisconfigurationException) as info:
        trainer.fit(TinyNet(), loader())
    message = str(info.value)
    assert "include='nothing.*'" in message
    for name in ("stem", *TARGETS):
        assert f"{name}: not matched by include" in message


def test_only_skipped_layers_names_every_reason() -> None:
    # c1..c3 have 16 output channels: with ratio 32 none of them can become a Ghost module.
    trainer = make_trainer(callbacks=[GhostConvCallback(ratio=32, verbose=0)])
    with pytest.raises(MisconfigurationException, match="out_channels=16 < ratio=32"):
        trainer.fit(TinyNet(), loader())


# ---------------------------------------------------------------------------------------------- strategies
def _fake_trainer(strategy_cls: type) -> Any:
    return SimpleNamespace(strategy=strategy_cls.__new__(strategy_cls), callbacks=[])


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, DeepSpeedStrategy])
def test_sharded_strategies_refused_when_conversion_is_mid_fit(strategy_cls: type) -> None:
    for callback in (GhostConvCallback(start_epoch=1, verbose=0), GhostConvCallback(calibration_batches=1)):
        with pytest.raises(MisconfigurationException, match=f"{strategy_cls.__name__} is not supported"):
            callback.setup(_fake_trainer(strategy_cls), TinyNet(), "fit")


def test_ddp_spawn_refused_with_advice_to_use_ddp() -> None:
    trainer = make_trainer(strategy="ddp_spawn", devices=2)
    for callback in (GhostConvCallback(verbose=0), GhostConvCallback(stages=2, verbose=0)):
        model = TinyNet()
        with pytest.raises(MisconfigurationException, match="Use strategy='ddp'"):
            callback.setup(trainer, model, "fit")
        assert ghosts(model) == set()  # refused before anything changed


def test_ddp_accepted_for_mid_fit_conversion() -> None:
    trainer = make_trainer(strategy="ddp", devices=2)
    callback = GhostConvCallback(stages=2, start_epoch=1, verbose=0)
    callback.setup(trainer, TinyNet(), "fit")  # no launch: setup only checks and plans
    assert callback.schedule is not None and callback.schedule.epochs == (1, 2)


class Rank0Says:
    """A strategy stand-in whose broadcast hands back what "rank 0" computed, not the local value."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload
        self.calls: list[Any] = []

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self.calls.append(obj)
        return self.payload


@pytest.mark.parametrize("rank0_index", [None, list(range(15, -1, -1))], ids=["identity", "reversed"])
def test_conversion_takes_rank0_channel_assignment_and_error(rank0_index: list[int] | None) -> None:
    """Ranks whose fits differ (calibration data) must end with rank 0's module; an identity assignment stores no
    output_index buffer, so the assignment is agreed before the tensors are broadcast."""
    model = TinyNet()
    callback = GhostConvCallback(verbose=0)
    callback.setup(make_trainer(), copy.deepcopy(model), "fit")  # plans the targets
    strategy = Rank0Says((rank0_index, 0.25))
    callback._convert(SimpleNamespace(strategy=strategy, callbacks=[]), model, ["c1"], "test", mid_fit=False)
    local_index, local_error = strategy.calls[0]
    assert local_index is not None and local_error != 0.25  # the local fit permutes the channels
    ghost = model.c1
    expected = None if rank0_index is None else torch.tensor(rank0_index)
    assert (ghost.output_index is None) == (expected is None)
    if expected is not None:
        assert torch.equal(ghost.output_index, expected)
    assert callback.fit_errors["c1"] == 0.25
    x = torch.randn(2, 8, 8, 8)
    assert ghost(x).shape == (2, 16, 8, 8)


# ---------------------------------------------------------------------------------------------- all at start
class RecordingNet(TinyNet):
    def configure_optimizers(self) -> Any:
        self.seen_at_configure = ghosts(self)
        return super().configure_optimizers()


def test_all_at_start_converts_in_setup_before_configure_optimizers() -> None:
    model = RecordingNet()
    stem_before, fc_before = model.stem.weight.detach().clone(), model.fc.weight.detach().clone()
    callback = GhostConvCallback(verbose=0)
    probe = OptimizerProbe()
    trainer = make_trainer(max_epochs=1, callbacks=[callback, probe])
    trainer.fit(model, loader())
    assert model.seen_at_configure == set(TARGETS)
    assert group_ids(trainer.optimizers[0]) == [param_ids(model.parameters())]
    assert probe.problems == []
    assert isinstance(model.stem, nn.Conv2d) and isinstance(model.fc, nn.Linear)  # skip_first / skip_last
    assert model.stem.weight.shape == stem_before.shape and model.fc.weight.shape == fc_before.shape
    assert set(callback.fit_errors) == set(TARGETS)
    assert all(0.0 <= e < 1.0 for e in callback.fit_errors.values())
    assert all(math.isfinite(v) for v in model.losses)


def test_all_at_start_inherits_the_dense_function() -> None:
    """Right after setup the converted model is the kernel-space fit of the dense one: the outputs of an
    intrinsic channel are unchanged, and the whole model is closer to the dense model than a random Ghost."""
    dense = TinyNet()
    x = next(iter(loader()))[0]
    inherited, random_init = copy.deepcopy(dense), copy.deepcopy(dense)
    for model, init in ((inherited, "inherit"), (random_init, "random")):
        GhostConvCallback(init=init, verbose=0).setup(make_trainer(), model, "fit")
        assert ghosts(model) == set(TARGETS)
    with torch.no_grad():
        dense.eval(), inherited.eval(), random_init.eval()
        reference = dense(x)
        err_inherit = (inherited(x) - reference).norm() / reference.norm()
        err_random = (random_init(x) - reference).norm() / reference.norm()
    assert err_inherit < err_random


# ---------------------------------------------------------------------------------------------- progressive
@pytest.mark.parametrize(
    ("schedule", "stage_epochs"),
    [({"stages": 2, "end_epoch": 1}, (0, 1)), ({"stages": 2, "start_epoch": 1, "end_epoch": 2}, (1, 2))],
    ids=["epochs-0-1", "epochs-1-2"],
)
@pytest.mark.parametrize("net", [TinyNet, GroupedNet, ManualNet])
def test_progressive_conversion_keeps_the_optimizer_exact(schedule: dict, stage_epochs: tuple, net: type) -> None:
    model = net()
    callback = GhostConvCallback(verbose=0, **schedule)
    probe = OptimizerProbe()
    trainer = make_trainer(max_epochs=3, callbacks=[callback, probe])
    trainer.fit(model, loader(), loader(n=16))
    # Deep first: c3, c2 in the first stage, c1 in the second.
    first, second = stage_epochs
    assert probe.ghosts_at[first] == {"c3", "c2"}
    assert probe.ghosts_at[second] == set(TARGETS)
    if first > 0:
        assert probe.ghosts_at[first - 1] == set()
    assert ghosts(model) == set(TARGETS)
    assert probe.problems == []
    # The live optimizer lists exactly the model's parameters, in the order a fresh configure_optimizers gives.
    optimizer = trainer.optimizers[0]
    assert group_ids(optimizer) == fresh_group_ids(model)
    assert {id(p) for p in optimizer.state} <= set(param_ids(model.parameters()))
    if net is GroupedNet:
        assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3, 1e-3]
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 1e-4, 0.0]
    # Training went on with the new modules: every parameter moved during the last epoch, loss stays finite.
    assert [n for n, p in model.named_parameters() if torch.equal(p, probe.params_at[2][n])] == []
    assert len(model.losses) == 3 * 4 and all(math.isfinite(v) for v in model.losses)
    assert set(callback.fit_errors) == set(TARGETS)
    assert "my_val_loss" in trainer.callback_metrics  # the user's own logging is untouched


def test_progressive_conversion_under_image_classifier_groups() -> None:
    """ImageClassifier: decay and no-decay groups, a per-step LambdaLR schedule."""
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    model = ImageClassifier(backbone, num_classes=4, lr=0.05)
    trainer = make_trainer(max_epochs=2, callbacks=[GhostConvCallback(stages=2, end_epoch=1, verbose=0)])
    trainer.fit(model, loader())
    assert isinstance(model.backbone[3], GhostConv2d) and isinstance(model.backbone[5], GhostConv2d)
    assert group_ids(trainer.optimizers[0]) == fresh_group_ids(model)


def test_user_optimizer_with_the_old_layer_frozen_out() -> None:
    """A user optimizer that does not train the converted layers does not start training them."""

    class HeadOnly(TinyNet):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.fc.parameters(), lr=0.1)

    model = HeadOnly()
    trainer = make_trainer(max_epochs=2, callbacks=[GhostConvCallback(start_epoch=1, verbose=0)])
    trainer.fit(model, loader())
    assert ghosts(model) == set(TARGETS)
    assert group_ids(trainer.optimizers[0]) == fresh_group_ids(model)


def test_stages_after_max_epochs_warn_and_stay_dense(capsys: pytest.CaptureFixture) -> None:
    model = TinyNet()
    trainer = make_trainer(max_epochs=2, callbacks=[GhostConvCallback(stages=2, start_epoch=1, end_epoch=2)])
    with pytest.warns(
        UserWarning, match=r"the last epoch this fit starts is 1 \(max_epochs=2, .*1 layer\(s\) will stay dense: c1\."
    ):
        trainer.fit(model, loader())  # default verbose=1 and no validation loop: the report still works
    assert "original vs Ghost" in capsys.readouterr().out
    assert ghosts(model) == {"c3", "c2"}
    assert group_ids(trainer.optimizers[0]) == fresh_group_ids(model)


# ---------------------------------------------------------------------------------------------- LR schedulers
@pytest.mark.parametrize("scheduler", ["step", "cosine"])
def test_lr_schedule_continues_across_conversion(scheduler: str) -> None:
    lrs = []
    for callbacks in ([], [GhostConvCallback(stages=2, start_epoch=1, end_epoch=2, verbose=0)]):
        model = TinyNet(scheduler=scheduler)
        trainer = make_trainer(max_epochs=4, callbacks=callbacks)
        trainer.fit(model, loader())
        config = trainer.lr_scheduler_configs[0]
        assert config.scheduler.optimizer is trainer.optimizers[0]
        lrs.append(model.step_lrs)
    plain, converted = lrs
    assert len(plain) == 16
    assert len(set(plain)) > 3  # the schedule really moves
    assert converted == plain


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("schedule", "resume_epoch"),
    [
        ({"stages": 2, "start_epoch": 1, "end_epoch": 2}, 1),  # stage 1 mid-fit, stage 2 after resume
        ({"stages": 2, "start_epoch": 0, "end_epoch": 1}, 0),  # stage 1 in setup, stage 2 after resume
        ({"stages": 2, "start_epoch": 1, "end_epoch": 2}, 0),  # both stages after resume
    ],
    ids=["between-mid-fit-stages", "between-setup-and-mid-fit", "before-any-stage"],
)
@pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*")
@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*")
def test_resume_between_stages_equals_uninterrupted(tmp_path: Path, schedule: dict, resume_epoch: int) -> None:
    def run(root: Path, ckpt_path: str | None = None) -> tuple[TinyNet, GhostConvCallback]:
        pl.seed_everything(0)
        model = TinyNet()
        callback = GhostConvCallback(init="inherit", verbose=0, **schedule)
        checkpoint = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(max_epochs=4, callbacks=[callback, checkpoint], enable_checkpointing=True)
        trainer.fit(model, loader(), loader(n=16), ckpt_path=ckpt_path)
        return model, callback

    model_a, callback_a = run(tmp_path / "a")
    ckpt = tmp_path / "a" / f"epoch={resume_epoch}.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    expected_ghosts = set(callback_a.schedule.due_by(resume_epoch))
    assert {n for n in TARGETS if f"{n}.primary_conv.weight" in saved} == expected_ghosts
    model_b, callback_b = run(tmp_path / "b", ckpt_path=str(ckpt))
    assert ghosts(model_b) == set(TARGETS)
    a, b = tensors(model_a.state_dict()), tensors(model_b.state_dict())
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    assert callback_b.fit_errors == pytest.approx(callback_a.fit_errors)
    # An older stage's checkpoint loads into the converted model (it is rebuilt to that stage's structure); the
    # layers it turns back to dense are named in a warning.
    trainer = make_trainer(callbacks=[GhostConvCallback(verbose=0, **schedule)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model_b, loader(n=16), ckpt_path=str(ckpt), verbose=False)
    assert ghosts(model_b) == expected_ghosts
    for key, value in tensors(saved).items():
        assert torch.equal(model_b.state_dict()[key], value), key
    back = sorted(set(TARGETS) - expected_ghosts)
    changed = [str(w.message) for w in caught if "changed the structure" in str(w.message)]
    assert len(changed) == (1 if back else 0) and all(f"{n} (GhostConv2d -> Conv2d)" in changed[0] for n in back)
    # A fresh (dense) model takes the last checkpoint's structure: what loading a checkpoint is for, no warning (the
    # callback of the fit, which knows its targets).
    fresh = TinyNet()
    trainer = make_trainer(callbacks=[callback_b])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(fresh, loader(n=16), ckpt_path=str(tmp_path / "a" / "epoch=3.ckpt"), verbose=False)
    assert ghosts(fresh) == set(TARGETS)
    assert not [w for w in caught if "changed the structure" in str(w.message)]


# ---------------------------------------------------------------------------------------------- calibration
class CalibrationProbe(Callback):
    """Around the GhostConvCallback's on_train_batch_start: a copy of the model and the batches just before
    the conversion, and the converted modules right after it."""

    def __init__(self, when: str) -> None:
        self.when = when
        self.batches: list[torch.Tensor] = []
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch != 1:
            return
        if self.when == "before":
            self.batches.append(batch[0].clone())
            self.states[batch_idx] = {n: copy.deepcopy(pl_module.get_submodule(n)) for n in TARGETS}
            self.states[batch_idx]["model"] = copy.deepcopy(pl_module.state_dict())
        else:
            self.states[batch_idx] = {n: copy.deepcopy(pl_module.get_submodule(n)) for n in TARGETS}


def test_calibration_fits_on_real_activations() -> None:
    before, after = CalibrationProbe("before"), CalibrationProbe("after")
    model = TinyNet()
    callback = GhostConvCallback(start_epoch=1, calibration_batches=2, verbose=0)
    trainer = make_trainer(max_epochs=2, callbacks=[before, callback, after])
    trainer.fit(model, loader())
    # Dense during batches 0 and 1 of epoch 1 (what forward received is recorded), converted at the start of batch 2.
    assert not any(isinstance(after.states[i][n], GhostConv2d) for i in (0, 1) for n in TARGETS)
    assert all(isinstance(after.states[2][n], GhostConv2d) for n in TARGETS)
    # The conversion equals ghost_from_conv, on the model as it was then, of the layers' real inputs for the
    # two batches that forward received.
    reference = TinyNet()
    reference.load_state_dict(before.states[2]["model"])
    inputs = capture_inputs(reference, torch.cat(before.batches[:2]), list(TARGETS))
    kernel_errors = {}
    for name in TARGETS:
        expected, error = ghost_from_conv(reference.get_submodule(name), 2, 3, "inherit", inputs[name], name)
        got = after.states[2][name]
        assert got.structure_record() == expected.structure_record()
        assert tensors(got.state_dict()).keys() == tensors(expected.state_dict()).keys()
        for key, value in tensors(expected.state_dict()).items():
            torch.testing.assert_close(got.state_dict()[key], value, msg=f"{name}.{key}")
        assert callback.fit_errors[name] == pytest.approx(error)
        kernel_errors[name] = ghost_from_conv(reference.get_submodule(name), 2, 3, "inherit", None, name)[1]
    # And differs from the kernel-space fit of the same weights.
    assert all(abs(kernel_errors[n] - callback.fit_errors[n]) > 1e-3 for n in TARGETS)


def test_calibration_with_fewer_batches_than_asked_converts_at_epoch_end() -> None:
    model = TinyNet()
    callback = GhostConvCallback(start_epoch=1, calibration_batches=10, verbose=0)
    probe = OptimizerProbe()
    trainer = make_trainer(max_epochs=3, callbacks=[callback, probe])
    trainer.fit(model, loader())  # 4 batches per epoch
    assert probe.ghosts_at[1] == set() and probe.ghosts_at[2] == set(TARGETS)
    assert probe.problems == []
    assert group_ids(trainer.optimizers[0]) == fresh_group_ids(model)


class FrozenBNNet(TinyNet):
    """A user module that keeps one BatchNorm frozen (eval mode) during training."""

    def on_train_epoch_start(self) -> None:
        self.b1.eval()


class ModeProbe(Callback):
    def __init__(self) -> None:
        self.modes: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append((pl_module.b1.training, pl_module.b2.training))


def test_calibration_keeps_each_module_training_mode() -> None:
    probe = ModeProbe()
    trainer = make_trainer(max_epochs=1, callbacks=[GhostConvCallback(calibration_batches=1, verbose=0), probe])
    model = FrozenBNNet()
    trainer.fit(model, loader())
    assert ghosts(model) == set(TARGETS)
    assert probe.modes == [(False, True)] * 4


def test_verbose_prints_stages_and_report(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    callback = GhostConvCallback(stages=2, start_epoch=0, end_epoch=1, verbose=2)
    with caplog.at_level("INFO"):
        make_trainer(max_epochs=2, callbacks=[callback]).fit(TinyNet(), loader(), loader(n=16))
    text = caplog.text
    assert "GhostConvCallback: 3 layer(s) selected, 1 skipped" in text
    assert "skip stem: first conv" in text
    assert "epoch 0: c3, c2" in text and "epoch 1: c1" in text
    assert "GhostConvCallback: setup: converted 2 layer(s) (2 of 3 target layers now Ghost" in text
    assert "GhostConvCallback: epoch 1: converted 1 layer(s) (3 of 3 target layers now Ghost" in text
    assert "  c1: fit error " in text
    report = capsys.readouterr().out
    assert "original vs Ghost" in report and "GhostConv2d" in report


# ---------------------------------------------------------------------------------------------- ImageClassifier run
class OutputsAtSave(Callback):
    """Eval-mode outputs of the model on a fixed input, each time a checkpoint is saved."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.outputs: dict[int, torch.Tensor] = {}
        self.ghosts: dict[int, int] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.outputs[checkpoint["epoch"]] = pl_module(self.x).clone()
        pl_module.train(was_training)
        self.ghosts[checkpoint["epoch"]] = sum(isinstance(m, GhostConv2d) for m in pl_module.modules())


@dataclass
class ClassifierRun:
    model: ImageClassifier
    trainer: pl.Trainer
    callback: GhostConvCallback
    rows: list[dict[str, str]]
    ckpt_dir: Path
    saved: OutputsAtSave
    x: torch.Tensor
    original_params: int
    original_macs: int


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> ClassifierRun:
    """ImageClassifier("resnet20") on the digits at 8x8: two Ghost stages (epoch 0 in setup, epoch 1 mid-fit),
    a checkpoint and a CSV row each epoch."""
    root = tmp_path_factory.mktemp("classifier")
    dm = DigitsDataModule(batch_size=16, image_size=8, train_subset=64, pin_memory=False)
    dm.setup()
    x = dm.val_set.tensors[0][:4]
    pl.seed_everything(0)
    model = ImageClassifier("resnet20", num_classes=10, lr=0.05)
    original = count_complexity(model, input_shape=(1, 3, 8, 8))
    callback = GhostConvCallback(stages=2, end_epoch=1, verbose=0)
    saved = OutputsAtSave(x)
    logger = CSVLogger(root, name="logs")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(
        max_epochs=3,
        callbacks=[callback, saved, checkpoint],
        logger=logger,
        enable_checkpointing=True,
        limit_train_batches=2,
        limit_val_batches=1,
        deterministic=False,
    )
    trainer.fit(model, datamodule=dm)
    return ClassifierRun(
        model, trainer, callback, read_metrics(logger), root / "ckpt", saved, x, original.params, original.macs
    )


def test_compression_metrics_logged_at_each_validation_end(classifier_run: ClassifierRun) -> None:
    run = classifier_run
    params = column(run.rows, "compression/params")
    macs = column(run.rows, "compression/macs")
    params_ratio = column(run.rows, "compression/params_ratio")
    macs_ratio = column(run.rows, "compression/macs_ratio")
    assert sorted(params) == sorted(macs) == sorted(params_ratio) == sorted(macs_ratio) == [0, 1, 2]
    # Half the layers (deep first) after epoch 0, all of them from epoch 1 on.
    assert run.original_params > params[0] > params[1] == params[2]
    assert run.original_macs > macs[0] > macs[1] == macs[2]
    model = run.model
    assert params[2] == sum(p.numel() for p in model.parameters())
    assert macs[2] == count_complexity(model, input_shape=(1, 3, 8, 8)).macs
    for epoch in (0, 1, 2):
        assert params_ratio[epoch] == pytest.approx(run.original_params / params[epoch])
        assert macs_ratio[epoch] == pytest.approx(run.original_macs / macs[epoch])
    assert 1.5 < params_ratio[2] < 2.0 and 1.5 < macs_ratio[2] < 2.0
    assert run.saved.ghosts[0] < run.saved.ghosts[1] == len(run.callback.targets) == 18


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_load_from_checkpoint_of_any_stage(classifier_run: ClassifierRun, epoch: int) -> None:
    run = classifier_run
    loaded = ImageClassifier.load_from_checkpoint(run.ckpt_dir / f"epoch={epoch}.ckpt", map_location="cpu")
    assert sum(isinstance(m, GhostConv2d) for m in loaded.modules()) == run.saved.ghosts[epoch]
    loaded.eval()
    with torch.no_grad():
        out = loaded(run.x)
    torch.testing.assert_close(out, run.saved.outputs[epoch], atol=1e-5, rtol=1e-5)


def test_optimizer_after_classifier_run(classifier_run: ClassifierRun) -> None:
    assert group_ids(classifier_run.trainer.optimizers[0]) == fresh_group_ids(classifier_run.model)


# ---------------------------------------------------------------------------------------------- paper figures
def test_ghost_resnet56_figures_through_the_callback(tmp_path: Path) -> None:
    """GhostNet paper, CIFAR-10: Ghost-ResNet-56 (s=2, d=3) has 0.43M parameters and 63M MACs."""
    dm = DigitsDataModule(batch_size=2, image_size=32, train_subset=8, pin_memory=False)
    model = ImageClassifier("resnet56", num_classes=10)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(
        max_epochs=1,
        callbacks=[GhostConvCallback(ratio=2, dw_size=3, init="random", verbose=0)],
        logger=logger,
        limit_train_batches=1,
        limit_val_batches=1,
        deterministic=False,
    )
    trainer.fit(model, datamodule=dm)
    rows = read_metrics(logger)
    params, macs = column(rows, "compression/params")[0], column(rows, "compression/macs")[0]
    # By hand, per image at 32x32. Conv MACs = out · (in / groups) · k_h · k_w · H_out · W_out; a Ghost conv
    # (in -> out, s=2, d=3) is a primary conv in -> m = out / 2 plus a depthwise 3x3 conv m -> m. Its parameters are
    # its kernels; each conv is followed by a BatchNorm (2 · out parameters, no MACs). The stem 3 -> 16 and the
    # classifier 64 -> 10 (with bias) stay dense; the shortcuts have no parameters.
    stem_macs, stem_params = 16 * 3 * 9 * 32 * 32, 16 * 3 * 9 + 2 * 16
    fc_macs, fc_params = 64 * 10, 64 * 10 + 10
    ghost_macs, ghost_params = stem_macs + fc_macs, stem_params + fc_params
    in_channels = 16
    for out_channels, side in ((16, 32), (32, 16), (64, 8)):  # stages: 9 blocks of 2 convs; the first one strided
        for _ in range(18):
            m = out_channels // 2
            ghost_macs += (m * in_channels * 9 + m * 1 * 9) * side * side
            ghost_params += m * in_channels * 9 + m * 9 + 2 * out_channels
            in_channels = out_channels
    assert (ghost_params, ghost_macs) == (438_154, 65_286_784)  # the paper: 0.43M, 63M (REFERENCES.md)
    assert params == ghost_params
    assert macs == ghost_macs
    assert params == sum(p.numel() for p in model.parameters())
    assert column(rows, "compression/params_ratio")[0] == pytest.approx(853018 / params)


def test_ghost_vgg16_figures() -> None:
    """GhostNet paper, CIFAR-10: Ghost-VGG-16 (s=2, d=3) has 7.7M parameters and 158M MACs."""
    model = vgg16(num_classes=10)
    convert_to_ghost(model, ratio=2, dw_size=3, init="random")
    counts = count_complexity(model, input_shape=(1, 3, 32, 32))
    # By hand, as for ResNet-56 above: 13 3x3 convs (widths below, "M" a 2x2 max-pool), each with a BatchNorm; the
    # stem 3 -> 64 stays dense, every other conv is a Ghost conv; the classifier is 512 -> 512 -> 10 with biases.
    macs, params = 512 * 512 + 512 * 10, 512 * 512 + 512 + 512 * 10 + 10
    in_channels, side = 3, 32
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if item == "M":
            side //= 2
            continue
        if in_channels == 3:  # the stem
            macs += item * in_channels * 9 * side * side
            params += item * in_channels * 9 + 2 * item
        else:
            m = item // 2
            macs += (m * in_channels * 9 + m * 9) * side * side
            params += m * in_channels * 9 + m * 9 + 2 * item
        in_channels = item
    assert (params, macs) == (7_651_050, 158_699_520)  # the paper: 7.7M, 158M
    assert (counts.params, counts.macs) == (params, macs)


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes(tmp_path: Path) -> None:
    """Conversion in setup, progressive conversion mid-fit and calibrated conversion under DDP: every rank
    ends identical."""
    proc = run_script("ddp_ghost.py", str(tmp_path), "progressive", "setup", "calibration", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GhostConvCallback: setup: converted 2 layer(s)" in proc.stdout + proc.stderr
    assert "original vs Ghost" in proc.stdout
    for mode in ("progressive", "setup", "calibration"):
        ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        for rank in ranks:
            assert rank["world_size"] == 2
            assert rank["ghosts"] == list(TARGETS)
            assert rank["optimizer_matches"], mode
            assert rank["optimizer_params"] == rank["model_params"] == 16
            assert len(rank["losses"]) == 3 * 4  # 64 images, 2 ranks, batch 8: 4 steps per epoch
            assert all(math.isfinite(v) for v in rank["losses"])
            assert rank["epoch_lrs"] == pytest.approx([0.05, 0.025, 0.0125])
            assert rank["unchanged_in_last_epoch"] == []  # the new modules train on every rank
        zero, one = (tensors(r["state_dict"]) for r in ranks)
        assert zero.keys() == one.keys()
        for key in zero:
            if "running_" in key:  # BatchNorm statistics of each rank's last batch
                continue
            assert torch.equal(zero[key], one[key]), f"{mode}: {key} differs across ranks"
        assert ranks[0]["fit_errors"] == ranks[1]["fit_errors"]
        for rank in ranks:
            assert rank["metrics"]["compression/params"] == rank["numel"]
            assert rank["metrics"]["compression/params_ratio"] > 1.5
        # The ranks saw different data: the losses differ, so identical weights come from the all-reduce.
        assert ranks[0]["losses"] != ranks[1]["losses"]


class _SharedHead(pl.LightningModule):
    """One conv applied at two resolutions (as a detector's head runs on every pyramid level)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        fine, coarse = self.shared(x), self.shared(F.max_pool2d(x, 2))
        return self.fc(torch.cat([fine.mean((2, 3)), coarse.mean((2, 3))], 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_layer_called_twice_counts_its_macs_twice() -> None:
    """The logged MAC ratio equals an independent count of the model before and after, where the shared conv
    runs at 16x16 and 8x8 (it used to count the first call only: 1.55x logged for a true 1.94x)."""
    model = _SharedHead()
    x = torch.randn(1, 3, 16, 16)
    before = count_complexity(copy.deepcopy(model), example_input=x).macs
    callback = GhostConvCallback(include="shared", verbose=0)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1, callbacks=[callback])
    trainer.fit(model, loader(n=16, batch_size=8, size=16), loader(n=8, batch_size=8, size=16))
    after = count_complexity(model, example_input=x).macs
    assert isinstance(model.shared, GhostConv2d) and callback.targets == ["shared"]
    assert trainer.logged_metrics["compression/macs_ratio"] == pytest.approx(before / after, rel=1e-6)
    assert trainer.logged_metrics["compression/macs"] == pytest.approx(after, rel=1e-6)


def test_compression_metrics_skipped_on_every_rank_when_one_rank_cannot_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compression/*`` are logged with ``sync_dist=True``, a collective: when another rank could not count (its
    recorded input failed to run), this rank logs nothing either instead of waiting in the sync. Here the strategy's
    all-ranks decision stands for the other rank's failure."""
    decisions: list[bool] = []

    def another_rank_failed(self: Any, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        decisions.append(decision)
        return False

    model = _SharedHead()
    callback = GhostConvCallback(include="shared", verbose=0)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1, callbacks=[callback])
    monkeypatch.setattr(type(trainer.strategy), "reduce_boolean_decision", another_rank_failed)
    trainer.fit(model, loader(n=16, batch_size=8, size=16), loader(n=8, batch_size=8, size=16))
    assert decisions == [True]  # this rank counted, at the one validation end
    assert not any(k.startswith("compression/") for k in trainer.logged_metrics)


@pytest.mark.parametrize(
    ("max_epochs", "calibration", "warns"), [(2, 10, True), (2, 4, True), (2, 3, False), (3, 10, False)]
)
def test_conversion_at_the_end_of_the_last_epoch_warns(max_epochs: int, calibration: int, warns: bool) -> None:
    """A stage in the last epoch whose epoch has no more batches than calibration_batches converts after the last
    training step: the layers get no fine-tuning, and the callback says so (naming the setting); a batch after the
    recorded ones, or a later epoch, left to train them means no warning."""
    callback = GhostConvCallback(start_epoch=1, calibration_batches=calibration, verbose=0)
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyNet(), loader())  # 4 batches per epoch
    ours = [str(w.message) for w in caught if "got no fine-tuning" in str(w.message)]
    if warns:  # calibration_batches >= the epoch's 4 batches: no batch after the recorded ones to convert at
        assert len(ours) == 1
        assert f"epoch 1 ran 4 training batch(es); a conversion records {calibration} forwards" in ours[0]
        assert f"calibration_batches={calibration}" in ours[0] and all(n in ours[0] for n in TARGETS)
    else:
        assert ours == []
    assert all(isinstance(trainer.lightning_module.get_submodule(n), GhostConv2d) for n in TARGETS)
