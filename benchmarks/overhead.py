"""Training overhead of each callback (step time, throughput) and conversion time for torchvision ResNet-50.

Run ``python -m benchmarks.overhead`` (``--quick`` for fewer steps). ImageClassifier + CIFAR
ResNet-56, batch 128 of random 3x32x32 images, CPU with 2 threads. Configurations run in
interleaved rounds (each round runs every configuration once, in a fresh Trainer, same seed) so
that a noisy machine slows them alike; a step's time is measured from ``on_train_batch_start``
to ``on_train_batch_end`` (forward, backward, callbacks' hooks, optimizer step) and the first
steps of each run are dropped as warm-up. Ratios are to the run without a callback.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_cheapconv import (
    GhostConvCallback,
    ImageClassifier,
    StructuredConvCallback,
    convert_to_ghost,
    decompose_structured,
)
from lightning_cheapconv.convert import ConversionResult

from .common import Section, command

TARGET = 1.05


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


CONFIGS: dict[str, Callable[[], Callback | None]] = {
    "no callback": lambda: None,
    "StructuredConvCallback, regularizing": lambda: StructuredConvCallback(project_start_epoch=99, verbose=0),
    "StructuredConvCallback, all layers projected": lambda: StructuredConvCallback(
        project_start_epoch=0, project_end_epoch=0, decompose_on_fit_end=False, verbose=0
    ),
    "GhostConvCallback, before its conversion epoch": lambda: GhostConvCallback(start_epoch=99, verbose=0),
    "GhostConvCallback, converted in setup": lambda: GhostConvCallback(verbose=0),
    "GhostConvCallback, converted, distill=True": lambda: GhostConvCallback(verbose=0, distill=True),
    "GhostConvCallback, converted, distill=True, distill_logits=True": lambda: GhostConvCallback(
        verbose=0, distill=True, distill_logits=True
    ),
}
DISTILLATION = {
    "GhostConvCallback, converted, distill=True": "GhostConvCallback, converted in setup",
    "GhostConvCallback, converted, distill=True, distill_logits=True": "GhostConvCallback, converted in setup",
}
"""Distillation rows and the run each is compared with (the same converted network without distillation); these and
the converted run (a different network, not a callback's overhead) are outside the overhead target."""


def _run(make: Callable[[], Callback | None], loader: DataLoader, steps: int) -> list[float]:
    pl.seed_everything(0)
    timer = StepTimer()
    callback = make()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=100,
        max_steps=steps,
        callbacks=[timer] + ([callback] if callback else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(ImageClassifier("resnet56", num_classes=10, lr=0.05), train_dataloaders=loader)
    return timer.times


def _conversion_seconds(convert: Callable[[torch.nn.Module], ConversionResult], repeats: int) -> tuple[float, int]:
    """Median seconds of ``convert`` on a fresh torchvision ResNet-50, and how many layers it converted."""
    times = []
    for _ in range(repeats):
        model = torchvision.models.resnet50()
        start = time.perf_counter()
        result = convert(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(result.changes)


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per run; the first 2 are warm-up")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 4
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(128 * args.steps, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=128)
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, make in CONFIGS.items():
            samples[name] += _run(make, loader, args.steps)[2:]
    base = statistics.median(samples["no callback"])
    lines = [
        "| configuration | step time (ms, median) | throughput (images/s) | ratio to no callback |",
        "|---|---|---|---|",
    ]
    missed = []
    for name, times in samples.items():
        ratio = statistics.median(times) / base
        step = statistics.median(times)
        lines.append(f"| {name} | {1000 * step:.0f} | {128 / step:.0f} | {ratio:.3f}x |")
        outside = name in DISTILLATION or name in DISTILLATION.values()
        if name != "no callback" and not outside and ratio > TARGET:
            missed.append(f"training overhead of {name}: {ratio:.3f}x (target: at most {TARGET}x)")
    lines += [
        "",
        "| distillation (teacher: the dense network; features of every converted layer, and logits) "
        "| ratio to the same converted network without distillation |",
        "|---|---|",
    ]
    for name, baseline in DISTILLATION.items():
        ratio = statistics.median(samples[name]) / statistics.median(samples[baseline])
        lines.append(f"| {name} | {ratio:.3f}x |")
    ghost_s, ghost_layers = _conversion_seconds(convert_to_ghost, repeats=1 if args.quick else 3)
    structured_s, structured_layers = _conversion_seconds(decompose_structured, repeats=1 if args.quick else 3)
    if ghost_s > 5.0:
        missed.append(f"convert_to_ghost(resnet50) took {ghost_s:.2f} s (target: under 5 s)")
    body = (
        f"ImageClassifier + CIFAR ResNet-56, batch 128, {args.rounds} interleaved rounds of {args.steps} steps "
        f"(first 2 dropped). Target: at most {TARGET}x.\n\n" + "\n".join(lines) + "\n\n"
        "| conversion of torchvision ResNet-50 (CPU, weights inherited / projected) | seconds (median) |\n|---|---|\n"
        f"| `convert_to_ghost(model)` ({ghost_layers} layers, kernel-space least squares) | {ghost_s:.2f} |\n"
        f"| `decompose_structured(model)` ({structured_layers} layers, projection) | {structured_s:.2f} |\n"
    )
    title = "4. Training overhead and conversion time"
    section = Section("overhead", title, body, command(__spec__.name, argv), missed)
    section.save()
    return section


if __name__ == "__main__":
    main()
