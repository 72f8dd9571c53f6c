"""ImageClassifier: training on the digits, logged metrics, optimizer groups, schedules, checkpoints."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from nets import quiet_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn

import lightning_cheapconv.module as module_py
from lightning_cheapconv.data import DigitsDataModule
from lightning_cheapconv.module import ImageClassifier, lr_factor, split_decay_parameters


def tiny_backbone(num_classes: int = 10, bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=bias),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32, image_size=16)
    dm.setup()
    return dm


def make_trainer(tmp_path: Path, logger: object = None, **kwargs: object) -> pl.Trainer:
    options = {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, "log_every_n_steps": 1}
    return quiet_trainer(logger=logger if logger is not None else CSVLogger(tmp_path), **{**options, **kwargs})


def read_csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


class LRRecorder(pl.Callback):
    """The learning rate of the first parameter group before every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, idx: int) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


# ---------------------------------------------------------------------------------------------------- training, logs


def test_fit_logs_metrics_to_csv(tmp_path: Path, digits: DigitsDataModule) -> None:
    model = ImageClassifier(tiny_backbone(), num_classes=10, lr=0.05)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, logger)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, datamodule=digits)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for key in ("val/acc", "val/acc_top5", "val/loss", "train/acc", "train/acc_top5", "train/loss"):
        assert key in trainer.callback_metrics, key
    rows = read_csv_metrics(logger)
    columns = set(rows[0])
    assert {"val/acc", "val/acc_top5", "val/loss", "train/acc", "train/loss", "train/loss_step"} <= columns
    assert any(row["train/loss_step"] for row in rows)
    acc = float(trainer.callback_metrics["val/acc"])
    top5 = float(trainer.callback_metrics["val/acc_top5"])
    assert 0.0 <= acc <= top5 <= 1.0

    results = trainer.test(model, datamodule=digits, verbose=False)
    assert {"test/acc", "test/acc_top5", "test/loss"} <= set(results[0])


def test_validation_metrics_match_a_manual_computation(tmp_path: Path, digits: DigitsDataModule) -> None:
    model = ImageClassifier(tiny_backbone(), num_classes=10, label_smoothing=0.2)
    with torch.no_grad():
        model.backbone[5].weight.mul_(30)  # confident logits, so that label smoothing changes the loss visibly
    trainer = make_trainer(tmp_path, limit_val_batches=3)
    result = trainer.validate(model, datamodule=digits, verbose=False)[0]
    x, y = digits.val_set.tensors[0][:96], digits.val_set.tensors[1][:96]  # 3 batches of 32
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert result["val/loss"] == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-5)
    assert result["val/loss"] != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)  # smoothing is on
    assert result["val/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    assert result["val/acc_top5"] == pytest.approx(top5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_label_smoothing_in_the_training_loss() -> None:
    x, y = torch.randn(6, 3, 16, 16), torch.arange(6)
    losses = []
    for smoothing in (0.0, 0.3):
        model = ImageClassifier(tiny_backbone(), label_smoothing=smoothing)
        with torch.no_grad():
            model.backbone[5].weight.mul_(30)
        loss = model.training_step((x, y), 0)
        with torch.no_grad():
            logits = model(x)
        assert loss.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=smoothing).item(), rel=1e-5)
        losses.append(loss.item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-2)


def test_tensorboard_logger_gets_the_metrics(tmp_path: Path, digits: DigitsDataModule) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, logger)
    trainer.fit(ImageClassifier(tiny_backbone()), datamodule=digits)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/acc", "val/acc_top5", "val/loss", "train/acc", "train/loss", "train/loss_step"} <= tags


# ---------------------------------------------------------------------------------------------------- optimizer


def test_no_decay_group_holds_exactly_bn_and_bias(tmp_path: Path) -> None:
    backbone = tiny_backbone(bias=True)
    model = ImageClassifier(backbone, scheduler="none", weight_decay=1e-3)
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    decay, no_decay = optimizer.param_groups
    conv, bn, linear = backbone[0], backbone[1], backbone[5]
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(conv.bias), id(bn.weight), id(bn.bias), id(linear.bias)}
    assert {id(p) for p in decay["params"]} == {id(conv.weight), id(linear.weight)}
    assert decay["momentum"] == 0.9 and not decay["nesterov"]
    # frozen parameters are left out
    bn.weight.requires_grad_(False)
    assert id(bn.weight) not in {id(p) for p in split_decay_parameters(model)[1]}


def test_sgd_nesterov_and_adamw(tmp_path: Path, digits: DigitsDataModule) -> None:
    sgd = ImageClassifier(tiny_backbone(), scheduler="none", nesterov=True, momentum=0.8)
    assert sgd.configure_optimizers()["optimizer"].defaults["nesterov"]
    model = ImageClassifier(tiny_backbone(), optimizer="adamw", lr=1e-3, weight_decay=0.05, scheduler="cosine")
    trainer = make_trainer(tmp_path)
    trainer.fit(model, datamodule=digits)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert "val/acc" in trainer.callback_metrics


def test_bad_arguments() -> None:
    for kwargs in (
        {"optimizer": "rmsprop"},
        {"scheduler": "step"},
        {"scheduler_interval": "batch"},
        {"num_classes": 1},
        {"label_smoothing": 1.0},
        {"warmup_epochs": -1},
        {"warmup_epochs": 0.5, "scheduler_interval": "epoch"},
        {"milestones": (1.5,)},
    ):
        with pytest.raises(ValueError):
            ImageClassifier(tiny_backbone(), **kwargs)
    with pytest.raises(TypeError):
        ImageClassifier(42)


# ---------------------------------------------------------------------------------------------------- schedules


def test_lr_factor_formula() -> None:
    assert [lr_factor(t, total=10, warmup=4) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, total=10, warmup=4) == 1.0
    assert lr_factor(7, total=10, warmup=4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_factor(10, total=10, warmup=4, min_factor=0.1) == pytest.approx(0.1)
    steps = [lr_factor(t, total=10, kind="multistep", milestones=[5, 8], gamma=0.5) for t in range(10)]
    assert steps == [1.0] * 5 + [0.5] * 3 + [0.25] * 2
    assert lr_factor(0, total=10, warmup=2, kind="none") == 0.5 and lr_factor(5, total=10, kind="none") == 1.0


def test_cosine_with_warmup_per_step(tmp_path: Path, digits: DigitsDataModule) -> None:
    recorder = LRRecorder()
    model = ImageClassifier(tiny_backbone(), lr=0.2, warmup_epochs=1, scheduler="cosine")
    trainer = make_trainer(tmp_path, max_epochs=3, limit_train_batches=4, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, datamodule=digits)
    total, warmup = 12, 4
    expected = [0.2 * (t + 1) / warmup for t in range(warmup)]
    expected += [0.2 * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) for t in range(warmup, total)]
    assert recorder.lrs == pytest.approx(expected)
    assert trainer.optimizers[0].param_groups[1]["lr"] == pytest.approx(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_per_epoch(tmp_path: Path, digits: DigitsDataModule) -> None:
    recorder = LRRecorder()
    model = ImageClassifier(tiny_backbone(), lr=0.1, warmup_epochs=1, scheduler_interval="epoch", min_lr=0.01)
    trainer = make_trainer(tmp_path, max_epochs=4, limit_train_batches=2, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, datamodule=digits)
    per_epoch = [0.1] + [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 3)) for e in range(1, 4)]
    assert recorder.lrs == pytest.approx([lr for lr in per_epoch for _ in range(2)])


def test_multistep(tmp_path: Path, digits: DigitsDataModule) -> None:
    recorder = LRRecorder()
    model = ImageClassifier(tiny_backbone(), lr=0.1, scheduler="multistep", milestones=(0.5, 0.75), gamma=0.1)
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, datamodule=digits)
    assert recorder.lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)

    recorder = LRRecorder()  # int milestones are epochs, here with a per-epoch schedule
    model = ImageClassifier(
        tiny_backbone(), lr=0.1, scheduler="multistep", milestones=(1, 2), scheduler_interval="epoch"
    )
    trainer = make_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, datamodule=digits)
    assert recorder.lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_no_scheduler(tmp_path: Path, digits: DigitsDataModule) -> None:
    assert "lr_scheduler" not in ImageClassifier(tiny_backbone(), scheduler="none").configure_optimizers()
    recorder = LRRecorder()  # warm-up alone still gets a scheduler
    model = ImageClassifier(tiny_backbone(), lr=0.1, scheduler="none", warmup_epochs=0.5)
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, datamodule=digits)
    assert recorder.lrs == pytest.approx([0.05, 0.1] + [0.1] * 6)


# ---------------------------------------------------------------------------------------------------- formats, hooks


def test_channels_last(tmp_path: Path, digits: DigitsDataModule) -> None:
    backbone = tiny_backbone()
    seen = []
    backbone.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    model = ImageClassifier(backbone, channels_last=True)
    assert backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    trainer = make_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=digits)
    assert seen and all(seen)
    assert backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert "val/acc" in trainer.callback_metrics


def test_predict_step(digits: DigitsDataModule) -> None:
    model = ImageClassifier(tiny_backbone()).eval()
    x, y = digits.val_set.tensors[0][:4], digits.val_set.tensors[1][:4]
    with torch.no_grad():
        assert torch.equal(model.predict_step((x, y), 0), model.predict_step(x, 0))
    assert model.predict_step(x, 0).shape == (4, 10)


def test_restructure_hook_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def record(module: nn.Module) -> object:
        calls.append(module)
        return module.register_load_state_dict_pre_hook(lambda *args, **kwargs: None)

    monkeypatch.setattr(module_py, "install_restructure_hook", record)
    model = ImageClassifier(tiny_backbone())
    assert calls == [model]


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_load_from_checkpoint_with_a_string_backbone(tmp_path: Path, digits: DigitsDataModule) -> None:
    model = ImageClassifier("resnet20", num_classes=10, lr=0.05, milestones=(0.3, 0.6), scheduler="multistep")
    assert model.hparams.backbone == "resnet20"
    assert model.backbone.layer1[0].conv1 is dict(model.named_modules())["backbone.layer1.0.conv1"]
    small = DigitsDataModule(batch_size=8, image_size=8)  # ResNet-20 is slow on CPU: small batches, small images
    trainer = make_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=small)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams == model.hparams
    assert loaded.scheduler_name == "multistep" and loaded.milestones == (0.3, 0.6)
    model.eval()
    loaded.eval()
    x = small.val_set.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_from_checkpoint_with_a_module_backbone(tmp_path: Path, digits: DigitsDataModule) -> None:
    model = ImageClassifier(tiny_backbone(), lr=0.05, label_smoothing=0.1)
    assert "backbone" not in model.hparams and model.hparams.label_smoothing == 0.1
    trainer = make_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=digits)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = ImageClassifier.load_from_checkpoint(path, backbone=tiny_backbone())
    assert loaded.label_smoothing == 0.1
    model.eval()
    loaded.eval()
    x = digits.val_set.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_resume_continues_the_schedule(tmp_path: Path, digits: DigitsDataModule) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    def run(max_epochs: int, ckpt_path: Path | None = None) -> list[float]:
        recorder = LRRecorder()
        model = ImageClassifier(tiny_backbone(), lr=0.1, warmup_epochs=1, milestones=(1,))
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
        trainer = make_trainer(
            tmp_path,
            max_epochs=max_epochs,
            limit_train_batches=2,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[recorder, checkpoint],
        )
        trainer.fit(model, datamodule=digits, ckpt_path=ckpt_path)
        return recorder.lrs

    full = run(3)
    resumed = run(3, tmp_path / "ckpt" / "epoch=1.ckpt")
    assert len(resumed) == 2 and resumed == pytest.approx(full[4:])


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_converted_checkpoint_loads_into_a_fresh_model(tmp_path: Path, method: str) -> None:
    from lightning_cheapconv.convert import convert_to_ghost, decompose_structured

    model = ImageClassifier("resnet20", num_classes=10, scheduler="none")
    if method == "ghost":
        convert_to_ghost(model.backbone, init="random")
    else:
        decompose_structured(model.backbone, channel_ratio=0.5)
    small = DigitsDataModule(batch_size=8, image_size=8)
    trainer = make_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=small)
    path = tmp_path / "converted.ckpt"
    trainer.save_checkpoint(path)

    loaded = ImageClassifier.load_from_checkpoint(path)  # a plain ResNet-20 first, rebuilt by the pre-hook
    assert type(loaded.backbone.layer1[0].conv1) is type(model.backbone.layer1[0].conv1)
    assert type(loaded.backbone.layer1[0].conv1) is not nn.Conv2d
    model.eval()
    loaded.eval()
    x = small.val_set.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
