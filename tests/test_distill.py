"""Distillation from the network before its first conversion (lightning_cheapconv/callbacks/distill.py): the added
gradient against autograd of the stated loss (float64), the loss scale and accumulation factor, bf16-mixed, gradient
accumulation, resume, both Lightning packages, and the structured callback."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.utilities.exceptions import MisconfigurationException
from nets import GHOST_TARGETS, TinyNet, quiet_trainer, tiny_backbone, user_trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cheapconv import GhostConv2d, GhostConvCallback, StructuredConvCallback, convert_to_ghost
from lightning_cheapconv.callbacks.base import _loss_factor
from lightning_cheapconv.callbacks.distill import (
    Distiller,
    feature_distill_loss,
    logit_distill_loss,
    normalizing_like,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.usefixtures("one_thread"),
]


def loader(n: int = 32, batch_size: int = 8, repeat: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return DataLoader(TensorDataset(images.repeat(repeat, 1, 1, 1), labels.repeat(repeat)), batch_size=batch_size)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- the gradient
@pytest.mark.parametrize("factor", [1.0, 0.25])
@pytest.mark.parametrize("logits", [False, True])
def test_added_gradient_is_autograd_of_the_stated_loss(factor: float, logits: bool) -> None:
    """float64: the gradients with the hooks equal autograd of CE + factor * w * (Σ_l L_feat + L_kd)."""
    model = tiny_backbone(0).double().train()
    weight, temperature = 0.7, 3.0
    distiller = Distiller(weight, logits, temperature)
    distiller.snapshot(model)
    teacher = copy.deepcopy(distiller.teacher)
    result = convert_to_ghost(model, init="random", recalibrate_bn=False)
    names = [c.name for c in result.changes]
    assert len(names) == 3
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))

    distiller.attach(model, names, factor=lambda: factor)
    F.cross_entropy(model(x), y).backward()
    distiller.detach()
    hooked = grads(model)
    logged = distiller.take_losses()

    model.zero_grad()
    seen: dict[str, tuple] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o))) for n in names
    ]
    out = model(x)
    for handle in handles:
        handle.remove()
    features = [feature_distill_loss(o, teacher.get_submodule(n)(i).detach()) for n, (i, o) in seen.items()]
    stated = sum(features) / len(features)  # the mean over the distilled layers
    if logits:  # the teacher's BatchNorms on the batch's statistics, as the training student's
        stated = stated + logit_distill_loss(out, copy.deepcopy(teacher).train()(x).detach(), temperature)
    (F.cross_entropy(out, y) + factor * weight * stated).backward()
    expected = grads(model)
    assert hooked.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(hooked[key], expected[key], atol=1e-10, rtol=1e-9, msg=key)
    torch.testing.assert_close(logged.double(), weight * stated.detach(), rtol=1e-6, atol=0)
    assert stated > 0


def test_losses_definitions() -> None:
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert feature_distill_loss(s, t) == pytest.approx(float(((s - t) ** 2).sum() / (t**2).sum()))
    kl = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), log_target=True, reduction="batchmean")
    assert logit_distill_loss(s, t, 2.0) == pytest.approx(4 * float(kl))
    assert float(logit_distill_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-12)


def test_loss_factor_follows_scaler_and_accumulation() -> None:
    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 1024.0)
    module = SimpleNamespace(automatic_optimization=True)
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=scaler), lightning_module=module, accumulate_grad_batches=4
    )
    assert _loss_factor(trainer) == 256.0
    module.automatic_optimization = False  # manual optimization: Lightning does not divide the loss
    assert _loss_factor(trainer) == 1024.0
    trainer.precision_plugin = SimpleNamespace()  # bf16-mixed / 32: no scaler
    module.automatic_optimization = True
    assert _loss_factor(trainer) == 0.25


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(MisconfigurationException, match="distill_weight=0.*valid range"):
        GhostConvCallback(distill=True, distill_weight=0)
    with pytest.raises(MisconfigurationException, match="distill_temperature=-1.*valid range"):
        StructuredConvCallback(distill=True, distill_temperature=-1)
    with pytest.raises(MisconfigurationException, match="distill="):
        GhostConvCallback(distill="yes")


# ---------------------------------------------------------------------------------------------- in a Trainer
class Before(Callback):
    """Placed before the compression callback: the target layers' weights when epoch ``epoch`` starts."""

    def __init__(self, epoch: int, names: tuple[str, ...] = GHOST_TARGETS) -> None:
        self.epoch, self.names, self.weights = epoch, names, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            self.weights = {n: pl_module.get_submodule(n).weight.detach().clone() for n in self.names}


def test_teacher_is_the_network_before_the_first_conversion_under_both_packages(project: Any) -> None:
    project.lp.seed_everything(0)
    model = project.Model(scheduler="none")
    names = ("backbone.body.0.0", "backbone.body.1.0", "backbone.body.2.0")
    before = Before(1, names)
    callback = GhostConvCallback(start_epoch=1, verbose=0, distill=True, distill_logits=True)
    trainer = user_trainer(project.lp, max_epochs=2, callbacks=[before, callback])
    trainer.fit(model, datamodule=project.DataModule())
    teacher = callback.distiller.teacher
    assert all(isinstance(model.get_submodule(n), GhostConv2d) for n in names)
    assert all(isinstance(teacher.get_submodule(n), nn.Conv2d) for n in names)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert float(trainer.callback_metrics["train/distill"]) > 0
    assert not callback.distiller._handles  # hooks off outside training batches
    for name in names:
        assert torch.equal(teacher.get_submodule(name).weight, before.weights[name])


def test_teacher_weights_are_those_before_conversion() -> None:
    pl.seed_everything(0)
    before = Before(1)
    callback = GhostConvCallback(start_epoch=1, verbose=0, distill=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=[before, callback])
    trainer.fit(TinyNet(scheduler="none"), loader())
    for name in GHOST_TARGETS:
        assert torch.equal(callback.distiller.teacher.get_submodule(name).weight, before.weights[name])


def test_bf16_mixed() -> None:
    pl.seed_everything(0)
    callback = GhostConvCallback(verbose=0, distill=True, distill_logits=True, distill_weight=0.5)
    trainer = quiet_trainer(max_epochs=2, precision="bf16-mixed", callbacks=[callback])
    model = TinyNet(scheduler="none")
    trainer.fit(model, loader())
    loss = trainer.callback_metrics["train/distill"]
    assert torch.isfinite(loss) and loss > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _fit_accumulating(batch_size: int, accumulate: int, distill: bool) -> TinyNet:
    pl.seed_everything(0)
    callback = GhostConvCallback(verbose=0, distill=distill, distill_logits=distill, distill_weight=2.0)
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[callback])
    model = TinyNet(scheduler="none")
    trainer.fit(model, loader(n=8, batch_size=batch_size, repeat=2))
    return model


def test_accumulation_scales_like_the_loss() -> None:
    """16 images = the same 8 twice: one batch of 16, or two accumulated batches of 8, make the same gradient (the
    BatchNorm batch statistics, the mean loss and both distillation terms are those of the 8)."""
    whole = _fit_accumulating(16, 1, distill=True)
    accumulated = _fit_accumulating(8, 2, distill=True)
    plain = _fit_accumulating(16, 1, distill=False)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(whole.parameters(), plain.parameters(), strict=True))


@pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*")
def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    def run(root: Path, ckpt_path: str | None = None) -> tuple[TinyNet, GhostConvCallback]:
        pl.seed_everything(0)
        model = TinyNet(scheduler="none")
        callback = GhostConvCallback(start_epoch=1, verbose=0, distill=True, distill_logits=True)
        checkpoint = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = quiet_trainer(
            max_epochs=3, deterministic=True, callbacks=[callback, checkpoint], enable_checkpointing=True
        )
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model, callback

    model_a, callback_a = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert any(state.get("teacher") for state in saved.values())
    model_b, callback_b = run(tmp_path / "b", ckpt_path=str(ckpt))
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    for (name, a), b in zip(
        callback_a.distiller.teacher.state_dict().items(),
        callback_b.distiller.teacher.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_structured_distills_projected_layers() -> None:
    pl.seed_everything(0)
    before = Before(1)
    callback = StructuredConvCallback(
        project_start_epoch=1, project_end_epoch=1, verbose=0, distill=True, distill_logits=True
    )
    trainer = quiet_trainer(max_epochs=2, callbacks=[before, callback])
    trainer.fit(TinyNet(scheduler="none"), loader())
    assert float(trainer.callback_metrics["train/distill"]) > 0
    for name in GHOST_TARGETS:
        assert torch.equal(callback.distiller.teacher.get_submodule(name).weight, before.weights[name])


def test_teacher_normalizes_like_the_student_and_keeps_its_statistics() -> None:
    """A student with the teacher's very weights, training: the logit term is 0 (both on the batch's statistics); the
    teacher's running statistics and batch counts are untouched; a student in eval mode meets an eval-mode teacher."""
    model = tiny_backbone(0).train()
    distiller = Distiller(1.0, logits=True, temperature=4.0)
    distiller.snapshot(model)
    assert distiller.teacher is not None
    before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    x = torch.randn(8, 3, 16, 16)
    distiller.attach(model, [], factor=lambda: 1.0)
    model(x).sum().backward()
    distiller.detach()
    assert float(distiller.take_losses()) == pytest.approx(0.0, abs=1e-6)
    after = distiller.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m.training for m in distiller.teacher.modules())
    model.load_state_dict(distiller.teacher.state_dict())  # the student's step moved its running statistics
    model.eval()
    with torch.no_grad(), normalizing_like(distiller.teacher, model):
        torch.testing.assert_close(distiller.teacher(x), model(x))
