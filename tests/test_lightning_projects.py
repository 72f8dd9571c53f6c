"""Works in every Lightning project: a user's own project, under ``pytorch_lightning`` and under ``lightning.pytorch``.

Every test runs once per Lightning package (the ``pl_ns`` fixture: the imported ``pytorch_lightning`` or
``lightning.pytorch`` module), with a LightningModule written without knowledge of this plugin
(tests/nets.py ``user_project``: it subclasses that package's own ``LightningModule``, keeps its backbone in an
``nn.ModuleDict``, logs a torchmetrics accuracy and steps a OneCycleLR per batch). The plugin's callbacks are the
only new line: a mid-fit Ghost stage and a structured run, resume from every epoch checkpoint, DDP on two CPU
processes (tests/scripts/ddp_project.py), LightningCLI, and ``ImageClassifier`` under the package's Trainer.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from nets import USER_TARGETS, run_script, user_images, user_trainer
from torch import nn
from torch.utils.data import DataLoader

import lightning_cheapconv
from lightning_cheapconv import (
    GhostConv2d,
    GhostConvCallback,
    ImageClassifier,
    StructuredConv2d,
    StructuredConvCallback,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_types(model: nn.Module) -> dict[str, str]:
    return {name: type(model.get_submodule(name)).__name__ for name in USER_TARGETS}


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=f"{what}: {key}")


# ---------------------------------------------------------------------------------------------- 1. plain fit
@pytest.mark.parametrize(
    ("make_callback", "cheap_type"),
    [
        (lambda: GhostConvCallback(start_epoch=1, verbose=0), GhostConv2d),
        (lambda: StructuredConvCallback(verbose=0), StructuredConv2d),
    ],
    ids=["ghost-mid-fit", "structured"],
)
def test_fit_converts_the_user_project(pl_ns: ModuleType, project: Any, make_callback: Any, cheap_type: type) -> None:
    """The user's module and data module, the package's Trainer, one callback added: the selected layers end in
    their cheap form, the stem and the head stay, and ``compression/macs_ratio`` is logged next to ``val_acc``."""
    pl_ns.seed_everything(0)
    model = project.Model()
    assert isinstance(model, pl_ns.LightningModule)
    callback = make_callback()
    trainer = user_trainer(pl_ns, callbacks=[callback])
    assert isinstance(trainer, pl_ns.Trainer)
    trainer.fit(model, datamodule=project.DataModule())
    assert trainer.state.finished and trainer.current_epoch == 3
    assert sorted(callback.targets) == sorted(USER_TARGETS)
    assert layer_types(model) == dict.fromkeys(USER_TARGETS, cheap_type.__name__)
    assert type(model.backbone["stem"][0]) is nn.Conv2d and type(model.head) is nn.Linear
    metrics = trainer.callback_metrics
    assert "val_acc" in metrics
    assert "compression/macs_ratio" in metrics
    assert float(metrics["compression/macs_ratio"]) > 1.0
    assert float(metrics["compression/params_ratio"]) > 1.0
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


# ---------------------------------------------------------------------------------------------- 2. resume
@pytest.mark.parametrize(
    ("make_callback", "cheap"),
    [
        (lambda: GhostConvCallback(start_epoch=1, verbose=0), "GhostConv2d"),
        (lambda: StructuredConvCallback(verbose=0), "StructuredConv2d"),
    ],
    ids=["ghost-mid-fit", "structured"],
)
@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*")
def test_resume_from_every_epoch_checkpoint_equals_uninterrupted(
    pl_ns: ModuleType, project: Any, tmp_path: Path, make_callback: Any, cheap: str
) -> None:
    """A run with a mid-fit stage (a Ghost stage at epoch 1 of 3; structured projection stages at epochs 1 and 2,
    decomposition at fit end) saves a checkpoint every epoch; a fresh model resumed from each of them with
    ``trainer.fit(model, ckpt_path=...)`` ends with the uninterrupted run's parameters and buffers (OneCycleLR per
    step, SGD momentum: optimizer and scheduler state must line up)."""

    def run(root: Path, ckpt_path: str | None = None) -> Any:
        pl_ns.seed_everything(0)
        model = project.Model()
        checkpoint = pl_ns.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = user_trainer(
            pl_ns,
            callbacks=[make_callback(), checkpoint],
            enable_checkpointing=True,
            deterministic=True,
        )
        trainer.fit(model, datamodule=project.DataModule(), ckpt_path=ckpt_path)
        assert trainer.current_epoch == 3
        return model

    uninterrupted = run(tmp_path / "a")
    expected = tensors(uninterrupted)
    assert layer_types(uninterrupted) == dict.fromkeys(USER_TARGETS, cheap)
    checkpoints = sorted((tmp_path / "a").glob("epoch=*.ckpt"))
    assert [c.name for c in checkpoints] == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    for ckpt in checkpoints:
        resumed = run(tmp_path / ckpt.stem, ckpt_path=str(ckpt))
        assert layer_types(resumed) == dict.fromkeys(USER_TARGETS, cheap), ckpt.name
        assert_same_tensors(tensors(resumed), expected, f"resumed from {ckpt.name}")


# ---------------------------------------------------------------------------------------------- 3. DDP
def test_ddp_two_processes(pl_ns: ModuleType, tmp_path: Path) -> None:
    """``strategy="ddp"`` on 2 CPU processes with the package's Trainer: a Ghost stage converted mid-fit and a
    structured run; both ranks convert the same layers and end with identical parameters."""
    proc = run_script("ddp_project.py", str(tmp_path), pl_ns.__name__, "ghost", "structured", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for mode, cheap in (("ghost", "GhostConv2d"), ("structured", "StructuredConv2d")):
        ranks = [json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]
        for rank in ranks:
            assert rank["world_size"] == 2, mode
            assert rank["types"] == dict.fromkeys(USER_TARGETS, cheap), mode
            assert rank["metrics"]["compression/macs_ratio"] > 1.0, mode
        assert ranks[0]["sums"] == ranks[1]["sums"], f"{mode}: parameters differ across ranks"
        assert ranks[0]["sha256"] == ranks[1]["sha256"], f"{mode}: parameters differ across ranks"


# ---------------------------------------------------------------------------------------------- 4. LightningCLI
@pytest.mark.parametrize(
    ("callback_args", "cheap_type"),
    [
        (
            [
                "--trainer.callbacks+=lightning_cheapconv.GhostConvCallback",
                "--trainer.callbacks.ratio=2",
                "--trainer.callbacks.start_epoch=1",
                "--trainer.callbacks.verbose=0",
            ],
            GhostConv2d,
        ),
        (
            [
                '--trainer.callbacks+={"class_path": "lightning_cheapconv.StructuredConvCallback", '
                '"init_args": {"channel_ratio": 0.5, "verbose": 0}}'
            ],
            StructuredConv2d,
        ),
    ],
    ids=["ghost-flat-form", "structured-dict-form"],
)
def test_lightning_cli_configures_the_callback(
    pl_ns: ModuleType,
    project: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    callback_args: list[str],
    cheap_type: type,
) -> None:
    """``pl_ns.cli.LightningCLI`` accepts the callback by import path with its typed arguments, and the run
    converts the user's model."""
    monkeypatch.setattr("sys.argv", ["train.py"])  # the CLI reads only ``args``
    cli_module = importlib.import_module(f"{pl_ns.__name__}.cli")
    args = [
        "fit",
        "--trainer.max_epochs=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.batch_size=8",
        *callback_args,
    ]
    pl_ns.seed_everything(0)
    cli = cli_module.LightningCLI(
        project.Model,
        project.DataModule,
        args=args,
        run=True,
        save_config_kwargs={"overwrite": True},
    )
    ours = [c for c in cli.trainer.callbacks if isinstance(c, (GhostConvCallback, StructuredConvCallback))]
    assert len(ours) == 1
    if cheap_type is GhostConv2d:
        assert ours[0].ratio == 2 and ours[0].start_epoch == 1
    else:
        assert ours[0].channel_ratio == 0.5
    assert cli.trainer.state.finished
    assert layer_types(cli.model) == dict.fromkeys(USER_TARGETS, cheap_type.__name__)
    assert float(cli.trainer.callback_metrics["compression/macs_ratio"]) > 1.0


# ---------------------------------------------------------------------------------------------- 5. ImageClassifier
@pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no `val_dataloader`.*")
def test_image_classifier_with_the_package_trainer(pl_ns: ModuleType, tmp_path: Path) -> None:
    """The package's own ``ImageClassifier`` under either package's Trainer: a Ghost stage at epoch 1, then
    ``trainer.test``; ``load_from_checkpoint`` of the epoch-1 checkpoint (after the stage) rebuilds the Ghost layers
    and loads that checkpoint's weights."""
    pl_ns.seed_everything(0)
    train = DataLoader(user_images(32, 8, classes=4, seed=0), batch_size=8)
    val = DataLoader(user_images(16, 8, classes=4, seed=1), batch_size=8)
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05)
    checkpoint = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    callback = GhostConvCallback(start_epoch=1, verbose=0)
    trainer = user_trainer(pl_ns, callbacks=[callback, checkpoint], enable_checkpointing=True)
    trainer.fit(model, train, val)
    targets = set(callback.targets)
    assert len(targets) == 18
    assert {n for n, m in model.named_modules() if isinstance(m, GhostConv2d)} == targets
    assert float(trainer.callback_metrics["compression/macs_ratio"]) > 1.5
    results = trainer.test(model, val, verbose=False)
    assert 0.0 <= results[0]["test/acc"] <= 1.0
    ckpt = tmp_path / "epoch=1.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    loaded = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert {n for n, m in loaded.named_modules() if isinstance(m, GhostConv2d)} == targets
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded.state_dict()[key], value), key
    loaded.eval()
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_the_package_exports_one_callback_class_for_both_packages(pl_ns: ModuleType) -> None:
    """The callbacks are callbacks of the package under test (its Trainer and its LightningCLI check by
    ``isinstance``), and ``ImageClassifier`` is its LightningModule."""
    assert issubclass(lightning_cheapconv.GhostConvCallback, pl_ns.Callback)
    assert issubclass(lightning_cheapconv.StructuredConvCallback, pl_ns.Callback)
    assert issubclass(lightning_cheapconv.ImageClassifier, pl_ns.LightningModule)
