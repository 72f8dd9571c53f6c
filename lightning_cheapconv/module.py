"""``ImageClassifier``: a LightningModule around any image classification backbone, with torchmetrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ._lightning import LightningModule
from .checkpoint import install_restructure_hook
from .validation import check_int, check_int_pair

__all__ = ["ImageClassifier", "lr_factor", "split_decay_parameters"]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULERS = ("cosine", "multistep", "none")
_INTERVALS = ("step", "epoch")
_CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16")
_CIFAR_SIZE, _IMAGENET_SIZE = 32, 224


def split_decay_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into ``(decay, no_decay)``: tensors with ``ndim <= 1`` (BN weights, biases) get none.

    Example::

        decay, no_decay = split_decay_parameters(model)
        torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1)
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return decay, no_decay


def lr_factor(
    t: int,
    *,
    total: int,
    warmup: int = 0,
    kind: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> float:
    """Learning-rate multiplier at step (or epoch) ``t`` of ``total``, counted from 0.

    Warm-up: ``(t + 1) / warmup`` for ``t < warmup`` (so the base rate is reached at ``t = warmup - 1``). After it,
    ``cosine`` decays as ``min_factor + (1 - min_factor) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2``,
    ``multistep`` multiplies by ``gamma`` at each milestone reached (``t >= milestone``), ``none`` stays at 1.
    The multiplier is applied on top of warm-up for ``multistep`` too.
    """
    if kind == "multistep":
        after = gamma ** sum(1 for m in milestones if t >= m)
    elif kind == "cosine":
        if t < warmup:
            after = 1.0
        else:
            progress = min(1.0, (t - warmup) / max(1, total - warmup))
            after = min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        after = 1.0
    if t < warmup:
        return after * (t + 1) / warmup
    return after


class ImageClassifier(LightningModule):
    """Image classification with cross-entropy, top-1/top-5 accuracy and the usual CIFAR/ImageNet recipes.

    The network lives at ``self.backbone`` (so a ResNet's convolutions are named ``backbone.layer1.0.conv1``).
    A string backbone is built with :func:`lightning_cheapconv.models.get_model` (``"resnet20"`` .. ``"resnet110"``,
    ``"vgg16"``, ``"ghostnet_100"``, torchvision names) and saved in the hyper-parameters, so
    ``ImageClassifier.load_from_checkpoint(path)`` needs no arguments. An ``nn.Module`` backbone is not saved as a
    hyper-parameter: pass it again, ``ImageClassifier.load_from_checkpoint(path, backbone=make_model())``.
    Checkpoints of models whose convolutions were converted (Ghost or structured layers) load into a fresh model:
    a load-state-dict pre-hook rebuilds the converted layers first (see :mod:`lightning_cheapconv.checkpoint`).

    Logged (epoch means, synchronised across processes): ``train/loss``, ``train/acc``, ``train/acc_top5``,
    ``val/loss``, ``val/acc``, ``val/acc_top5``, ``test/loss``, ``test/acc``, ``test/acc_top5``; per step:
    ``train/loss_step``. Accuracies are micro averages (the fraction of correct samples).

    Args:
        backbone: an ``nn.Module`` returning logits, or a model name for ``get_model``.
        num_classes: number of classes (passed to ``get_model`` for a string backbone).
        optimizer: ``"sgd"`` (with ``momentum``, ``nesterov``) or ``"adamw"``.
        lr: base learning rate (reached after warm-up).
        momentum: SGD momentum (AdamW: beta1).
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 / decoupled weight decay, applied to parameters with ``ndim > 1`` only; BatchNorm
            parameters and biases get none.
        label_smoothing: label smoothing of the cross-entropy loss (training, validation and test).
        scheduler: ``"cosine"`` (to ``min_lr`` at the end of the run), ``"multistep"`` or ``"none"``.
        warmup_epochs: linear warm-up length in epochs (fractions allowed with ``scheduler_interval="step"``).
        milestones: ``multistep`` milestones: floats are fractions of the run, ints are epochs.
        gamma: ``multistep`` decay factor.
        channels_last: keep the backbone and the inputs in ``torch.channels_last`` memory format.
        backbone_kwargs: extra keyword arguments for ``get_model``.
        scheduler_interval: update the learning rate every optimizer ``"step"`` (smooth warm-up) or every ``"epoch"``.
        min_lr: final learning rate of the cosine schedule.
        input_size: side (an int) or ``(height, width)`` of the input images. It sets ``example_input_array`` (one
            zero image of ``in_channels`` channels), so Lightning's model summary counts the FLOPs and the callbacks
            read the network's data flow (its prediction layers) before the first batch. Default ``None``: 32 for
            this library's CIFAR models (``resnet20`` .. ``resnet110``, ``vgg16``), 224 for the other named models,
            and no example for an ``nn.Module`` backbone.
        in_channels: channels of the input images (for ``example_input_array``).

    Example::

        model = ImageClassifier("resnet20", num_classes=10, lr=0.1, warmup_epochs=1)
        trainer = pl.Trainer(max_epochs=200, callbacks=[GhostConvCallback()])
        trainer.fit(model, datamodule=CIFAR10DataModule("data"))
    """

    def __init__(
        self,
        backbone: nn.Module | str = "resnet20",
        num_classes: int = 10,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        scheduler: Literal["cosine", "multistep", "none"] = "cosine",
        warmup_epochs: float = 0,
        milestones: Sequence[float | int] = (0.5, 0.75),
        gamma: float = 0.1,
        channels_last: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        min_lr: float = 0.0,
        input_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(backbone, nn.Module):
            self.save_hyperparameters(ignore=["backbone"])
        elif isinstance(backbone, str):
            self.save_hyperparameters()
        else:
            raise TypeError(f"backbone must be an nn.Module or a model name, got {type(backbone).__name__}")
        optimizer, scheduler = optimizer.lower(), scheduler.lower()  # type: ignore[assignment]
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in _SCHEDULERS:
            raise ValueError(f"scheduler must be one of {_SCHEDULERS}, got {scheduler!r}")
        if scheduler_interval not in _INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {_INTERVALS}, got {scheduler_interval!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if scheduler_interval == "epoch" and warmup_epochs != int(warmup_epochs):
            raise ValueError("fractional warmup_epochs needs scheduler_interval='step'")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        for m in milestones:
            if isinstance(m, float) and not 0.0 < m <= 1.0:
                raise ValueError(f"float milestones are fractions of the run in (0, 1], got {m}")
            if isinstance(m, int) and m < 0:
                raise ValueError(f"int milestones are epochs >= 0, got {m}")
        check_int("in_channels", in_channels, 1, owner="ImageClassifier")
        if input_size is None and isinstance(backbone, str):
            input_size = _CIFAR_SIZE if backbone.lower() in _CIFAR_MODELS else _IMAGENET_SIZE
        if input_size is not None:
            height, width = check_int_pair("input_size", input_size, 1, owner="ImageClassifier")
            self.example_input_array = torch.zeros(1, in_channels, height, width)

        if isinstance(backbone, str):
            from .models import get_model

            backbone = get_model(backbone, num_classes=num_classes, **(backbone_kwargs or {}))
        self.backbone = backbone
        self.num_classes = num_classes
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.scheduler_name = scheduler
        self.warmup_epochs = warmup_epochs
        self.milestones = tuple(milestones)
        self.gamma = gamma
        self.channels_last = channels_last
        self.scheduler_interval = scheduler_interval
        self.min_lr = min_lr

        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
                "acc_top5": MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        install_restructure_hook(self)

    # ------------------------------------------------------------------ forward and steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the backbone."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _shared_step(self, batch: Any, metrics: MetricCollection) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        metrics.update(logits.detach(), y)
        return loss, logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self._shared_step(batch, self.train_metrics)
        batch_size = batch[0].shape[0]
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, _ = self._shared_step(batch, self.val_metrics)
        batch_size = batch[0].shape[0]
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=batch_size)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, _ = self._shared_step(batch, self.test_metrics)
        batch_size = batch[0].shape[0]
        self.log("test/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True, batch_size=batch_size)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Logits for a batch (an image tensor, or a ``(images, targets)`` pair)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    def setup(self, stage: str) -> None:
        # Callbacks may have replaced layers in their own ``setup`` (which runs first); convert those too, before the
        # strategy moves the model and wraps it in DDP.
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ optimisation

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "ImageClassifier needs the number of training batches per epoch to place warm-up and int milestones "
                "in steps; with an iterable data set use scheduler_interval='epoch' or float milestones"
            )
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def _schedule_length(self) -> tuple[int, int, list[int]]:
        """``(total, warmup, milestones)`` in scheduler ticks (optimizer steps or epochs)."""
        trainer = self.trainer
        needs_epoch_length = self.warmup_epochs > 0 or any(isinstance(m, int) for m in self.milestones)
        if self.scheduler_interval == "epoch":
            total = trainer.max_epochs
            if total is None or total < 1:
                raise ValueError("scheduler_interval='epoch' needs Trainer(max_epochs=...)")
            per_epoch: float = 1
        else:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "the learning-rate schedule needs a finite run: set Trainer(max_epochs=...) or max_steps"
                )
            per_epoch = self._steps_per_epoch() if needs_epoch_length else 1
        total = int(total)
        warmup = int(round(self.warmup_epochs * per_epoch))
        milestones = [int(round(m * total)) if isinstance(m, float) else int(m * per_epoch) for m in self.milestones]
        return total, warmup, sorted(milestones)

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimizer with a no-decay group for ``ndim <= 1`` parameters, and the warm-up/cosine/multistep schedule."""
        decay, no_decay = split_decay_parameters(self)
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((decay, self.weight_decay), (no_decay, 0.0))
            if params
        ]
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov
            )
        else:
            opt = torch.optim.AdamW(groups, lr=self.lr, betas=(self.momentum, 0.999))

        if self.scheduler_name == "none" and self.warmup_epochs == 0:
            return {"optimizer": opt}
        total, warmup, milestones = self._schedule_length()
        factor = partial(
            lr_factor,
            total=total,
            warmup=warmup,
            kind=self.scheduler_name,
            milestones=milestones,
            gamma=self.gamma,
            min_factor=self.min_lr / self.lr if self.lr > 0 else 0.0,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "frequency": 1},
        }
