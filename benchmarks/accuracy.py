"""Accuracy retention on the real digits data: baseline vs Ghost (inherit / random) vs structured (c=C, c=C/2).

Run ``python -m benchmarks.accuracy`` (``--quick``: one seed, few epochs, a smoke run).

Protocol, per seed and per training-set size (the full 1,347 training images, and the first 300,
where the baseline does not saturate): a dense CIFAR ResNet-20 trains for E epochs (SGD, cosine)
and is checkpointed at E/2. Every method resumes that same checkpoint with its callback added
and trains to E, so all share the epoch budget and the first half:

- Ghost: ``GhostConvCallback(start_epoch=E/2, init=...)`` converts at the start of epoch E/2;
- structured: ``StructuredConvCallback`` regularizes from E/2, projects in stages from E/2 + 1 to
  3E/4, fine-tunes the projected network, and decomposes at fit end.

"Right after conversion" converts the E/2 checkpoint directly (``convert_to_ghost`` /
``decompose_structured``: the structured row is a plain projection, no regularization) and
evaluates it before any fine-tuning. Accuracy is top-1 on the 450 held-out images (mean ± std
over seeds); ratios are original / compressed from the callbacks' logged figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
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

from .common import RESULTS, Section, command

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


def _callback(method: str, half: int, epochs: int) -> Callback:
    if method.startswith("ghost"):
        return GhostConvCallback(start_epoch=half, init=method.split()[1], verbose=0)
    ratio = 1.0 if method.endswith("c=C") else 0.5
    return StructuredConvCallback(
        channel_ratio=ratio,
        project_start_epoch=half + 1,
        project_end_epoch=max(half + 1, (3 * epochs) // 4),
        verbose=0,
    )


def _convert_now(method: str, model: ImageClassifier) -> None:
    if method.startswith("ghost"):
        convert_to_ghost(model, init=method.split()[1])
    else:
        decompose_structured(model, channel_ratio=1.0 if method.endswith("c=C") else 0.5)


def run_one(seed: int, subset: int | None, epochs: int, workdir: Path) -> dict[str, dict[str, float]]:
    """All methods for one seed and training-set size; returns method -> figures."""
    data = DigitsDataModule(batch_size=64, train_subset=subset, seed=0)
    half = epochs // 2
    pl.seed_everything(seed, workers=True)
    baseline = ImageClassifier("resnet20", num_classes=10, lr=0.05, weight_decay=5e-4)
    checkpoints = ModelCheckpoint(dirpath=workdir, filename="{epoch}", save_top_k=-1)
    _trainer(epochs, [checkpoints]).fit(baseline, datamodule=data)
    middle = workdir / f"epoch={half - 1}.ckpt"
    results = {"baseline": {"final": _accuracy(baseline, data), "params_ratio": 1.0, "macs_ratio": 1.0}}
    for method in METHODS[1:]:
        converted = ImageClassifier.load_from_checkpoint(middle)
        _convert_now(method, converted)
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
    parser.add_argument("--epochs", type=int, default=8, help="epoch budget on the full training set")
    parser.add_argument("--reduced-epochs", type=int, default=20, help="epoch budget on the 300-image set")
    parser.add_argument("--quick", action="store_true", help="one seed, 4 epochs: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.reduced_epochs = 1, 4, 4
    torch.set_num_threads(2)
    summary: dict[str, dict[str, list[dict]]] = {}
    for data_name, subset, epochs in (
        ("1,347 training images", None, args.epochs),
        ("300 training images", 300, args.reduced_epochs),
    ):  # noqa: E501
        per_method: dict[str, list[dict]] = {m: [] for m in METHODS}
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as workdir:
                for method, figures in run_one(seed, subset, epochs, Path(workdir)).items():
                    per_method[method].append(figures)
        summary[f"{data_name}, {epochs} epochs"] = per_method
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, RESULTS / "accuracy.png")

    lines, missed = [], []
    for data_name, per_method in summary.items():
        lines += [
            f"**{data_name}** ({args.seeds} seeds)\n",
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
            if method in ("ghost inherit", "structured c=C") and delta < -1.0:
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
    body = "\n".join(lines) + "\n![accuracy vs MACs ratio](benchmarks/results/accuracy.png)\n"
    title = "3. Accuracy retention on the digits data"
    section = Section("accuracy", title, body, command(__spec__.name, argv), missed)
    section.save()
    return section


if __name__ == "__main__":
    main()
