"""Command-line plumbing shared by the example scripts: arguments, data, model, Trainer, summary."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lightning_cheapconv import (
    CIFAR10DataModule,
    DigitsDataModule,
    GhostConvCallback,
    ImageClassifier,
    ImageNetDataModule,
    StructuredConvCallback,
)

# The callbacks, ImageClassifier and the data modules work with either Lightning package; --lightning picks the
# one that runs the Trainer (the `lightning` package is `pip install lightning`).
LIGHTNING_PACKAGES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}


def lightning_package(args: argparse.Namespace) -> ModuleType:
    return importlib.import_module(LIGHTNING_PACKAGES[args.lightning])


def _fraction_or_count(text: str) -> float | int:
    value = float(text)
    return value if value <= 1.0 else int(value)


def trainer_arguments(parser: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--batch-size", type=int, default=batch_size, help="per device")
    group.add_argument("--lr", type=float, default=lr)
    group.add_argument("--weight-decay", type=float, default=5e-4)
    group.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    group.add_argument("--warmup-epochs", type=int, default=0)
    group.add_argument("--label-smoothing", type=float, default=0.0)
    group.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    group.add_argument("--devices", type=int, default=1, help="> 1 trains with DDP")
    group.add_argument("--num-nodes", type=int, default=1)
    group.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    group.add_argument("--sync-batchnorm", action="store_true")
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--num-workers", type=int, default=0)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--fast-dev-run", action="store_true", help="one batch of each loop, to check the setup")
    group.add_argument("--limit-batches", type=_fraction_or_count, default=1.0, help="fraction or count of batches")
    group.add_argument("--ckpt", type=Path, default=None, help="fine-tune from this ImageClassifier checkpoint")
    group.add_argument("--output", type=Path, default=Path("runs/example"), help="logs, checkpoints, converted model")
    group.add_argument(
        "--lightning", choices=tuple(LIGHTNING_PACKAGES), default="pytorch_lightning", help="package of the Trainer"
    )


def ghost_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GhostConvCallback")
    group.add_argument("--ratio", type=int, default=2, help="s: 1/s of the maps come from the primary conv")
    group.add_argument("--dw-size", type=int, default=3, help="d: kernel of the cheap depthwise conv")
    group.add_argument("--init", choices=("inherit", "random"), default="inherit")
    group.add_argument("--calibration-batches", type=int, default=0)
    group.add_argument("--start-epoch", type=int, default=0)
    group.add_argument("--end-epoch", type=int, default=None)
    group.add_argument("--stages", type=int, default=1)


def structured_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("StructuredConvCallback")
    group.add_argument("--channel-ratio", type=float, default=1.0, help="c/C; 1.0 = spatial structure only")
    group.add_argument("--kernel-reduction", type=int, default=1, help="n = k - reduction")
    group.add_argument("--reg-weight", type=float, default=0.1)
    group.add_argument("--reg-warmup", type=int, default=0, help="epochs of linear warm-up of the regularizer")
    group.add_argument("--project-start-epoch", type=int, default=None, help="default: half of --epochs")
    group.add_argument("--project-end-epoch", type=int, default=None, help="default: three quarters of --epochs")


def cifar_parser(description: str, method: str) -> argparse.ArgumentParser:
    """Arguments of the CIFAR examples: data set, architecture, training, and the method's callback."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("cifar10", "digits"), default="digits")
    parser.add_argument("--data-dir", default="data", help="where cifar-10-batches-py is (or goes, with --download)")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--arch", default="resnet20", help="resnet20..resnet110, vgg16, or a torchvision name")
    trainer_arguments(parser, epochs=8, batch_size=64, lr=0.05)
    (ghost_arguments if method == "ghost" else structured_arguments)(parser)
    return parser


def make_callback(method: str, args: argparse.Namespace) -> GhostConvCallback | StructuredConvCallback:
    if method == "ghost":
        return GhostConvCallback(
            ratio=args.ratio,
            dw_size=args.dw_size,
            init=args.init,
            calibration_batches=args.calibration_batches,
            start_epoch=args.start_epoch,
            end_epoch=args.end_epoch,
            stages=args.stages,
        )
    return StructuredConvCallback(
        channel_ratio=args.channel_ratio,
        kernel_reduction=args.kernel_reduction,
        reg_weight=args.reg_weight,
        reg_schedule=args.reg_warmup,
        project_start_epoch=args.project_start_epoch,
        project_end_epoch=args.project_end_epoch,
        export_path=args.output / "decomposed.pt",
    )


def make_cifar_datamodule(args: argparse.Namespace) -> DigitsDataModule | CIFAR10DataModule:
    if args.dataset == "digits":
        return DigitsDataModule(batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed)
    return CIFAR10DataModule(
        data_dir=args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers, download=args.download
    )


def make_imagenet_datamodule(args: argparse.Namespace) -> ImageNetDataModule:
    return ImageNetDataModule(data_dir=args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers)


def make_model(args: argparse.Namespace, num_classes: int) -> ImageClassifier:
    if args.ckpt is not None:
        # Any stage's checkpoint loads: the model rebuilds the checkpoint's structure first.
        return ImageClassifier.load_from_checkpoint(args.ckpt, map_location="cpu")
    return ImageClassifier(
        backbone=args.arch,
        num_classes=num_classes,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        channels_last=args.channels_last,
    )


def make_trainer(args: argparse.Namespace, callback: Any, monitor: str = "val/acc") -> Any:
    """A Trainer of the package ``--lightning`` names, keeping the checkpoint with the highest ``monitor``."""
    pl = lightning_package(args)
    distributed = args.devices > 1 or args.num_nodes > 1
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=args.output / "checkpoints", monitor=monitor, mode="max", save_last=True, filename="{epoch}"
    )
    return pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp" if distributed else "auto",
        precision=args.precision,
        sync_batchnorm=args.sync_batchnorm,
        max_epochs=args.epochs,
        fast_dev_run=args.fast_dev_run,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        callbacks=[callback, checkpoint, pl.callbacks.LearningRateMonitor()],
        logger=pl.loggers.CSVLogger(args.output, name="logs"),
        deterministic=False,
        log_every_n_steps=10,
    )


def run(method: str, args: argparse.Namespace, datamodule: Any, num_classes: int) -> dict:
    """Train with the method's callback, test, print a summary, save the converted model; returns the summary."""
    pl = lightning_package(args)
    pl.seed_everything(args.seed, workers=True)
    model = make_model(args, num_classes)
    callback = make_callback(method, args)
    trainer = make_trainer(args, callback)
    trainer.fit(model, datamodule=datamodule)
    compression = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compression/")}
    # Test the final (converted) model as it is; `ckpt_path=None` keeps the in-memory weights.
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0] if not args.fast_dev_run else {}
    summary = {
        "method": method,
        "arch": args.arch,
        "test_acc": results.get("test/acc"),
        "test_acc_top5": results.get("test/acc_top5"),
        **compression,
    }
    if trainer.is_global_zero:
        args.output.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.output / "converted.pt")
        (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    acc = summary["test_acc"]
    pl.utilities.rank_zero.rank_zero_info(
        f"\n{method} {args.arch}: test accuracy "
        + (f"{100 * acc:.2f}%" if acc is not None else "n/a (fast dev run)")
        + (
            f", params {compression['compression/params']:,.0f} ({compression['compression/params_ratio']:.2f}x fewer),"
            f" MACs/image {compression['compression/macs']:,.0f} ({compression['compression/macs_ratio']:.2f}x fewer)"
            if "compression/params" in compression
            else ""
        )
        + f"\nconverted model: {args.output / 'converted.pt'} (load with ImageClassifier + restructure)"
    )
    return summary
