"""Accuracy retention on the real digits data: baseline vs Ghost (inherit / random) vs structured (c=C, c=C/2).

Run ``python -m benchmarks.accuracy`` (``--quick``: one seed, few epochs, a smoke run).

Protocol, per seed and per training-set size (the full 1,347 training images, and the first 300,
where the baseline does not saturate): a dense CIFAR ResNet-20 trains for E epochs (SGD, cosine) on the
digits upsampled to ``--image-size`` (default 16x16, a quarter of the 32x32 cost; the ratios are the same)
and is checkpointed at E/2. Every method resumes that same checkpoint with its callback added
and trains to E, so all share the epoch budget and the first half:

- Ghost: ``GhostConvCallback(start_epoch=E/2, init=...)`` converts at the start of epoch E/2;
- structured: ``StructuredConvCallback`` regularizes from E/2, projects in stages from E/2 + 1 to
  3E/4, fine-tunes the projected network, and decomposes at fit end.

"Right after conversion" converts the E/2 checkpoint directly (``convert_to_ghost`` /
``decompose_structured``: the structured row is a plain projection, no regularization) with a
calibration batch of 4 x 64 training images (Ghost inherit: activation-space fit; every method:
BatchNorm statistics re-estimated on it) and evaluates it before any fine-tuning. The Ghost
callbacks use the same ``calibration_batches=4``. Accuracy is top-1 on the 450 held-out images (mean ± std
over seeds); ratios are original / compressed from the callbacks' logged figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lightning_cheapconv import (
    DigitsDataModule,
    GhostConvCallback,
    ImageClassifier,
    StructuredConvCallback,
    convert_to_ghost,
    decompose_structured,
)

from .common import RESULTS, Section, command, machine, measured_on

METHODS = ("baseline", "ghost inherit", "ghost random", "structured c=C", "structured c=C/2")


def _trainer(epochs: int, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _accuracy(model: ImageClassifier, data: DigitsDataModule) -> float:
    return float(_trainer(1, []).validate(model, datamodule=data, verbose=False)[0]["val/acc"])


BATCH_SIZE = 64
CALIBRATION_BATCHES = 4


def _last_stage(epochs: int) -> int:
    """The epoch of the structured callback's last projection stage (3/4 of the budget, after its first one)."""
    return max(epochs // 2 + 1, (3 * epochs) // 4)


def _callback(method: str, half: int, epochs: int) -> Callback:
    if method.startswith("ghost"):
        init = method.split()[1]
        return GhostConvCallback(start_epoch=half, init=init, calibration_batches=CALIBRATION_BATCHES, verbose=0)
    ratio = 1.0 if method.endswith("c=C") else 0.5
    return StructuredConvCallback(
        channel_ratio=ratio,
        project_start_epoch=half + 1,
        project_end_epoch=_last_stage(epochs),
        verbose=0,
    )


def _convert_now(method: str, model: ImageClassifier, calibration: torch.Tensor) -> None:
    if method.startswith("ghost"):
        convert_to_ghost(model, init=method.split()[1], calibration=calibration)
    else:
        decompose_structured(model, channel_ratio=1.0 if method.endswith("c=C") else 0.5, calibration=calibration)


def run_one(seed: int, subset: int | None, epochs: int, workdir: Path, image_size: int) -> dict[str, dict[str, float]]:
    """All methods for one seed and training-set size; returns method -> figures."""
    data = DigitsDataModule(batch_size=BATCH_SIZE, train_subset=subset, seed=0, image_size=image_size)
    half = epochs // 2
    pl.seed_everything(seed, workers=True)
    baseline = ImageClassifier("resnet20", num_classes=10, lr=0.05, weight_decay=5e-4)
    checkpoints = ModelCheckpoint(dirpath=workdir, filename="{epoch}", save_top_k=-1)
    _trainer(epochs, [checkpoints]).fit(baseline, datamodule=data)
    middle = workdir / f"epoch={half - 1}.ckpt"
    results = {"baseline": {"final": _accuracy(baseline, data), "params_ratio": 1.0, "macs_ratio": 1.0}}
    loader = data.train_dataloader()
    calibration = torch.cat([images for images, _ in itertools.islice(loader, CALIBRATION_BATCHES)])
    for method in METHODS[1:]:
        converted = ImageClassifier.load_from_checkpoint(middle)
        _convert_now(method, converted, calibration)
        right_after = _accuracy(converted, data)
        pl.seed_everything(seed, workers=True)
        model = ImageClassifier.load_from_checkpoint(middle)
        trainer = _trainer(epochs, [_callback(method, half, epochs)])
        trainer.fit(model, datamodule=data, ckpt_path=middle)
        metrics = trainer.callback_metrics
        results[method] = {
            "right_after": right_after,
            "final": _accuracy(model, data),
            "params_ratio": float(metrics["compression/params_ratio"]),
            "macs_ratio": float(metrics["compression/macs_ratio"]),
        }
    return results


def _findings(summary: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """What the tables say, with every figure taken from ``summary`` (the full set first, then the reduced one)."""
    (full_name, full), (small_name, small) = summary.items()

    def final(runs: dict, method: str) -> float:
        return 100 * statistics.fmean(r["final"] for r in runs[method])

    def after(method: str) -> str:
        return f"{100 * statistics.fmean(r['right_after'] for r in full[method]):.1f}%"

    def delta(runs: dict, method: str) -> str:
        return f"{final(runs, method) - final(runs, 'baseline'):+.2f} points"

    def ratio(method: str) -> str:
        return f"{statistics.fmean(r['params_ratio'] for r in full[method]):.2f}x"

    counts = re.match(r"([\d,]+) training images, (\d+) epochs", small_name)
    images, epochs = (int(v.replace(",", "")) for v in counts.groups())
    steps = math.ceil(images / BATCH_SIZE)
    last_stage = _last_stage(epochs)
    lines = [
        "What the tables say:",
        f"- Full training set ({full_name}): against the baseline, Ghost (s=2, inherited) ends "
        f"{delta(full, 'ghost inherit')} and structured at c=C {delta(full, 'structured c=C')}, with "
        f"{ratio('ghost inherit')} and {ratio('structured c=C')} fewer parameters; c=C/2 "
        f"({ratio('structured c=C/2')}) ends {delta(full, 'structured c=C/2')}.",
        "- Right after conversion, inherited Ghost weights (activation-space fit + BatchNorm re-estimation on "
        f"{CALIBRATION_BATCHES * BATCH_SIZE} training images) keep {after('ghost inherit')} accuracy where random "
        f"init keeps {after('ghost random')} (chance: 10%); after fine-tuning on the small set, "
        f"{final(small, 'ghost inherit'):.1f}% against {final(small, 'ghost random'):.1f}%. A plain projection at c=C "
        f"keeps {after('structured c=C')}: the structured subspace at n=2 lies close to trained 3x3 kernels.",
        f"- {images} training images ({steps} steps per epoch): the last projection stage starts epoch "
        f"{last_stage} (counting from 0) of {epochs}, which leaves the structured runs {(epochs - last_stage) * steps} "
        f"optimizer steps of fine-tuning; c=C/2 ends at {final(small, 'structured c=C/2'):.1f}% "
        f"({delta(small, 'structured c=C/2')}): a projection that removes most of a kernel's energy needs "
        "fine-tuning steps, not epochs. Schedule projection earlier (``project_start_epoch``) when steps per epoch "
        "are few.",
    ]
    return "\n" + "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.6), squeeze=False)
    for ax, (data_name, rows) in zip(axes[0], summary.items(), strict=True):
        for method, runs in rows.items():
            ratio = statistics.fmean(r["macs_ratio"] for r in runs)
            accs = [100 * r["final"] for r in runs]
            ax.errorbar(ratio, statistics.fmean(accs), yerr=statistics.stdev(accs) if len(accs) > 1 else 0,
                        fmt="o", capsize=3, label=method)  # fmt: skip
        ax.set_title(f"digits, {data_name}")
        ax.set_xlabel("MACs ratio (original / compressed)")
        ax.set_ylabel("top-1 accuracy after fine-tuning (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="epoch budget on the full training set")
    parser.add_argument("--reduced-epochs", type=int, default=12, help="epoch budget on the 300-image set")
    parser.add_argument("--image-size", type=int, default=16, help="digits are 8x8; 32 matches CIFAR inputs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (accuracy does not depend on it)")
    parser.add_argument("--quick", action="store_true", help="one seed, 4 epochs: a smoke run")
    parser.add_argument("--from-json", action="store_true", help="only re-render results/accuracy.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.reduced_epochs = 1, 4, 4
    torch.set_num_threads(args.threads)
    if args.from_json:
        summary = json.loads((RESULTS / "accuracy.json").read_text())
        measured = measured_on("accuracy")
    else:
        summary = {}
        for data_name, subset, epochs in (
            ("1,347 training images", None, args.epochs),
            ("300 training images", 300, args.reduced_epochs),
        ):
            per_method: dict[str, list[dict]] = {m: [] for m in METHODS}
            for seed in range(args.seeds):
                with tempfile.TemporaryDirectory() as workdir:
                    for method, figures in run_one(seed, subset, epochs, Path(workdir), args.image_size).items():
                        per_method[method].append(figures)
            summary[f"{data_name}, {epochs} epochs, {args.image_size}x{args.image_size}"] = per_method
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "accuracy.json").write_text(json.dumps(summary, indent=1))
        measured = machine()
    _plot(summary, RESULTS / "accuracy.png")

    lines, missed = [], []
    for data_name, per_method in summary.items():
        lines += [
            f"**{data_name}** ({len(per_method['baseline'])} seeds)\n",
            "| method | right after conversion (%) | after fine-tuning (%) | Δ vs baseline (points) | params ratio | MACs ratio |",  # noqa: E501
            "|---|---|---|---|---|---|",
        ]
        base = statistics.fmean(r["final"] for r in per_method["baseline"])
        for method, runs in per_method.items():
            final = statistics.fmean(r["final"] for r in runs)
            after = _mean_std([r["right_after"] for r in runs]) if "right_after" in runs[0] else "-"
            delta = 100 * (final - base)
            lines.append(
                f"| {method} | {after} | {_mean_std([r['final'] for r in runs])} | {delta:+.2f} | "
                f"{statistics.fmean(r['params_ratio'] for r in runs):.2f}x | {statistics.fmean(r['macs_ratio'] for r in runs):.2f}x |"  # noqa: E501
            )
            # The issues' targets are stated for the full training set; the reduced set is there to show losses.
            if method in ("ghost inherit", "structured c=C") and delta < -1.0 and data_name.startswith("1,347"):
                missed.append(f"{method} on {data_name}: {delta:+.2f} points vs baseline (target: within 1.0)")
        if "ghost inherit" in per_method:
            inherit = statistics.fmean(r["right_after"] for r in per_method["ghost inherit"])
            random = statistics.fmean(r["right_after"] for r in per_method["ghost random"])
            if inherit <= random + 0.10:
                missed.append(
                    f"ghost inherit right after conversion on {data_name}: {100 * inherit:.1f}% vs random "
                    f"{100 * random:.1f}% (target: much better)"
                )
        lines.append("")
    body = "\n".join(lines) + _findings(summary) + "\n![accuracy vs MACs ratio](benchmarks/results/accuracy.png)\n"
    title = "3. Accuracy retention on the digits data"
    rerun = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--from-json"]
    section = Section("accuracy", title, body, command(__spec__.name, rerun), missed, measured)
    section.save()
    return section


if __name__ == "__main__":
    main()
