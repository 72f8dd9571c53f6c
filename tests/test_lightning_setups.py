"""Works in every Lightning project: one test per Lightning setup that used to break the callbacks.

Frozen backbones (by hand and by ``BackboneFinetuning``), weight averaging (SWA, EMA), an optimizer with one group
per module resumed between stages, dict batches and a two-argument ``forward``, a second ``fit``, ``max_steps``
runs and step schedules, a weight used outside its module, ``validate``/``test``/``predict`` from a checkpoint after
a structured fit, the Trainer's batch and validation limits, and ``import lightning as L``. Each runs under both
Lightning packages where cheap (the ``pl_ns`` fixture), with a user's module that knows nothing of the plugin
(tests/nets.py ``user_project``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from nets import USER_TARGETS, user_images, user_project, user_trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_cheapconv import GhostConv2d, GhostConvCallback, StructuredConv2d, StructuredConvCallback
from lightning_cheapconv._lightning import MisconfigurationException
from lightning_cheapconv.structure import structural_residual

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- helpers
def layer_types(model: nn.Module, names: tuple[str, ...] = USER_TARGETS) -> dict[str, str]:
    return {name: type(model.get_submodule(name)).__name__ for name in names}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def optimizer_ids(trainer: Any) -> set[int]:
    return {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}


_PROBES: dict[str, type] = {}


def probe(lp: ModuleType, watch: Any = None) -> Any:
    """A ``lp.Callback`` (list it after the plugin's callback) recording, at every epoch start, the types of the
    target layers and a copy of every parameter with its ``requires_grad``; at every training batch start the types
    by ``global_step``; at every batch end ``watch(pl_module)`` by ``global_step``; at every epoch end the
    parameters. ``ran`` counts training batches."""
    if lp.__name__ not in _PROBES:

        class Probe(lp.Callback):
            def __init__(self, watch: Any = None) -> None:
                self.watch = watch
                self.initial: dict[str, torch.Tensor] = {}
                self.types_at_epoch: dict[int, dict[str, str]] = {}
                self.params_at_epoch: dict[int, dict[str, torch.Tensor]] = {}
                self.grad_at_epoch: dict[int, dict[str, bool]] = {}
                self.in_optimizer_at_epoch: dict[int, set[str]] = {}
                self.params_at_epoch_end: dict[int, dict[str, torch.Tensor]] = {}
                self.types_at_step: dict[int, dict[str, str]] = {}
                self.watched: dict[int, Any] = {}
                self.ran = 0

            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                self.initial = snapshot(pl_module)

            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                epoch = trainer.current_epoch
                self.types_at_epoch[epoch] = layer_types(pl_module)
                self.params_at_epoch[epoch] = snapshot(pl_module)
                self.grad_at_epoch[epoch] = {n: p.requires_grad for n, p in pl_module.named_parameters()}
                ids = optimizer_ids(trainer)
                self.in_optimizer_at_epoch[epoch] = {n for n, p in pl_module.named_parameters() if id(p) in ids}

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                self.ran += 1
                self.types_at_step[trainer.global_step] = layer_types(pl_module)

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
                if self.watch is not None:
                    self.watched[trainer.global_step] = self.watch(pl_module)

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                self.params_at_epoch_end[trainer.current_epoch] = snapshot(pl_module)

        _PROBES[lp.__name__] = Probe
    return _PROBES[lp.__name__](watch)


def ghost_count(types: dict[str, str]) -> int:
    return sum(t == "GhostConv2d" for t in types.values())


# ---------------------------------------------------------------------------------------------- a. frozen layers
@pytest.mark.parametrize("start_epoch", [0, 1], ids=["in-setup", "mid-fit"])
def test_ghost_keeps_a_hand_frozen_backbone_frozen(pl_ns: ModuleType, project: Any, start_epoch: int) -> None:
    """``model.backbone.requires_grad_(False)`` by hand, an optimizer over *all* parameters: the Ghost modules
    that replace frozen convs have only frozen parameters, and no frozen parameter moves (exactly), while the
    head trains."""
    pl_ns.seed_everything(0)
    model = project.Model(params="all")
    model.backbone.requires_grad_(False)
    frozen_before = snapshot(model.backbone)
    watcher = probe(pl_ns)
    trainer = user_trainer(pl_ns, callbacks=[GhostConvCallback(start_epoch=start_epoch, verbose=0), watcher])
    trainer.fit(model, datamodule=project.DataModule())
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "GhostConv2d")
    for name, param in model.backbone.named_parameters():
        assert not param.requires_grad, f"backbone.{name} was frozen by the user and must stay frozen"
    after_conversion = watcher.params_at_epoch[start_epoch]
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            assert torch.equal(param.detach(), after_conversion[name]), f"frozen {name} moved"
            if name[len("backbone.") :] in frozen_before:  # not replaced: the user's own tensor, untouched
                assert torch.equal(param.detach(), frozen_before[name[len("backbone.") :]]), name
    assert not torch.equal(model.head.weight.detach(), watcher.initial["head.weight"])  # the head trained


@pytest.mark.parametrize("start_epoch", [0, 1], ids=["in-setup", "mid-fit"])
def test_ghost_with_backbone_finetuning(pl_ns: ModuleType, project: Any, start_epoch: int) -> None:
    """Lightning's ``BackboneFinetuning(unfreeze_backbone_at_epoch=2)`` (listed first) freezes the convs of
    ``model.backbone``; a Ghost stage at epoch 0 or 1 converts them while frozen: the new parameters do not
    require gradients and do not move until epoch 2, then they are in the optimizer and train."""
    pl_ns.seed_everything(0)
    model = project.Model(scheduler="none")
    finetuning = pl_ns.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=2)
    watcher = probe(pl_ns)
    ghost = GhostConvCallback(start_epoch=start_epoch, verbose=0)
    trainer = user_trainer(pl_ns, max_epochs=4, callbacks=[finetuning, ghost, watcher])
    trainer.fit(model, datamodule=project.DataModule())
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "GhostConv2d")
    new = [n for n, _ in model.named_parameters() if n.startswith(tuple(f"{t}." for t in USER_TARGETS))]
    assert len(new) == 6  # primary and cheap weights of three layers
    for name in new:
        for epoch in range(start_epoch, 2):  # frozen epochs after the conversion
            assert watcher.grad_at_epoch[epoch][name] is False, f"{name} requires grad at epoch {epoch}"
            assert name not in watcher.in_optimizer_at_epoch[epoch], f"{name} in the optimizer at epoch {epoch}"
        moved = watcher.params_at_epoch[2][name] - watcher.params_at_epoch[start_epoch][name]
        assert moved.abs().max().item() == 0.0, f"{name} moved while frozen"
        assert watcher.grad_at_epoch[2][name] is True, f"{name} not unfrozen by BackboneFinetuning"
        assert name in watcher.in_optimizer_at_epoch[2], f"{name} not added to the optimizer at the unfreeze epoch"
        assert not torch.equal(model.get_parameter(name).detach(), watcher.params_at_epoch[2][name]), (
            f"{name} did not train after the unfreeze epoch"
        )


def test_structured_regularizer_does_not_push_frozen_weights(pl_ns: ModuleType, project: Any) -> None:
    """A hand-frozen backbone with an optimizer over all parameters: before the projection window (epoch 2) the
    structural regularizer must not move the frozen weights (exactly). At fit end a frozen layer is either
    decomposed with frozen parameters, or kept dense with its weights exactly as the user left them."""
    pl_ns.seed_everything(0)
    model = project.Model(params="all")
    model.backbone.requires_grad_(False)
    original = snapshot(model)
    watcher = probe(pl_ns)
    callback = StructuredConvCallback(reg_weight=1.0, project_start_epoch=2, verbose=0)
    trainer = user_trainer(pl_ns, callbacks=[callback, watcher])
    trainer.fit(model, datamodule=project.DataModule())
    for name in USER_TARGETS:
        key = f"{name}.weight"
        for epoch in (0, 1):
            moved = watcher.params_at_epoch_end[epoch][key] - original[key]
            assert moved.abs().max().item() == 0.0, f"frozen {key} moved in epoch {epoch}"
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d):  # left dense: not even projected
            assert torch.equal(layer.weight.detach(), original[key]), f"frozen {key} moved but stayed dense"
        else:
            assert isinstance(layer, StructuredConv2d), type(layer)
    for name, param in model.backbone.named_parameters():
        assert not param.requires_grad, f"backbone.{name} was frozen by the user and must stay frozen"


# ---------------------------------------------------------------------------------------------- b. weight averaging
def _fit_or_refused(trainer: Any, model: Any, datamodule: Any, watcher: Any, other: str) -> bool:
    """Fit; True if it finished, False if refused with a MisconfigurationException naming ``other`` before the
    first training step. Any other exception (a shape mismatch mid-fit) fails the test."""
    try:
        trainer.fit(model, datamodule=datamodule)
    except MisconfigurationException as err:
        assert other in str(err), f"refused without naming {other}: {err}"
        assert watcher.ran == 0, f"refused after {watcher.ran} training batches, not before the first step"
        return False
    assert trainer.state.finished
    return True


@pytest.mark.parametrize("swa_first", [True, False], ids=["swa-listed-first", "swa-listed-last"])
@pytest.mark.filterwarnings("ignore:.*SWA.*")
def test_ghost_with_stochastic_weight_averaging(pl_ns: ModuleType, project: Any, swa_first: bool) -> None:
    """``StochasticWeightAveraging(swa_epoch_start=2)`` with a Ghost stage at epoch 1 (SWA's averaged copy was
    made in setup, dense): either the fit finishes with Ghost layers holding the averaged weights, or the pair is
    refused before training, naming StochasticWeightAveraging."""
    pl_ns.seed_everything(0)
    model = project.Model(scheduler="none")
    swa = pl_ns.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    ghost = GhostConvCallback(start_epoch=1, verbose=0)
    watcher = probe(pl_ns)
    callbacks = [swa, ghost, watcher] if swa_first else [ghost, swa, watcher]
    trainer = user_trainer(pl_ns, callbacks=callbacks)
    if not _fit_or_refused(trainer, model, project.DataModule(), watcher, "StochasticWeightAveraging"):
        return
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "GhostConv2d")
    averaged = swa._average_model
    assert layer_types(averaged) == dict.fromkeys(USER_TARGETS, "GhostConv2d")
    final, average = snapshot(model), snapshot(averaged)
    assert final.keys() == average.keys()
    for key in final:
        torch.testing.assert_close(final[key], average[key], atol=1e-6, rtol=0, msg=key)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()


@pytest.mark.parametrize("use_buffers", [True, False])
def test_ghost_with_ema_weight_averaging(pl_ns: ModuleType, project: Any, use_buffers: bool) -> None:
    """``EMAWeightAveraging`` (an averaged copy updated every step) with a Ghost stage at epoch 1. Averaging buffers
    (its default) would turn the Ghost modules' integer channel order into truncated averages (the final model
    then scores at chance): refused before training, naming the fix. Without buffers the fit finishes, the final
    model is Ghost, holds the EMA weights, and keeps the channel order the conversion chose."""
    pl_ns.seed_everything(0)
    model = project.Model()
    ema = pl_ns.callbacks.EMAWeightAveraging(use_buffers=use_buffers)
    watcher = probe(pl_ns)
    orders: dict[str, torch.Tensor] = {}

    class ChannelOrder(pl_ns.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # the live model's own, after validation
            layers = {n: pl_module.get_submodule(n) for n in USER_TARGETS}
            orders.update({n: m.output_index.clone() for n, m in layers.items() if isinstance(m, GhostConv2d)})

    callbacks = [ema, GhostConvCallback(start_epoch=1, verbose=0), watcher, ChannelOrder()]
    trainer = user_trainer(pl_ns, callbacks=callbacks)
    if use_buffers:
        with pytest.raises(
            MisconfigurationException, match=r"EMAWeightAveraging\(use_buffers=True\).*use_buffers=False"
        ):
            trainer.fit(model, datamodule=project.DataModule())
        assert watcher.ran == 0 and layer_types(model) == dict.fromkeys(USER_TARGETS, "Conv2d")
        return
    trainer.fit(model, datamodule=project.DataModule())
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "GhostConv2d")
    averaged = ema._average_model.module
    assert layer_types(averaged) == dict.fromkeys(USER_TARGETS, "GhostConv2d")
    final, average = snapshot(model), snapshot(averaged)
    assert final.keys() == average.keys()
    for key in final:
        torch.testing.assert_close(final[key], average[key], atol=1e-6, rtol=0, msg=key)
    for name in USER_TARGETS:
        index = model.get_submodule(name).output_index
        assert torch.equal(index, orders[name]) and len(set(index.tolist())) == len(index), name
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()


def test_structured_with_ema_weight_averaging(pl_ns: ModuleType, project: Any) -> None:
    """``EMAWeightAveraging`` averages from the first step, before any projection stage, and copies its average into
    the model at train end: those weights are not structured. They are projected again before the decomposition
    (exact again), and a warning names the averaging callback and what to do."""
    pl_ns.seed_everything(0)
    model = project.Model()
    callback = StructuredConvCallback(verbose=0)
    trainer = user_trainer(pl_ns, callbacks=[pl_ns.callbacks.EMAWeightAveraging(), callback])
    with pytest.warns(UserWarning, match=r"no longer structured at fit end \(EMAWeightAveraging copied in"):
        trainer.fit(model, datamodule=project.DataModule())
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "StructuredConv2d")
    assert callback.decomposition_error is not None and callback.decomposition_error < 1e-4


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_model_pruning_is_refused_at_setup(pl_ns: ModuleType, project: Any, method: str) -> None:
    """Lightning's ``ModelPruning`` re-parametrizes the weights of the layers the plugin replaces: refused before any
    change, naming it."""
    pl_ns.seed_everything(0)
    model = project.Model()
    before = snapshot(model)
    callback = GhostConvCallback(verbose=0) if method == "ghost" else StructuredConvCallback(verbose=0)
    pruning = pl_ns.callbacks.ModelPruning("l1_unstructured", amount=0.5, verbose=0)
    trainer = user_trainer(pl_ns, callbacks=[pruning, callback])
    with pytest.raises(MisconfigurationException, match="ModelPruning"):
        trainer.fit(model, datamodule=project.DataModule())
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "Conv2d")
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- c. per-module groups
def _per_module_groups(modules: Any) -> list[dict]:
    groups = []
    for module in modules:
        own = list(module.parameters(recurse=False))
        if own:
            lr = {nn.Conv2d: 0.05, nn.BatchNorm2d: 0.1, nn.Linear: 0.02}[type(module)]
            groups.append({"params": own, "lr": lr})
    return groups


@pytest.mark.parametrize("optimizers", ["one", "two-manual"])
def test_resume_with_one_param_group_per_module(
    pl_ns: ModuleType, project: Any, tmp_path: Path, optimizers: str
) -> None:
    """``configure_optimizers`` builds one parameter group per module (convs, norms and head at different learning
    rates, StepLR): stopped after the Ghost stage (checkpoint at the end of epoch 1, stage at its start) and
    resumed with ``ckpt_path``, the run finishes and equals the uninterrupted one. Also with two optimizers (Adam
    on the backbone, per module; SGD on the head) and two schedulers under manual optimization."""

    class PerModuleGroups(project.Model):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(_per_module_groups(self.modules()), lr=0.05, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    class TwoOptimizers(project.Model):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            backbone_opt, head_opt = self.optimizers()
            loss = F.cross_entropy(self(batch[0]), batch[1])
            backbone_opt.zero_grad()
            head_opt.zero_grad()
            self.manual_backward(loss)
            backbone_opt.step()
            head_opt.step()
            if self.trainer.is_last_batch:
                for scheduler in self.lr_schedulers():
                    scheduler.step()
            return loss

        def configure_optimizers(self) -> Any:
            backbone = torch.optim.Adam(_per_module_groups(self.backbone.modules()), lr=0.01)
            head = torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9)
            schedulers = [
                torch.optim.lr_scheduler.StepLR(backbone, 1, 0.5),
                torch.optim.lr_scheduler.ExponentialLR(head, 0.9),
            ]
            return [backbone, head], schedulers

    def run(root: Path, ckpt_path: str | None = None) -> Any:
        pl_ns.seed_everything(0)
        model = PerModuleGroups() if optimizers == "one" else TwoOptimizers()
        checkpoint = pl_ns.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        callbacks = [GhostConvCallback(start_epoch=1, verbose=0), checkpoint]
        trainer = user_trainer(pl_ns, callbacks=callbacks, enable_checkpointing=True, deterministic=True)
        trainer.fit(model, datamodule=project.DataModule(), ckpt_path=ckpt_path)
        assert trainer.current_epoch == 3
        return model

    expected = {k: v for k, v in run(tmp_path / "a").state_dict().items() if isinstance(v, torch.Tensor)}
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))
    assert layer_types(resumed) == dict.fromkeys(USER_TARGETS, "GhostConv2d")
    actual = {k: v for k, v in resumed.state_dict().items() if isinstance(v, torch.Tensor)}
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------------- d. dict batches
class DictImages(Dataset):
    """``{"label": LongTensor, "image": FloatTensor[, "mask": FloatTensor]}``: the label key first."""

    def __init__(self, n: int, seed: int, mask: bool = False) -> None:
        self.images, self.labels = user_images(n, 8, seed=seed).tensors
        generator = torch.Generator().manual_seed(seed + 100)
        self.masks = (torch.rand(n, 1, 8, 8, generator=generator) > 0.2).float() if mask else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"label": self.labels[index], "image": self.images[index]}
        if self.masks is not None:
            item["mask"] = self.masks[index]
        return item


def dict_model(project: Any, two_args: bool) -> Any:
    """The user's model taking dict batches: ``self(batch["image"])`` or ``self(batch["image"], batch["mask"])``."""

    class DictModel(project.Model):
        def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(image)

        def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self(batch["image"])

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = F.cross_entropy(self.inputs(batch), batch["label"])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            self.val_acc(self.inputs(batch), batch["label"])
            self.log("val_acc", self.val_acc)

    class MaskedModel(DictModel):
        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # two required arguments
            return super().forward(image * mask)

        def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self(batch["image"], batch["mask"])

    return MaskedModel() if two_args else DictModel()


@pytest.mark.parametrize("two_args", [False, True], ids=["forward(image)", "forward(image,mask)"])
@pytest.mark.parametrize(
    "make_callback",
    [
        pytest.param(lambda: GhostConvCallback(start_epoch=1, verbose=0), id="ghost"),
        pytest.param(lambda: GhostConvCallback(calibration_batches=2, start_epoch=1, verbose=0), id="ghost-calib"),
        pytest.param(lambda: StructuredConvCallback(verbose=0), id="structured"),
    ],
)
def test_dict_batches_with_the_label_first(pl_ns: ModuleType, project: Any, two_args: bool, make_callback: Any) -> None:
    """Batches are dicts whose first key is the label: conversion (with calibration on real images) works and
    ``compression/macs_ratio`` is logged by the validation loop."""
    pl_ns.seed_everything(0)
    model = dict_model(project, two_args)
    callback = make_callback()
    train = DataLoader(DictImages(32, seed=0, mask=two_args), batch_size=8)
    val = DataLoader(DictImages(16, seed=1, mask=two_args), batch_size=8)
    trainer = user_trainer(pl_ns, callbacks=[callback])
    trainer.fit(model, train, val)
    cheap = "StructuredConv2d" if isinstance(callback, StructuredConvCallback) else "GhostConv2d"
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, cheap)
    assert "val_acc" in trainer.callback_metrics
    assert "compression/macs_ratio" in trainer.callback_metrics, sorted(trainer.callback_metrics)
    assert float(trainer.callback_metrics["compression/macs_ratio"]) > 1.0


# ---------------------------------------------------------------------------------------------- e. a second fit
@pytest.mark.parametrize("reuse", [True, False], ids=["same-callback", "new-callback"])
@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_second_fit_on_a_converted_model(pl_ns: ModuleType, project: Any, method: str, reuse: bool) -> None:
    """``trainer.fit`` again (a new Trainer) on a model whose conversion finished, with the same callback
    instance or a new one: no error, nothing more converted, and the model trains."""

    def make() -> Any:
        return GhostConvCallback(start_epoch=1, verbose=0) if method == "ghost" else StructuredConvCallback(verbose=0)

    cheap = GhostConv2d if method == "ghost" else StructuredConv2d
    pl_ns.seed_everything(0)
    model = project.Model()
    callback = make()
    user_trainer(pl_ns, callbacks=[callback]).fit(model, datamodule=project.DataModule())
    types, cheap_count, conv_count = layer_types(model), count(model, cheap), count(model, nn.Conv2d)
    assert types == dict.fromkeys(USER_TARGETS, cheap.__name__) and cheap_count == 3
    before = snapshot(model)
    trainer = user_trainer(pl_ns, callbacks=[callback if reuse else make()])
    trainer.fit(model, datamodule=project.DataModule())
    assert trainer.state.finished
    assert layer_types(model) == types
    assert count(model, cheap) == cheap_count
    assert count(model, nn.Conv2d) == conv_count  # the stem stays dense
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name in USER_TARGETS:
        moved = [k for k in after if k.startswith(name + ".") and not torch.equal(after[k], before[k])]
        assert moved, f"{name} did not train in the second fit"


# ---------------------------------------------------------------------------------------------- f. max_steps
@pytest.mark.parametrize(
    ("make_callback", "stays_dense"),
    [
        (lambda: GhostConvCallback(start_epoch=5), True),
        (lambda: GhostConvCallback(start_step=20), True),
        (lambda: StructuredConvCallback(project_start_epoch=5), False),
        (lambda: StructuredConvCallback(project_start_step=20), False),
    ],
    ids=["ghost-epoch-5", "ghost-step-20", "structured-epoch-5", "structured-step-20"],
)
def test_stage_beyond_max_steps_warns(pl_ns: ModuleType, project: Any, make_callback: Any, stays_dense: bool) -> None:
    """``max_epochs=-1, max_steps=14`` with 4 steps an epoch: a stage at epoch 5 or step 20 is never reached, and
    the callback says so (a UserWarning) instead of leaving it to the user to notice."""
    pl_ns.seed_everything(0)
    model = project.Model(scheduler="none")
    trainer = user_trainer(pl_ns, max_epochs=-1, max_steps=14, callbacks=[make_callback()])
    with pytest.warns(UserWarning, match=r"stay dense|not (all )?reached|never reach|unreachable"):
        trainer.fit(model, datamodule=project.DataModule())
    assert trainer.global_step == 14
    if stays_dense:
        assert layer_types(model) == dict.fromkeys(USER_TARGETS, "Conv2d")


@pytest.mark.parametrize(
    ("kwargs", "steps"),
    [({"start_step": 6}, (6, 6)), ({"start_step": 4, "end_step": 8, "stages": 2}, (4, 8))],
    ids=["start_step=6", "steps-4-to-8-in-2-stages"],
)
def test_ghost_step_schedule(pl_ns: ModuleType, project: Any, kwargs: dict, steps: tuple[int, int]) -> None:
    """``GhostConvCallback(start_step=...)`` converts at that optimizer step (``global_step``), mid-epoch, under
    ``max_epochs=-1, max_steps=14``: dense before it, the first stage from it, all Ghost from the last one on."""
    first, last = steps
    pl_ns.seed_everything(0)
    model = project.Model(scheduler="none")
    watcher = probe(pl_ns)
    callback = GhostConvCallback(verbose=0, **kwargs)
    trainer = user_trainer(pl_ns, max_epochs=-1, max_steps=14, callbacks=[callback, watcher])
    trainer.fit(model, datamodule=project.DataModule())
    assert sorted(watcher.types_at_step) == list(range(14))
    counts = {step: ghost_count(types) for step, types in watcher.types_at_step.items()}
    assert all(counts[s] == 0 for s in range(first)), counts
    assert all(counts[s] >= 1 for s in range(first, 14)), counts
    assert all(counts[s] == 3 for s in range(last, 14)), counts
    if last > first:
        assert all(counts[s] < 3 for s in range(first, last)), counts
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "GhostConv2d")


@pytest.mark.parametrize(
    "make",
    [
        lambda: GhostConvCallback(start_epoch=1, start_step=4),
        lambda: GhostConvCallback(end_epoch=2, end_step=8),
        lambda: StructuredConvCallback(project_start_epoch=1, project_start_step=4),
    ],
    ids=["ghost-start", "ghost-end", "structured"],
)
def test_epoch_and_step_schedules_together_are_refused(pl_ns: ModuleType, project: Any, make: Any) -> None:
    with pytest.raises(MisconfigurationException, match=r"_step|_epoch"):
        callback = make()
        user_trainer(pl_ns, max_steps=8, callbacks=[callback]).fit(project.Model(), datamodule=project.DataModule())


def _projection_watch(callback: StructuredConvCallback) -> Any:
    def watch(pl_module: nn.Module) -> tuple[frozenset[str], dict[str, float]]:
        residuals = {}
        with torch.no_grad():
            for name in USER_TARGETS:
                layer = pl_module.get_submodule(name)
                if isinstance(layer, nn.Conv2d) and name in callback.specs:
                    residuals[name] = float(structural_residual(layer.weight, callback.specs[name]))
        return frozenset(callback.projected), residuals

    return watch


@pytest.mark.parametrize(
    ("kwargs", "window"),
    [({}, (8, 12)), ({"project_start_step": 4, "project_end_step": 8}, (4, 8))],
    ids=["default-window", "steps-4-to-8"],
)
def test_structured_projection_under_max_steps(
    pl_ns: ModuleType, project: Any, kwargs: dict, window: tuple[int, int]
) -> None:
    """``max_epochs=-1, max_steps=16``: projection stages happen during training (default window 50%..75% of
    ``max_steps``, or the given steps), not only at fit end: no layer projected before the window, all of them
    from its end on, with exactly structured weights before the fit-end decomposition."""
    start, end = window
    pl_ns.seed_everything(0)
    model = project.Model(scheduler="none")
    callback = StructuredConvCallback(verbose=0, **kwargs)
    watcher = probe(pl_ns, _projection_watch(callback))
    trainer = user_trainer(pl_ns, max_epochs=-1, max_steps=16, callbacks=[callback, watcher])
    trainer.fit(model, datamodule=project.DataModule())
    assert sorted(watcher.watched) == list(range(1, 17))  # batch ends: global_step after each optimizer step
    projected = {step: set(p) for step, (p, _) in watcher.watched.items()}
    assert all(not projected[s] for s in range(1, start - 1)), projected
    assert all(projected[s] == set(USER_TARGETS) for s in range(end + 1, 17)), projected
    last_residuals = watcher.watched[16][1]
    assert set(last_residuals) == set(USER_TARGETS)
    assert max(last_residuals.values()) < 1e-5, last_residuals
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "StructuredConv2d")


# ---------------------------------------------------------------------------------------------- g. tied weights
_TIED: dict[str, type] = {}


def tied_autoencoder(lp: ModuleType, untraceable: bool = False) -> Any:
    """An autoencoder whose decoder reuses the encoder's weight: ``F.conv_transpose2d(z, self.enc.weight)``."""
    if lp.__name__ not in _TIED:

        class TiedAutoencoder(lp.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.stem = nn.Conv2d(3, 8, 3, padding=1)
                self.enc = nn.Conv2d(8, 16, 3, padding=1)
                self.mid = nn.Conv2d(16, 16, 3, padding=1)
                self.out = nn.Conv2d(8, 3, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                z = F.relu(self.mid(F.relu(self.enc(F.relu(self.stem(x))))))
                if self.untraceable and bool(z.sum() < 0):  # data-dependent control flow: torch.fx cannot trace it
                    z = -z
                return self.out(F.relu(F.conv_transpose2d(z, self.enc.weight, padding=1)))

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                loss = F.mse_loss(self(batch[0]), batch[0])
                self.log("train_loss", loss)
                return loss

            def validation_step(self, batch: Any, batch_idx: int) -> None:
                self.log("val_loss", F.mse_loss(self(batch[0]), batch[0]))

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

        _TIED[lp.__name__] = TiedAutoencoder
    model = _TIED[lp.__name__]()
    model.untraceable = untraceable
    return model


@pytest.mark.parametrize(
    ("make_callback", "cheap"),
    [
        (lambda: GhostConvCallback(start_epoch=1, verbose=0), "GhostConv2d"),
        (lambda: StructuredConvCallback(verbose=0), "StructuredConv2d"),
    ],
    ids=["ghost", "structured"],
)
@pytest.mark.parametrize("untraceable", [False, True], ids=["traced", "found-in-training"])
def test_weight_used_outside_its_module_is_skipped(
    pl_ns: ModuleType, make_callback: Any, cheap: str, untraceable: bool
) -> None:
    """``enc.weight`` is also used by the decoder: ``enc`` stays ``nn.Conv2d``, the plan says why, ``mid`` is
    converted, and the model runs after fit. A model torch.fx cannot trace is checked on the input its forward
    received in training, before the first change."""
    pl_ns.seed_everything(0)
    model = tied_autoencoder(pl_ns, untraceable)
    callback = make_callback()
    data = DataLoader(user_images(32, 8, seed=0), batch_size=8)
    trainer = user_trainer(pl_ns, callbacks=[callback])
    trainer.fit(model, data, DataLoader(user_images(16, 8, seed=1), batch_size=8))
    assert type(model.enc) is nn.Conv2d
    assert type(model.mid).__name__ == cheap
    plan = {p.name: p for p in callback.plan}
    assert plan["enc"].action == "skip", plan["enc"]
    reason = plan["enc"].reason
    assert re.search(r"(?i)outside|elsewhere", reason) and re.search(r"(?i)weight|param", reason), reason
    assert plan["mid"].action == "convert"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_fit_end_decomposition_that_breaks_the_forward_is_undone_loudly(pl_ns: ModuleType) -> None:
    """A forward that only runs with dense layers (no check can know): at fit end the decomposed network fails its
    forward pass, so the projected dense layers are put back and a warning says so (no silent ``None``)."""
    pl_ns.seed_everything(0)
    model = tied_autoencoder(pl_ns)
    model.forward = _dense_only(model)
    callback = StructuredConvCallback(exclude="enc", verbose=0)
    trainer = user_trainer(pl_ns, callbacks=[callback])
    with pytest.warns(UserWarning, match="decomposed network fails its forward pass"):
        trainer.fit(model, DataLoader(user_images(32, 8, seed=0), batch_size=8))
    assert type(model.mid) is nn.Conv2d
    assert float(structural_residual(model.mid.weight.detach(), callback.specs["mid"])) < 1e-5  # projected
    assert callback.decomposition_error is None
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def _dense_only(model: nn.Module) -> Any:
    forward = model.forward

    def dense_only_forward(x: torch.Tensor) -> torch.Tensor:
        if type(model.mid) is not nn.Conv2d:
            raise RuntimeError("this network runs with dense layers only")
        return forward(x)

    return dense_only_forward


# ---------------------------------------------------------------------------------------------- h. evaluate after fit
_STRUCTURE_WARNING = re.compile(r"(?i)restructur|structure|dense|decompos")


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluate_last_checkpoint_after_a_structured_fit(
    pl_ns: ModuleType, project: Any, tmp_path: Path, stage: str
) -> None:
    """After a structured fit (decomposed at fit end; ModelCheckpoint's ``last`` was saved dense, every layer
    projected), ``trainer.validate/test/predict(model, ckpt_path="last")`` keeps the decomposed form and evaluates
    the checkpoint's function, without a warning."""
    pl_ns.seed_everything(0)
    model = project.Model()
    checkpoint = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    callbacks = [StructuredConvCallback(verbose=0), checkpoint]
    trainer = user_trainer(pl_ns, callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp_path)
    datamodule = project.DataModule()
    trainer.fit(model, datamodule=datamodule)
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, "StructuredConv2d")
    before = layer_types(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(trainer, stage)(model, datamodule=datamodule, ckpt_path="last")
    said = [
        str(w.message)
        for w in caught
        if _STRUCTURE_WARNING.search(str(w.message).replace("StructuredConvCallback", ""))
    ]
    assert layer_types(model) == before and not said, said
    # Kept decomposed: it must compute what the checkpoint computes.
    reference = project.Model()
    state = torch.load(checkpoint.last_model_path, map_location="cpu", weights_only=True)["state_dict"]
    reference.load_state_dict(state)
    x = user_images(4, 8, seed=3).tensors[0]
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_fresh_model_evaluates_a_converted_checkpoint(
    pl_ns: ModuleType, project: Any, tmp_path: Path, method: str
) -> None:
    """In a new process's way: a fresh (dense) instance of the user's module, a new Trainer with the callback, and
    ``trainer.test(fresh, ckpt_path=...)`` of a converted run's checkpoint: the callback's hook rebuilds the
    checkpoint's structure before its weights load."""
    pl_ns.seed_everything(0)
    make = (lambda: GhostConvCallback(verbose=0)) if method == "ghost" else (lambda: StructuredConvCallback(verbose=0))
    trainer = user_trainer(pl_ns, callbacks=[make()], default_root_dir=tmp_path)
    model = project.Model()
    trainer.fit(model, datamodule=project.DataModule())
    path = tmp_path / "converted.ckpt"
    trainer.save_checkpoint(path)
    fresh = project.Model()
    assert layer_types(fresh) == dict.fromkeys(USER_TARGETS, "Conv2d")
    user_trainer(pl_ns, callbacks=[make()], default_root_dir=tmp_path).test(
        fresh, datamodule=project.DataModule(), ckpt_path=str(path)
    )
    assert (
        layer_types(fresh)
        == layer_types(model)
        == dict.fromkeys(USER_TARGETS, f"{type(model.get_submodule(USER_TARGETS[0])).__name__}")
    )
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for key, value in fresh.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected[key], msg=key)


# ---------------------------------------------------------------------------------------------- i. Trainer setups
@pytest.mark.parametrize(
    "options",
    [
        {"fast_dev_run": True},
        {"limit_train_batches": 2},
        {"val_check_interval": 0.5},
        {"check_val_every_n_epoch": 2},
    ],
    ids=["fast_dev_run", "limit_train_batches", "val_check_interval", "check_val_every_n_epoch"],
)
@pytest.mark.filterwarnings("ignore:.*stay dense.*")
def test_trainer_setups_with_a_mid_fit_stage(pl_ns: ModuleType, project: Any, options: dict) -> None:
    """A Ghost stage at epoch 1 under the Trainer's batch and validation limits: the fit finishes, the stage
    happens at its epoch, and ``compression/*`` is logged whenever validation ran."""
    pl_ns.seed_everything(0)
    model = project.Model()
    watcher = probe(pl_ns)
    trainer = user_trainer(pl_ns, callbacks=[GhostConvCallback(start_epoch=1, verbose=0), watcher], **options)
    trainer.fit(model, datamodule=project.DataModule())
    assert trainer.state.finished
    if options.get("fast_dev_run"):
        assert watcher.ran == 1
        return
    assert {e: ghost_count(t) for e, t in watcher.types_at_epoch.items()} == {0: 0, 1: 3, 2: 3}
    assert watcher.ran == 3 * (2 if "limit_train_batches" in options else 4)
    assert "val_acc" in trainer.callback_metrics
    assert float(trainer.callback_metrics["compression/macs_ratio"]) > 1.0


# ---------------------------------------------------------------------------------------------- j. lightning as L
@pytest.mark.parametrize(
    ("make_callback", "cheap"),
    [
        (lambda: GhostConvCallback(), "GhostConv2d"),
        (lambda: StructuredConvCallback(), "StructuredConv2d"),
    ],
    ids=["ghost", "structured"],
)
def test_import_lightning_as_L(make_callback: Any, cheap: str) -> None:
    """``import lightning as L``: ``L.Trainer(callbacks=[...])`` with its default strategy and a module subclassing
    ``L.LightningModule`` (once refused: "strategy SingleDeviceStrategy is not supported")."""
    import lightning as L

    project = user_project("lightning.pytorch")
    model = project.Model()
    assert isinstance(model, L.LightningModule)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[make_callback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=project.DataModule())
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, cheap)


def test_structured_with_swa_starting_before_the_last_projection_stage_warns(pl_ns: ModuleType, project: Any) -> None:
    """SWA from epoch 1 with projection stages at epochs 2..3 (max_epochs=5): its average mixes unprojected weights
    and its BatchNorm re-estimate precedes our projection, so the start names the fix; SWA from epoch 4 is quiet."""
    for swa_epoch_start, warns in ((2, True), (5, False)):
        pl_ns.seed_everything(0)
        swa = pl_ns.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=swa_epoch_start)
        callback = StructuredConvCallback(project_start_epoch=2, project_end_epoch=3, verbose=0)
        trainer = user_trainer(pl_ns, max_epochs=5, callbacks=[swa, callback])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(project.Model(scheduler="none"), datamodule=project.DataModule())
        said = [str(w.message) for w in caught if "starts averaging" in str(w.message)]
        assert len(said) == warns, said
        if warns:
            assert "epoch 1, not after the last projection stage (epoch 3)" in said[0]
            assert "swa_epoch_start >= 5" in said[0]


def test_end_without_stages_warns() -> None:
    with pytest.warns(UserWarning, match="end_step=5 has no effect with stages=1"):
        GhostConvCallback(end_step=5)
