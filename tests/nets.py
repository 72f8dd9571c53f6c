"""Small networks and helpers shared by the test modules and the DDP scripts they launch (tests/scripts/, which
import this module through the ``PYTHONPATH`` that :func:`run_script` sets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

GHOST_TARGETS = ("c1", "c2", "c3")  # TinyNet's convertible convs: the stem and the classifier stay


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding has something to get wrong."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


def tiny_backbone(seed: int = 0) -> nn.Module:
    """Four 3x3 convs at 16x16: the stem and the classifier stay dense, three convs are targets."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class TinyNet(pl.LightningModule):
    """A user's module that knows nothing of the plugin: its own optimizer (one group, all parameters),
    scheduler and training_step. Three target convs: one without bias, one with, one strided. Records its
    losses, the learning rate at each step and epoch start, and its parameters at each epoch start."""

    def __init__(self, scheduler: str = "step", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)
        self.scheduler = scheduler
        self.losses: list[float] = []
        self.step_lrs: list[float] = []
        self.epoch_lrs: list[float] = []
        self.at_epoch_start: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        self.log("my_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("my_val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.step_lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_start(self) -> None:  # runs after the callbacks' hook, so after any conversion
        self.epoch_lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.at_epoch_start = {n: p.detach().clone() for n, p in self.named_parameters()}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.scheduler == "step":
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}
        if self.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with one device and no logger, checkpoints, progress bar, model summary or sanity check;
    ``kwargs`` override or add Trainer arguments."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**options, **kwargs})


def run_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/NAME`` as a fresh launch (Lightning's DDP re-runs it in each rank): one OpenMP
    thread per rank, the repository and this folder on ``PYTHONPATH``, no rank variables inherited."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join((str(here.parent), str(here)))}
    for variable in ("LOCAL_RANK", "GLOBAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)  # Lightning picks a free port itself
    command = [sys.executable, str(here / "scripts" / name), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- a user's project
# A LightningModule and a LightningDataModule written without knowledge of this plugin, for either Lightning package
# (``pytorch_lightning`` or ``lightning.pytorch``): used by tests/test_lightning_projects.py,
# tests/test_lightning_setups.py and tests/scripts/ddp_project.py.

USER_TARGETS = ("backbone.body.0.0", "backbone.body.1.0", "backbone.body.2.0")  # the stem stays (skip_first)
MIXING_GRID = (1.0, 0.5, 0.25)
"""A coarser structured grid (``budget.CHANNEL_RATIOS``) than the default: on it the user model's plan at
``target_macs=0.6`` mixes Ghost, structured and dense layers; on the default grid it is all structured and dense."""


def user_images(n: int = 32, size: int = 8, classes: int = 4, seed: int = 0) -> torch.utils.data.TensorDataset:
    """``n`` fixed random images with labels (a seeded generator: every run sees the same data)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return torch.utils.data.TensorDataset(images, labels)


def _user_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


_USER_PROJECTS: dict[str, Any] = {}


def user_project(namespace: str) -> Any:
    """``UserModel`` and ``UserDataModule`` subclassing ``namespace``'s own ``LightningModule`` and
    ``LightningDataModule`` (one pair of classes per package, built once)."""
    if namespace in _USER_PROJECTS:
        return _USER_PROJECTS[namespace]
    import importlib
    from types import SimpleNamespace

    from torchmetrics.classification import MulticlassAccuracy

    lp = importlib.import_module(namespace)

    class UserModel(lp.LightningModule):
        """Backbone in a ModuleDict, a Linear head, a torchmetrics accuracy, SGD with momentum and a per-step
        OneCycleLR sized by ``estimated_stepping_batches``. ``params="trainable"`` hands the optimizer only the
        parameters that require gradients (as Lightning's fine-tuning docs advise), ``"all"`` every parameter."""

        def __init__(
            self,
            num_classes: int = 4,
            width: int = 8,
            lr: float = 0.05,
            scheduler: str = "onecycle",
            params: str = "trainable",
            seed: int = 0,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(seed)
            self.backbone = nn.ModuleDict(
                {
                    "stem": _user_block(3, width),
                    "body": nn.Sequential(
                        _user_block(width, width), _user_block(width, 2 * width, 2), _user_block(2 * width, 2 * width)
                    ),
                }
            )
            self.head = nn.Linear(2 * width, num_classes)
            self.val_acc = MulticlassAccuracy(num_classes=num_classes)
            self.test_acc = MulticlassAccuracy(num_classes=num_classes)
            self.lr, self.scheduler, self.params = lr, scheduler, params

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.backbone["body"](self.backbone["stem"](x))
            return self.head(x.mean((2, 3)))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            self.val_acc(logits, y)
            self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
            self.log("val_acc", self.val_acc)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.test_acc(self(x), y)
            self.log("test_acc", self.test_acc)

        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
            return self(batch[0])

        def configure_optimizers(self) -> Any:
            params = [p for p in self.parameters() if p.requires_grad or self.params == "all"]
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-4)
            if self.scheduler != "onecycle":
                return opt
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class UserDataModule(lp.LightningDataModule):
        """``n`` training images and 16 validation/test images of ``size`` x ``size``, in a fixed order."""

        def __init__(self, batch_size: int = 8, n: int = 32, size: int = 8) -> None:
            super().__init__()
            self.batch_size, self.n, self.size = batch_size, n, size

        def setup(self, stage: str) -> None:
            self.train_set = user_images(self.n, self.size, seed=0)
            self.val_set = user_images(16, self.size, seed=1)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

        def val_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size)

        def test_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size)

        def predict_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size)

    project = SimpleNamespace(lp=lp, Model=UserModel, DataModule=UserDataModule)
    _USER_PROJECTS[namespace] = project
    return project


def user_trainer(lp: Any, **kwargs: Any) -> Any:
    """``lp.Trainer`` (``lp``: the ``pytorch_lightning`` or ``lightning.pytorch`` module) on one CPU, quiet, no
    logger, checkpoints or sanity check, 3 epochs; ``kwargs`` override or add Trainer arguments."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return lp.Trainer(**{**options, **kwargs})
