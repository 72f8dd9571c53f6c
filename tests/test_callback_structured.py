"""StructuredConvCallback (lightning_cheapconv/callbacks/structured.py): end-to-end Trainer runs on CPU.

Regularization, progressive projection, fit-end decomposition, logging, checkpoints and resume, DDP (in a
subprocess: tests/scripts/ddp_structured.py), AMP, gradient accumulation and clipping, manual optimization,
a user's own LightningModule, and the arguments and strategies it refuses.
"""

from __future__ import annotations

import copy
import csv
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
from nets import quiet_trainer, run_script, tiny_backbone
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import MixedPrecision
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from lightning_cheapconv import DigitsDataModule, ImageClassifier, StructuredConvCallback, restructure
from lightning_cheapconv.callbacks.surgery import check_strategy
from lightning_cheapconv.complexity import count_complexity
from lightning_cheapconv.module import split_decay_parameters
from lightning_cheapconv.nn import StructuredConv2d, StructuredLinear
from lightning_cheapconv.structure import structural_residual

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is not before max_epochs.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`.*"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed.*"),
]

TARGETS = ["backbone.3", "backbone.6", "backbone.9"]  # tiny_backbone's convs minus the stem


# ---------------------------------------------------------------------------------------------- helpers
class OrderedDigits(DigitsDataModule):
    """Digits with an unshuffled training loader (deterministic resume)."""

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=False)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32, image_size=16, pin_memory=False)
    dm.setup()
    return dm


def make_trainer(**kwargs: Any) -> pl.Trainer:
    options = {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 2, "log_every_n_steps": 1}
    return quiet_trainer(**{**options, **kwargs})


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` for each row where ``key`` was logged."""
    return [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def tensors(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


class RegGradChecker(Callback):
    """Checks, at every optimizer step, the gradient the structured callback adds.

    Two hooks are needed: ``before`` (placed before the structured callback in the list) snapshots the
    weights and gradients; ``after`` (placed after it) computes ``λ·Σ residual`` by hand on the snapshot
    weights with autograd and compares it with the difference of the gradients. Projected layers and
    non-target parameters must get nothing.
    """

    def __init__(self, structured: StructuredConvCallback, scaled_by: torch.amp.GradScaler | None = None) -> None:
        self.structured = structured
        self.scaled_by = scaled_by  # the gradients are still scaled by this scaler's scale in the hook
        self.before = _Snapshot()
        self.errors: list[float] = []
        self.added_norms: list[float] = []
        self.reg_values: list[float] = []
        self.steps = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        cb, snap = self.structured, self.before
        self.steps += 1
        lam = cb.current_reg_weight(trainer.current_epoch)
        live = [n for n in cb.targets if n not in cb.projected]
        copies = {n: snap.weights[n].clone().requires_grad_(True) for n in live}
        residuals = {n: structural_residual(copies[n], cb.specs[n]) for n in live}
        expected: dict[str, torch.Tensor] = {}
        if live:
            self.reg_values.append(sum(r.item() for r in residuals.values()))
            loss = lam * torch.stack(list(residuals.values())).sum()
            grads = torch.autograd.grad(loss, [copies[n] for n in live])
            factor = self.scaled_by.get_scale() if self.scaled_by is not None else 1.0
            expected = {n: g * factor for n, g in zip(live, grads, strict=True)}
        for name, param in pl_module.named_parameters():
            added = param.grad.detach() - snap.grads[name]
            want = expected.get(name.removesuffix(".weight"), torch.zeros_like(added))
            if not name.endswith(".weight"):
                want = torch.zeros_like(added)
            scale = snap.grads[name].abs().max().item() + want.abs().max().item() + 1e-12
            self.errors.append((added - want).abs().max().item() / scale)
        if expected:
            self.added_norms.append(float(torch.stack([g.norm() for g in expected.values()]).norm()))


class _Snapshot(Callback):
    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.weights = {n: m.weight.detach().float().clone() for n, m in pl_module.named_modules() if _is_layer(m)}
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def reg_checked(
    structured: StructuredConvCallback, scaled_by: torch.amp.GradScaler | None = None
) -> tuple[list[Callback], RegGradChecker]:
    """``[before, structured, after]``: the callback list that checks every added gradient."""
    checker = RegGradChecker(structured, scaled_by)
    return [checker.before, structured, checker], checker


class ResidualsAtFitEnd(Callback):
    """Placed before the structured callback: residuals of the dense target weights just before decomposition."""

    def __init__(self, structured: StructuredConvCallback) -> None:
        self.structured = structured
        self.residuals: dict[str, float] = {}
        self.dense_state: dict[str, torch.Tensor] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = self.structured
        with torch.no_grad():
            self.residuals = {
                n: float(structural_residual(pl_module.get_submodule(n).weight, cb.specs[n])) for n in cb.targets
            }
        self.dense_state = {k: v.clone() for k, v in tensors(pl_module.state_dict()).items()}


class UserNet(pl.LightningModule):
    """A user's module that knows nothing of the plugin: own steps, optimizer and LR scheduler, convs as attributes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("my_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("my_val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [sched]


class ManualNet(UserNet):
    """The same network with manual optimization."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()
        self.log("my_loss", loss)


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(channel_ratio=0), "channel_ratio"),
        (dict(channel_ratio=1.5), "channel_ratio"),
        (dict(channel_ratio="half"), "channel_ratio"),
        (dict(channel_ratio=True), "channel_ratio"),
        (dict(reg_weight=True), "reg_weight"),
        (dict(kernel_reduction=True), "kernel_reduction"),
        (dict(reg_weight=-0.1), "reg_weight"),
        (dict(reg_schedule=-1), "reg_schedule"),
        (dict(kernel_reduction=-1), "kernel_reduction"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(project_start_epoch=3, project_end_epoch=1), "project_end_epoch"),
        (dict(project_start_epoch=-1), "project_start_epoch"),
        (dict(project_end_epoch=1.5), "project_end_epoch"),
        (dict(project_order="middle_first"), "order"),
        (dict(verbose=3), "verbose"),
        (dict(verbose="loud"), "verbose"),
        (dict(include=3), "include"),
        (dict(exclude=["a", 1]), "exclude"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(MisconfigurationException, match=name):
        StructuredConvCallback(**kwargs)


def test_include_matching_nothing_fails_at_setup_with_reasons(digits: DigitsDataModule) -> None:
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    before = copy.deepcopy(model.state_dict())
    cb = StructuredConvCallback(include="backbone.nothing*", verbose=0)
    with pytest.raises(MisconfigurationException) as info:
        make_trainer(callbacks=[cb]).fit(model, datamodule=digits)
    message = str(info.value)
    assert "include" in message and "backbone.nothing*" in message
    for name in TARGETS:
        assert f"{name}: not matched by include" in message
    # The stem and classifier are listed with their own reasons.
    assert "backbone.0" in message
    # Nothing trained, nothing changed.
    for key, value in tensors(model.state_dict()).items():
        assert torch.equal(value, before[key]), key


def test_reg_schedule_warmup_and_callable() -> None:
    ramp = StructuredConvCallback(reg_weight=0.8, reg_schedule=3)
    assert [ramp.current_reg_weight(e) for e in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    assert StructuredConvCallback(reg_weight=0.8).current_reg_weight(0) == pytest.approx(0.8)
    custom = StructuredConvCallback(reg_schedule=lambda epoch: 0.1 * epoch)
    assert custom.current_reg_weight(4) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------- strategies
def test_sharded_strategies_are_refused() -> None:
    # FSDP needs a GPU accelerator to build a Trainer, and DeepSpeed needs its package: check a stub trainer.
    deepspeed = object.__new__(DeepSpeedStrategy)  # DeepSpeedStrategy subclasses DDPStrategy
    model = ImageClassifier(tiny_backbone())
    for strategy in (FSDPStrategy(), deepspeed):
        stub = SimpleNamespace(strategy=strategy)
        with pytest.raises(MisconfigurationException, match=type(strategy).__name__) as info:
            check_strategy(stub, "StructuredConvCallback", changes_mid_fit=False)
        assert "strategy='ddp'" in str(info.value)
        with pytest.raises(MisconfigurationException, match="not supported"):
            StructuredConvCallback(verbose=0).setup(stub, model, "fit")


def test_ddp_spawn_is_refused() -> None:
    trainer = make_trainer(devices=2, strategy="ddp_spawn")
    model = ImageClassifier(tiny_backbone())
    with pytest.raises(MisconfigurationException, match="strategy='ddp'") as info:
        StructuredConvCallback(verbose=0).setup(trainer, model, "fit")
    assert "spawn" in str(info.value)


def test_single_device_and_ddp_are_accepted() -> None:
    model = ImageClassifier(tiny_backbone())
    for trainer in (make_trainer(), make_trainer(devices=2, strategy="ddp")):
        check_strategy(trainer, "StructuredConvCallback", changes_mid_fit=False)
    cb = StructuredConvCallback(channel_ratio=0.5, verbose=0)
    cb.setup(make_trainer(max_epochs=8), model, "fit")
    assert cb.targets == TARGETS
    assert cb.schedule is not None and cb.schedule.epochs[0] == 4 and cb.schedule.last_epoch == 6


@pytest.mark.parametrize(
    ("start", "end", "trainer_kwargs", "epochs"),
    [
        (None, None, dict(max_epochs=8), (4, 5, 6)),
        (None, 3, dict(max_epochs=10), (3,)),  # the default start (50%) never lies after an explicit end
        (None, 7, dict(max_epochs=10), (5, 6, 7)),
        (2, None, dict(max_epochs=10), (2, 4, 7)),
        (None, 2, dict(max_epochs=-1, max_steps=50), (2,)),
        (1, None, dict(max_epochs=-1, max_steps=50), (1,)),
        (None, None, dict(max_epochs=-1, max_steps=50), (25, 31, 37)),  # in steps: 50% and 75% of max_steps
    ],
)
def test_projection_window(start, end, trainer_kwargs: dict, epochs) -> None:
    cb = StructuredConvCallback(project_start_epoch=start, project_end_epoch=end, verbose=0)
    cb.setup(make_trainer(**trainer_kwargs), ImageClassifier(tiny_backbone()), "fit")
    assert (cb.schedule.epochs if cb.schedule is not None else None) == epochs
    assert cb.unit == ("step" if start is None and end is None and trainer_kwargs["max_epochs"] == -1 else "epoch")


def test_unbounded_fit_projects_at_fit_end_and_says_so() -> None:
    cb = StructuredConvCallback(verbose=0)
    with pytest.warns(UserWarning, match="neither max_epochs nor max_steps.*projected at fit end"):
        cb.setup(make_trainer(max_epochs=-1), ImageClassifier(tiny_backbone()), "fit")
    assert cb.schedule is None


# ---------------------------------------------------------------------------------------------- the main run
@dataclass
class MainRun:
    trainer: pl.Trainer
    model: ImageClassifier
    callback: StructuredConvCallback
    logger: CSVLogger
    at_fit_end: ResidualsAtFitEnd
    checker: RegGradChecker
    decomposed: ImageClassifier  # a copy taken right after fit
    after_fit_ckpt: Path
    export_path: Path
    best_path: str
    params_before: int
    example: torch.Tensor
    optimizer_groups: list[list[int]]  # ids of the parameters in the optimizer's groups, right after fit
    fresh_groups: list[list[int]]  # ... and as a fresh configure_optimizers on the decomposed model lists them


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory, digits: DigitsDataModule) -> MainRun:
    """5 epochs; stages of projection at epochs 1, 2 and 3 (deep first); decomposition at fit end."""
    tmp = tmp_path_factory.mktemp("structured_main")
    pl.seed_everything(0)
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    params_before = sum(p.numel() for p in model.parameters())
    export_path = tmp / "export" / "decomposed.pt"
    cb = StructuredConvCallback(
        channel_ratio=0.5,
        reg_weight=0.5,
        project_start_epoch=1,
        project_end_epoch=3,
        export_path=export_path,
        verbose=0,
    )
    at_fit_end = ResidualsAtFitEnd(cb)
    callbacks, checker = reg_checked(cb)
    logger = CSVLogger(tmp / "logs")
    best = ModelCheckpoint(dirpath=tmp / "ckpt", monitor="val/acc", mode="max")
    trainer = make_trainer(
        max_epochs=5,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[at_fit_end, *callbacks, best],
    )
    trainer.fit(model, datamodule=digits)
    after_fit_ckpt = tmp / "after_fit.ckpt"
    trainer.save_checkpoint(after_fit_ckpt)
    example = digits.val_set.tensors[0][:8]
    optimizer_groups = [[id(p) for p in g["params"]] for g in trainer.optimizers[0].param_groups]
    fresh_groups = [[id(p) for p in params] for params in split_decay_parameters(model)]
    return MainRun(
        trainer,
        model,
        cb,
        logger,
        at_fit_end,
        checker,
        copy.deepcopy(model),
        after_fit_ckpt,
        export_path,
        best.best_model_path,
        params_before,
        example,
        optimizer_groups,
        fresh_groups,
    )


def test_projection_schedule_and_fit_end_decomposition_exact(main_run: MainRun) -> None:
    cb, model = main_run.callback, main_run.decomposed
    assert cb.targets == TARGETS
    assert cb.schedule is not None
    assert cb.schedule.epochs == (1, 2, 3)
    assert cb.schedule.groups == (("backbone.9",), ("backbone.6",), ("backbone.3",))  # deep first
    assert cb.projected == set(TARGETS)
    # Every selected kernel was exactly structured before the decomposition.
    assert set(main_run.at_fit_end.residuals) == set(TARGETS)
    assert max(main_run.at_fit_end.residuals.values()) < 1e-5
    # ... and the decomposition reproduced the projected network.
    assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4
    for name in TARGETS:
        layer = model.get_submodule(name)
        assert isinstance(layer, StructuredConv2d), name
        assert layer.hidden_channels == model.get_submodule(name).in_channels // 2
        assert layer.hidden_kernel_size == (2, 2)
    assert type(model.get_submodule("backbone.0")) is nn.Conv2d  # stem kept
    assert type(model.get_submodule("backbone.14")) is nn.Linear  # classifier kept
    # The decomposed network equals the dense network of the projected weights on real images.
    dense = ImageClassifier(tiny_backbone(seed=1))
    dense.load_state_dict(main_run.at_fit_end.dense_state)
    assert all(type(dense.get_submodule(n)) is nn.Conv2d for n in TARGETS)
    torch.testing.assert_close(outputs(model, main_run.example), outputs(dense, main_run.example), atol=1e-5, rtol=1e-4)


def test_regularization_gradient_added_each_step(main_run: MainRun) -> None:
    checker = main_run.checker
    assert checker.steps == main_run.trainer.global_step == 20
    assert max(checker.errors) < 1e-5
    # The regularization is not negligible in this run, so the comparison above means something.
    assert min(checker.added_norms) > 1e-3
    # Steps with unprojected layers: the first 3 epochs (4 steps each) have some.
    assert len(checker.added_norms) == 12


def test_compression_metrics_logged_at_each_validation_end(main_run: MainRun) -> None:
    rows = read_metrics(main_run.logger)
    keys = ["compression/params", "compression/macs", "compression/params_ratio", "compression/macs_ratio"]
    series = {k: column(rows, k) for k in keys}
    for key in keys:
        assert [e for e, _ in series[key]] == [0, 1, 2, 3, 4], key
    params = [v for _, v in series["compression/params"]]
    macs = [v for _, v in series["compression/macs"]]
    params_ratio = [v for _, v in series["compression/params_ratio"]]
    macs_ratio = [v for _, v in series["compression/macs_ratio"]]
    # Epoch 0: nothing projected yet, the original network.
    assert params[0] == main_run.params_before
    assert params_ratio[0] == pytest.approx(1.0) and macs_ratio[0] == pytest.approx(1.0)
    # One more layer per stage.
    assert params[0] > params[1] > params[2] > params[3] == params[4]
    assert macs[0] > macs[1] > macs[2] > macs[3] == macs[4]
    # All projected (epochs 3, 4): the counts are those of the decomposed model, exactly.
    decomposed = main_run.decomposed
    assert params[-1] == sum(p.numel() for p in decomposed.parameters())
    assert macs[-1] == count_complexity(decomposed, example_input=main_run.example[:1]).macs
    assert params_ratio[-1] == pytest.approx(main_run.params_before / params[-1], rel=1e-6)
    assert macs_ratio[-1] == pytest.approx(macs[0] / macs[-1], rel=1e-6)
    assert macs_ratio[-1] > 1.0 and params_ratio[-1] > 1.0
    # The regularizer is logged while some layers are unprojected.
    assert [e for e, _ in column(rows, "train/struct_reg_epoch")] == [0, 1, 2]


def test_optimizer_holds_the_decomposed_parameters_after_fit(main_run: MainRun) -> None:
    # As a fresh configure_optimizers on the decomposed model would list them: a checkpoint saved after fit resumes.
    assert main_run.optimizer_groups == main_run.fresh_groups


def test_resume_from_checkpoint_saved_after_fit_end(main_run: MainRun, digits: DigitsDataModule) -> None:
    """More epochs from the decomposed checkpoint: the layers stay decomposed and keep training."""
    pl.seed_everything(0)
    model = ImageClassifier(tiny_backbone(seed=2), lr=0.05)
    cb = StructuredConvCallback(channel_ratio=0.5, reg_weight=0.5, project_start_epoch=1, project_end_epoch=3)
    trainer = make_trainer(max_epochs=6, callbacks=[cb])
    trainer.fit(model, datamodule=digits, ckpt_path=main_run.after_fit_ckpt)
    assert trainer.global_step == 24 and cb.projected == set(TARGETS)
    start = torch.load(main_run.after_fit_ckpt, weights_only=True)["state_dict"]
    for name in TARGETS:
        layer = model.get_submodule(name)
        assert isinstance(layer, StructuredConv2d), name
        assert not torch.allclose(layer.weight, start[f"{name}.weight"]), name  # trained on
        assert "momentum_buffer" in trainer.optimizers[0].state[layer.weight]
    assert cb.decomposition_error is None  # nothing left to decompose
    assert trainer.logged_metrics["compression/params"] == sum(p.numel() for p in model.parameters())


def test_callback_reused_for_a_second_fit_at_another_input_size() -> None:
    cb = StructuredConvCallback(channel_ratio=0.5, project_start_epoch=0, verbose=0)
    for size in (16, 8):
        dm = DigitsDataModule(batch_size=32, image_size=size, pin_memory=False)
        model = ImageClassifier(tiny_backbone(), lr=0.05)
        trainer = make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[cb])
        trainer.fit(model, datamodule=dm)
        macs = count_complexity(model, input_shape=(1, 3, size, size)).macs
        assert trainer.logged_metrics["compression/macs"] == macs, size
        assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4


def test_validate_before_fit(digits: DigitsDataModule) -> None:
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    cb = StructuredConvCallback(channel_ratio=0.5, verbose=0)
    trainer = make_trainer(max_epochs=1, callbacks=[cb])
    metrics = trainer.validate(model, datamodule=digits, verbose=False)[0]
    assert "val/acc" in metrics and not any(k.startswith("compression/") for k in metrics)
    trainer.fit(model, datamodule=digits)
    assert all(isinstance(model.get_submodule(n), StructuredConv2d) for n in TARGETS)


def test_checkpoint_after_fit_loads_into_fresh_and_decomposed_models(main_run: MainRun) -> None:
    x, reference = main_run.example, outputs(main_run.decomposed, main_run.example)
    # A fresh, undecomposed model: the pre-hook rebuilds the structured layers before the strict load.
    fresh = ImageClassifier.load_from_checkpoint(main_run.after_fit_ckpt, backbone=tiny_backbone(seed=3))
    assert all(isinstance(fresh.get_submodule(n), StructuredConv2d) for n in TARGETS)
    torch.testing.assert_close(outputs(fresh, x), reference, atol=0, rtol=0)
    # An already decomposed model.
    again = copy.deepcopy(main_run.decomposed)
    with torch.no_grad():
        for p in again.parameters():
            p.add_(1.0)
    state = torch.load(main_run.after_fit_ckpt, weights_only=True)["state_dict"]
    again.load_state_dict(state)
    torch.testing.assert_close(outputs(again, x), reference, atol=0, rtol=0)


def test_export_path_restructures_into_a_fresh_model(main_run: MainRun) -> None:
    assert main_run.export_path.is_file()
    state = torch.load(main_run.export_path, weights_only=True)
    fresh = ImageClassifier(tiny_backbone(seed=5))
    changes = restructure(fresh, state)
    assert sorted(c.name for c in changes) == TARGETS
    fresh.load_state_dict(state)
    torch.testing.assert_close(
        outputs(fresh, main_run.example), outputs(main_run.decomposed, main_run.example), atol=0, rtol=0
    )


def test_test_with_best_checkpoint_after_fit(main_run: MainRun, digits: DigitsDataModule) -> None:
    best = torch.load(main_run.best_path, weights_only=True)
    # The best checkpoint was written during fit: dense weights, projected for the layers projected by then.
    projected = next(v for k, v in best["callbacks"].items() if "StructuredConvCallback" in k)["projected"]
    with torch.no_grad():
        for name in TARGETS:
            weight = best["state_dict"][f"{name}.weight"]
            assert weight.shape[-2:] == (3, 3), name
            if name in projected:
                assert float(structural_residual(weight, main_run.callback.specs[name])) < 1e-5
    trainer, model = main_run.trainer, main_run.model
    assert isinstance(model.get_submodule(TARGETS[0]), StructuredConv2d)  # decomposed after fit
    dense_in_best = [n for n in TARGETS if n not in projected]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = trainer.test(model, datamodule=digits, ckpt_path="best", verbose=False)[0]
    changed = [str(w.message) for w in caught if "changed the structure" in str(w.message)]
    # The model keeps its form where the checkpoint's weights allow it exactly (projected layers are decomposed
    # again); layers the checkpoint holds unprojected stay dense, and a warning names them.
    assert len(changed) == (1 if dense_in_best else 0), changed
    assert all(n in changed[0] for n in dense_in_best)
    # The reported figures are those of the checkpoint's own dense network on the test data (the validation split),
    # recomputed by hand. Not a bound on accuracy: 20 steps leave this tiny network near chance in eval mode
    # (12.4% measured; chance is 10%), so the loss, which any other weights or BatchNorm statistics change, pins it.
    reference = ImageClassifier(tiny_backbone(seed=4))
    reference.load_state_dict(best["state_dict"])
    x, y = digits.val_set.tensors
    logits = outputs(reference, x)
    assert results["test/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert results["test/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    # Each layer holds the checkpoint's weights: as they are (dense), or decomposed exactly.
    for name in TARGETS:
        layer = model.get_submodule(name)
        expected = best["state_dict"][f"{name}.weight"]
        if name in projected:
            assert isinstance(layer, StructuredConv2d), name
            torch.testing.assert_close(layer.to_dense().weight, expected, atol=1e-5, rtol=1e-4)
        else:
            assert type(layer) is nn.Conv2d, name
            torch.testing.assert_close(layer.weight, expected)


# ---------------------------------------------------------------------------------------------- regularization
def _reg_run(digits: DigitsDataModule, tmp_path: Path, reg_weight: float, **kwargs: Any):
    pl.seed_everything(0)
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    cb = StructuredConvCallback(
        channel_ratio=0.5, reg_weight=reg_weight, project_start_epoch=50, decompose_on_fit_end=False, verbose=0
    )
    logger = CSVLogger(tmp_path / f"reg{reg_weight}")
    trainer = make_trainer(max_epochs=4, logger=logger, callbacks=[cb], **kwargs)
    trainer.fit(model, datamodule=digits)
    rows = read_metrics(logger)
    steps = [v for _, v in column(rows, "train/struct_reg_step")]
    return steps, [v for _, v in column(rows, "train/struct_reg_epoch")]


def test_struct_reg_decreases_with_large_weight(digits: DigitsDataModule, tmp_path: Path) -> None:
    strong_steps, strong = _reg_run(digits, tmp_path, 5.0)
    none_steps, none = _reg_run(digits, tmp_path, 0.0)
    assert len(strong) == len(none) == 4
    assert len(strong_steps) == len(none_steps) == 16
    assert strong_steps[0] == pytest.approx(none_steps[0], rel=1e-6)  # same start
    assert all(b < a for a, b in zip(strong, strong[1:], strict=False))  # decreasing
    assert strong[-1] < 0.5 * strong[0]
    assert strong[-1] < 0.5 * none[-1]


def test_gradient_clipping_clips_the_total(digits: DigitsDataModule, tmp_path: Path) -> None:
    clip = 0.05
    norms: list[float] = []

    class NormAtStep(Callback):
        def on_fit_start(self, trainer, pl_module):
            # After the step, the gradients it used are still there (the next closure zeroes them).
            def hook(optimizer, args, kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(hook)

    pl.seed_everything(0)
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    cb = StructuredConvCallback(channel_ratio=0.5, reg_weight=5.0, project_start_epoch=1, verbose=0)
    callbacks, checker = reg_checked(cb)
    trainer = make_trainer(gradient_clip_val=clip, callbacks=[*callbacks, NormAtStep()])
    trainer.fit(model, datamodule=digits)
    assert len(norms) == trainer.global_step == 8
    # The regularizer alone is far above the clip value; the optimizer sees the clipped total.
    assert min(checker.added_norms) > 10 * clip
    assert max(norms) <= clip * (1 + 1e-4)
    assert max(checker.errors) < 1e-5
    assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4


def test_manual_optimization_gets_the_regularization(digits: DigitsDataModule) -> None:
    def run(reg_weight: float) -> tuple[ManualNet, StructuredConvCallback, RegGradChecker, pl.Trainer]:
        pl.seed_everything(0)
        model = ManualNet()
        cb = StructuredConvCallback(
            reg_weight=reg_weight, project_start_epoch=50, decompose_on_fit_end=False, verbose=0
        )
        callbacks, checker = reg_checked(cb)
        trainer = make_trainer(callbacks=callbacks)
        trainer.fit(model, datamodule=digits)
        return model, cb, checker, trainer

    strong, cb, checker, trainer = run(5.0)
    plain, _, _, _ = run(0.0)
    assert cb.targets == ["conv2", "conv3"]
    assert checker.steps == trainer.global_step == 8
    assert max(checker.errors) < 1e-5 and min(checker.added_norms) > 1e-3
    assert "train/struct_reg_step" in trainer.logged_metrics
    for name in cb.targets:
        a, b = strong.get_submodule(name).weight, plain.get_submodule(name).weight
        assert not torch.allclose(a, b), name
        assert structural_residual(a, cb.specs[name]) < structural_residual(b, cb.specs[name])


# ---------------------------------------------------------------------------------------------- other setups
def test_user_module_trains_unchanged_with_the_callback(digits: DigitsDataModule) -> None:
    pl.seed_everything(0)
    model = UserNet()
    x = digits.val_set.tensors[0][:8]
    cb = StructuredConvCallback(channel_ratio=0.5, verbose=0)  # projection at 50%-75% of max_epochs
    trainer = make_trainer(max_epochs=4, callbacks=[cb])
    trainer.fit(model, datamodule=digits)
    assert cb.targets == ["conv2", "conv3"]
    assert cb.schedule is not None and cb.schedule.epochs == (2, 3)
    assert isinstance(model.conv2, StructuredConv2d) and isinstance(model.conv3, StructuredConv2d)
    assert model.conv2.bias is not None
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    # The user's scheduler kept stepping (once per epoch).
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)
    assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4
    assert torch.isfinite(outputs(model, x)).all()
    assert trainer.logged_metrics["compression/params_ratio"] > 1.0
    assert "my_val_loss" in trainer.logged_metrics


def test_bf16_mixed_precision(digits: DigitsDataModule) -> None:
    pl.seed_everything(0)
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    cb = StructuredConvCallback(channel_ratio=0.5, reg_weight=1.0, project_start_epoch=1, verbose=0)
    at_fit_end = ResidualsAtFitEnd(cb)
    callbacks, checker = reg_checked(cb)
    trainer = make_trainer(max_epochs=3, precision="bf16-mixed", callbacks=[at_fit_end, *callbacks])
    trainer.fit(model, datamodule=digits)
    assert checker.steps == trainer.global_step == 12
    assert max(checker.errors) < 1e-5 and min(checker.added_norms) > 1e-3
    assert max(at_fit_end.residuals.values()) < 1e-5
    assert all(isinstance(model.get_submodule(n), StructuredConv2d) for n in TARGETS)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4
    assert torch.isfinite(trainer.logged_metrics["train/struct_reg_epoch"])


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-in-hook", "fused-adamw"])
def test_fp16_mixed_precision_with_grad_scaler(digits: DigitsDataModule, fused: bool) -> None:
    # Trainer(precision="16-mixed") on CPU silently becomes bf16-mixed, which has no scaler. Lightning's own
    # MixedPrecision plugin with a CPU GradScaler runs the real fp16 path: scaled backward, unscale_,
    # on_before_optimizer_step, scaler.step. The added gradient must be exactly λ·∇residual there: one multiplied by
    # the scale would be 65536x too large, and one added before unscaling would be in the checker's "before" snapshot
    # (divided by the scale), not in the difference it compares.
    # A fused optimizer unscales inside its own step, so Lightning skips unscale_ and the hook sees gradients
    # still multiplied by the scale: the added gradient must be scaled too (else the step divides it by 2**16).
    scaler = torch.amp.GradScaler("cpu")
    pl.seed_everything(0)
    model = FusedAdamW(tiny_backbone(), lr=0.01) if fused else ImageClassifier(tiny_backbone(), lr=0.05)
    dtypes: list[torch.dtype] = []  # of a target conv's outputs in training steps

    def record_dtype(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if module.training:
            dtypes.append(out.dtype)

    model.get_submodule(TARGETS[0]).register_forward_hook(record_dtype)
    cb = StructuredConvCallback(channel_ratio=0.5, reg_weight=1.0, project_start_epoch=1, verbose=0)
    callbacks, checker = reg_checked(cb, scaler if fused else None)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = make_trainer(max_epochs=3, plugins=[plugin], callbacks=callbacks)
    trainer.fit(model, datamodule=digits)
    assert trainer.precision_plugin is plugin
    assert checker.steps == trainer.global_step == 12
    assert dtypes == [torch.float16] * 12
    # No step was skipped for overflow (the scale would have halved): every checked step ran at scale 2**16.
    assert scaler.get_scale() == 2.0**16
    assert max(checker.errors) < 1e-5 and min(checker.added_norms) > 1e-3
    assert all(isinstance(model.get_submodule(n), StructuredConv2d) for n in TARGETS)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4


class FusedAdamW(ImageClassifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, fused=True)


def test_gradient_accumulation(digits: DigitsDataModule) -> None:
    class ProjectedAfterEachStep(Callback):
        def __init__(self, structured: StructuredConvCallback) -> None:
            self.structured = structured
            self.worst = 0.0
            self.checked = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            cb = self.structured
            if (batch_idx + 1) % 2 == 0 and cb.projected:
                self.checked += 1
                for name in cb.projected:
                    r = float(structural_residual(pl_module.get_submodule(name).weight.detach(), cb.specs[name]))
                    self.worst = max(self.worst, r)

    pl.seed_everything(0)
    model = ImageClassifier(tiny_backbone(), lr=0.05)
    cb = StructuredConvCallback(channel_ratio=0.5, reg_weight=1.0, project_start_epoch=1, verbose=0)
    callbacks, checker = reg_checked(cb)
    spy = ProjectedAfterEachStep(cb)
    trainer = make_trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[*callbacks, spy])
    trainer.fit(model, datamodule=digits)
    # 4 micro-batches per epoch: 2 optimizer steps, the regularizer added once on each (on the accumulated grads).
    assert checker.steps == trainer.global_step == 6
    assert max(checker.errors) < 1e-5 and min(checker.added_norms) > 1e-3
    assert spy.checked == 4 and spy.worst < 1e-5
    assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4


def test_layer_kinds_depthwise_grouped_pointwise_shared_and_linear(digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    shared = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    backbone = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: spatial structure only
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),  # 1x1: channel structure only
        nn.ReLU(),
        shared,
        nn.ReLU(),
        shared,  # the same module twice
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    model = ImageClassifier(backbone, lr=0.05)
    cb = StructuredConvCallback(channel_ratio=0.5, linear=True, reg_weight=1.0, project_start_epoch=1, verbose=0)
    at_fit_end = ResidualsAtFitEnd(cb)
    callbacks, checker = reg_checked(cb)
    trainer = make_trainer(max_epochs=3, callbacks=[at_fit_end, *callbacks])
    trainer.fit(model, datamodule=digits)
    names = ["backbone.2", "backbone.4", "backbone.6", "backbone.8", "backbone.14"]
    assert cb.targets == names
    assert max(checker.errors) < 1e-5 and min(checker.added_norms) > 1e-3
    assert max(at_fit_end.residuals.values()) < 1e-5
    assert cb.decomposition_error is not None and cb.decomposition_error < 1e-4
    assert model.backbone[2].groups == 16 and model.backbone[2].hidden_channels == 1
    assert model.backbone[4].groups == 4 and model.backbone[4].hidden_channels == 2
    assert model.backbone[6].hidden_kernel_size == (1, 1) and model.backbone[6].hidden_channels == 8
    assert isinstance(model.backbone[8], StructuredConv2d) and model.backbone[8] is model.backbone[10]
    assert isinstance(model.backbone[14], StructuredLinear) and model.backbone[14].hidden_features == 8
    assert type(model.backbone[16]) is nn.Linear
    assert trainer.logged_metrics["compression/params"] == sum(p.numel() for p in model.parameters())
    groups = [[id(p) for p in g["params"]] for g in trainer.optimizers[0].param_groups]
    assert groups == [[id(p) for p in params] for params in split_decay_parameters(model)]


# ---------------------------------------------------------------------------------------------- resume
def test_resume_mid_schedule_equals_uninterrupted(tmp_path: Path) -> None:
    def run(ckpt_path: str | None, dirpath: Path, seed: int) -> tuple[ImageClassifier, StructuredConvCallback]:
        pl.seed_everything(0)
        dm = OrderedDigits(batch_size=32, image_size=16, pin_memory=False)
        model = ImageClassifier(tiny_backbone(seed=seed), lr=0.05, warmup_epochs=1)
        cb = StructuredConvCallback(
            channel_ratio=0.5, reg_weight=0.5, project_start_epoch=1, project_end_epoch=3, verbose=0
        )
        every_epoch = ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(max_epochs=5, deterministic=True, enable_checkpointing=True, callbacks=[cb, every_epoch])
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, cb

    model_a, cb_a = run(None, tmp_path / "a", seed=0)
    middle = tmp_path / "a" / "epoch=1.ckpt"  # end of epoch 1: backbone.9 projected, two stages to go
    assert middle.is_file()
    saved = torch.load(middle, weights_only=True)
    assert next(v for k, v in saved["callbacks"].items() if "StructuredConvCallback" in k)["projected"] == [
        "backbone.9"
    ]
    model_b, cb_b = run(str(middle), tmp_path / "b", seed=7)
    assert cb_b.projected == cb_a.projected == set(TARGETS)
    state_a, state_b = tensors(model_a.state_dict()), tensors(model_b.state_dict())
    assert state_a.keys() == state_b.keys()
    assert any(k.startswith("backbone.9.") for k in state_a)
    assert all(isinstance(model_b.get_submodule(n), StructuredConv2d) for n in TARGETS)
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], atol=1e-6, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run_script("ddp_structured.py", str(out), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    r0, r1 = ranks
    # Weights (and BatchNorm buffers) identical on both ranks, after the fit-end decomposition.
    assert r0["state_dict"].keys() == r1["state_dict"].keys()
    for key, value in r0["state_dict"].items():
        assert torch.equal(value, r1["state_dict"][key]), key
    for r in ranks:
        assert r["targets"] == TARGETS
        assert all(r["types"][n.split(".")[1]] == "StructuredConv2d" for n in TARGETS)
        assert max(r["residuals_before_decomposition"].values()) < 1e-5
        assert r["decomposition_error"] is not None and r["decomposition_error"] < 1e-4
        assert r["global_step"] == 16
    # Logged compression figures: one set per validation epoch end, equal on both ranks.
    assert len(r0["compression"]) == 4
    assert r0["compression"] == r1["compression"]
    assert r0["compression"][0]["compression/params_ratio"] == pytest.approx(1.0)
    assert r0["compression"][-1]["compression/macs_ratio"] > 1.0
    assert r0["compression"][-1]["compression/params"] == sum(
        v.numel()
        for k, v in r0["state_dict"].items()
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k and "_extra_state" not in k
    )  # parameters only: no BatchNorm statistics, no structure records (uint8 tensors)
    assert r0["struct_reg"] and r0["struct_reg"] == r1["struct_reg"]
