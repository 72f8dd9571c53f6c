"""Which per-layer sensitivity predicts the accuracy of a budget plan: the output error (ours) or the rise in the loss.

Run ``python -m benchmarks.sensitivity`` (a few minutes on 1-2 CPU threads; ``--quick``: 4 random plans, 1 epoch
each, a smoke run; ``--from-json``: re-render ``results/sensitivity.json``).

Protocol (the one of :mod:`benchmarks.accuracy`, one seed): a dense CIFAR ResNet-20 (``ImageClassifier("resnet20",
num_classes=10, lr=0.05, weight_decay=5e-4)``) trains ``--epochs`` (3) epochs on the digits upsampled to 16x16
(SGD, cosine, batch 64, seed 0). The calibration batch is the first 4 training batches (256 images, with labels).
:func:`~lightning_cheapconv.budget.plan_budget` at ``macs=0.5`` gives the greedy plan and, for each of the 18 planned
convs, its candidates (dense, Ghost s=2/3/4, structured (c, n) on the grid). ``--plans`` (20) random plans draw one
candidate per layer uniformly, kept when their MACs land in ``[0.45, 0.5]`` of the dense model's (rejection
sampling, seed 0). Each plan is scored by

- **output error** (ours, :attr:`BudgetPlan.sensitivity`): the sum over layers of the chosen candidate's squared
  relative output error on the calibration batch (after inheritance or projection); scored in ``plan_budget``'s one
  forward pass of the calibration batch;
- **loss rise**: the sum over layers of the rise in the calibration batch's cross-entropy when that layer alone takes
  its chosen candidate (converted as :func:`~lightning_cheapconv.budget.apply_budget_plan` converts it, Ghost weights
  inherited on the layer's calibration inputs; BatchNorm statistics not re-estimated), computed once per layer and
  candidate: one forward pass each, and the labels (the per-layer evaluation of AIMET's greedy compression-ratio
  selection).

and converted (:func:`~lightning_cheapconv.budget.apply_budget_plan`, BatchNorm statistics re-estimated on the
calibration batch); its top-1 accuracy on the 450 held-out images is measured right after conversion and after
``--finetune-epochs`` (2) epochs of fine-tuning (a fresh trainer with the settings of :mod:`benchmarks.accuracy`,
seed 0 for every plan: the same data order). The plans also include the greedy allocation run on the loss rises
instead of the output errors ("greedy (loss rise)"). The Spearman rank correlation of each predictor with the accuracy
drop (dense minus converted) is reported with a bootstrap interval over plans, and each predictor's planning cost
(forward passes and seconds).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from lightning_cheapconv import DigitsDataModule, ImageClassifier
from lightning_cheapconv.budget import BudgetPlan, LayerBudget, _allocate, apply_budget_plan, plan_budget
from lightning_cheapconv.convert import capture_inputs

from .accuracy import BATCH_SIZE, CALIBRATION_BATCHES, _trainer
from .common import RESULTS, Section, command, machine, measured_on

NAME = "sensitivity"
TITLE = "6b. Which sensitivity predicts a budget plan's accuracy: output error or loss rise"
FRACTION = 0.5
BAND = (0.45, 0.5)
BOOTSTRAP = 2000
CLEAR = 0.2
"""A predictor is "clearly better" when its Spearman correlation exceeds the other's by this much right after
conversion and after fine-tuning, and the bootstrap interval of the difference excludes 0."""


def _classifier() -> ImageClassifier:
    return ImageClassifier("resnet20", num_classes=10, lr=0.05, weight_decay=5e-4)


def _accuracy(net: nn.Module, data: DigitsDataModule) -> float:
    """Top-1 accuracy of ``net`` on the held-out images (eval mode; what ``val/acc`` measures)."""
    correct = total = 0
    net.eval()
    with torch.no_grad():
        for images, labels in data.val_dataloader():
            correct += int((net(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def _loss(net: nn.Module, images: Tensor, labels: Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float(F.cross_entropy(net(images), labels))


def _with_choices(plan: BudgetPlan, chosen: list[int]) -> BudgetPlan:
    layers = [
        LayerBudget(layer.name, layer.type, layer.candidates, option, layer.aliases)
        for layer, option in zip(plan.layers, chosen, strict=True)
    ]
    return BudgetPlan(layers, dict(plan.budgets), dict(plan.before), dict(plan.fixed), list(plan.skipped))


class _Passes:
    """Counts the forward passes of a module (root calls) while active, and the images they carried: every pass
    ``plan_budget`` makes (counting and selection on the example, scoring on the calibration batch)."""

    def __init__(self, net: nn.Module) -> None:
        self.net, self.calls, self.images = net, 0, 0

    def __enter__(self) -> _Passes:
        self.handle = self.net.register_forward_pre_hook(self._count)
        return self

    def _count(self, _module: nn.Module, args: tuple) -> None:
        self.calls += 1
        self.images += int(args[0].shape[0])

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _random_plans(plan: BudgetPlan, count: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """``count`` distinct plans, one uniformly drawn candidate per layer, with MACs in :data:`BAND` of the dense
    model's; returns them and the number of draws it took."""
    generator = np.random.default_rng(seed)
    macs = [np.array([c.macs for c in layer.candidates], dtype=float) for layer in plan.layers]
    plans: list[list[int]] = []
    draws = 0
    while len(plans) < count:
        draws += 1
        chosen = [int(generator.integers(len(m))) for m in macs]
        fraction = (plan.fixed["macs"] + sum(m[c] for m, c in zip(macs, chosen, strict=True))) / plan.before["macs"]
        if BAND[0] <= fraction <= BAND[1] and chosen not in plans:
            plans.append(chosen)
        if draws > 10_000_000:
            raise RuntimeError(f"only {len(plans)} plans in {BAND} after {draws} draws")
    return plans, draws


def _loss_rises(
    dense: nn.Module, plan: BudgetPlan, images: Tensor, labels: Tensor, inputs: dict[str, Tensor]
) -> tuple[list[list[float]], dict[str, float]]:
    """``rise[i][j]``: the calibration batch's cross-entropy when layer ``i`` alone takes candidate ``j``, minus the
    dense model's (0 for dense); and the cost: forward passes, images through the model, seconds (including building
    each candidate layer; ``inputs``, the layers' calibration inputs, are captured in one more pass, counted)."""
    start = time.perf_counter()
    passes, seen = 1, len(images)  # the capture of ``inputs``
    base = _loss(dense, images, labels)
    passes, seen = passes + 1, seen + len(images)
    rises = []
    for index, layer in enumerate(plan.layers):
        row = [0.0]
        for option in range(1, len(layer.candidates)):
            chosen = [0] * len(plan.layers)
            chosen[index] = option
            work = copy.deepcopy(dense)
            apply_budget_plan(work, _with_choices(plan, chosen), None, inputs)
            row.append(_loss(work, images, labels) - base)
            passes, seen = passes + 1, seen + len(images)
        rises.append(row)
    return rises, {"passes": passes, "images": seen, "seconds": time.perf_counter() - start}


def _rescored(plan: BudgetPlan, rises: list[list[float]]) -> BudgetPlan:
    """``plan``'s candidates with the loss rises as their sensitivities, allocated again by the same greedy method."""
    layers = [
        LayerBudget(
            layer.name,
            layer.type,
            tuple(replace(c, sensitivity=r) for c, r in zip(layer.candidates, row, strict=True)),
            0,
            layer.aliases,
        )
        for layer, row in zip(plan.layers, rises, strict=True)
    ]
    scored = BudgetPlan(layers, dict(plan.budgets), dict(plan.before), dict(plan.fixed), list(plan.skipped))
    _allocate(scored, "benchmarks.sensitivity")  # the allocation of plan_budget, on other scores
    return scored


def _evaluate(
    state: dict, plan: BudgetPlan, chosen: list[int], images: Tensor, inputs: dict[str, Tensor], args: Any, data: Any
) -> dict[str, float]:
    """Convert a fresh copy of the dense classifier as ``chosen`` says (BatchNorm re-estimated on ``images``),
    measure it, fine-tune it, measure it again."""
    classifier = _classifier()
    classifier.load_state_dict(state)
    apply_budget_plan(classifier.backbone, _with_choices(plan, chosen), images, inputs)
    right_after = _accuracy(classifier.backbone, data)
    pl.seed_everything(0, workers=True)
    classifier.train()  # Lightning keeps the modes it finds: BatchNorm must train again
    _trainer(args.finetune_epochs, []).fit(classifier, datamodule=data)
    return {"right_after": right_after, "final": _accuracy(classifier.backbone, data)}


def run(args: Any) -> dict[str, Any]:
    """Train, plan, score and evaluate; everything the section shows, as JSON-ready values."""
    data = DigitsDataModule(batch_size=BATCH_SIZE, seed=0, image_size=args.image_size)
    pl.seed_everything(0, workers=True)
    classifier = _classifier()
    _trainer(args.epochs, []).fit(classifier, datamodule=data)
    state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
    dense = copy.deepcopy(classifier.backbone).eval()
    dense_acc = _accuracy(dense, data)
    reference = _classifier()
    reference.load_state_dict(state)
    pl.seed_everything(0, workers=True)
    _trainer(args.finetune_epochs, []).fit(reference, datamodule=data)  # the plans' fine-tuning, on the dense model
    dense_finetuned = _accuracy(reference.backbone, data)
    pl.seed_everything(0, workers=True)
    batches = list(itertools.islice(data.train_dataloader(), CALIBRATION_BATCHES))
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    net = copy.deepcopy(dense)
    start = time.perf_counter()
    with _Passes(net) as passes:
        plan = plan_budget(net, images[:1], macs=FRACTION, calibration=images)
    ours = {"passes": passes.calls, "images": passes.images, "seconds": time.perf_counter() - start}
    inputs = capture_inputs(dense, images, [layer.name for layer in plan.layers])
    rises, rise_cost = _loss_rises(dense, plan, images, labels, inputs)
    by_loss = _rescored(plan, rises)
    randoms, draws = _random_plans(plan, args.plans)
    candidates = [
        ("greedy (output error)", [layer.chosen for layer in plan.layers]),
        ("greedy (loss rise)", [layer.chosen for layer in by_loss.layers]),
        *((f"random {n + 1}", chosen) for n, chosen in enumerate(randoms)),
    ]
    rows = []
    for kind, chosen in candidates:
        planned = _with_choices(plan, chosen)
        labels_chosen = [layer.choice.label for layer in planned.layers]
        figures = _evaluate(state, plan, chosen, images, inputs, args, data)
        rows.append(
            {
                "plan": kind,
                "choices": labels_chosen,
                "macs": planned.fraction("macs"),
                "params": planned.fraction("params"),
                "output_error": planned.sensitivity,
                "loss_rise": sum(row[c] for row, c in zip(rises, chosen, strict=True)),
                **figures,
            }
        )
        print(f"{kind}: {rows[-1]}", flush=True)
    return {
        "settings": {
            "epochs": args.epochs,
            "finetune_epochs": args.finetune_epochs,
            "image_size": args.image_size,
            "threads": args.threads,
            "calibration_images": len(images),
            "fraction": FRACTION,
            "band": list(BAND),
            "draws": draws,
        },
        "dense": dense_acc,
        "dense_finetuned": dense_finetuned,
        "layers": [layer.name for layer in plan.layers],
        "candidates": sum(len(layer.candidates) - 1 for layer in plan.layers),
        "cost": {"output error": ours, "loss rise": rise_cost},
        "rows": rows,
    }


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation; NaN where either side is constant (a bootstrap sample of one plan, say)."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _correlations(rows: list[dict], key: str, dense: float) -> dict[str, Any]:
    """Spearman correlation of each predictor with the accuracy drop at ``key``, the difference (loss rise minus
    output error) and its 90% bootstrap interval over plans."""
    drop = [dense - r[key] for r in rows]
    ours, loss = [r["output_error"] for r in rows], [r["loss_rise"] for r in rows]
    result = {"output error": _spearman(ours, drop), "loss rise": _spearman(loss, drop)}
    generator = np.random.default_rng(0)
    differences = []
    for _ in range(BOOTSTRAP):
        pick = generator.integers(len(rows), size=len(rows))
        a = _spearman([ours[i] for i in pick], [drop[i] for i in pick])
        b = _spearman([loss[i] for i in pick], [drop[i] for i in pick])
        if np.isfinite(a) and np.isfinite(b):
            differences.append(b - a)
    low, high = np.percentile(differences, [5, 95]) if differences else (float("nan"), float("nan"))
    result["difference"] = result["loss rise"] - result["output error"]
    result["interval"] = [float(low), float(high)]
    return result


def _rank(rows: list[dict], kind: str, key: str) -> int:
    """1 = the most accurate of all plans at ``key``."""
    ordered = sorted(rows, key=lambda r: -r[key])
    return 1 + [r["plan"] for r in ordered].index(kind)


def _findings(summary: dict[str, Any], after: dict, final: dict) -> tuple[str, list[str]]:
    rows, dense, cost = summary["rows"], summary["dense"], summary["cost"]
    settings = summary["settings"]
    ours, loss = cost["output error"], cost["loss rise"]
    macs = [r["macs"] for r in rows]

    def verdict(c: dict) -> str:
        low, high = c["interval"]
        if c["difference"] >= CLEAR and low > 0:
            return "the loss rise predicts clearly better"
        if c["difference"] <= -CLEAR and high < 0:
            return "the output error predicts clearly better"
        return "neither predicts clearly better"

    lines = [
        "What the table says:",
        f"- {len(rows)} plans at {min(macs):.3f}-{max(macs):.3f} of the dense MACs (dense accuracy "
        f"{100 * dense:.2f}%). Right after conversion (BatchNorm re-estimated), the output error ranks the accuracy "
        f"drop with Spearman ρ = {after['output error']:.2f} and the loss rise with ρ = {after['loss rise']:.2f} "
        f"(difference {after['difference']:+.2f}, 90% bootstrap interval {after['interval'][0]:+.2f} to "
        f"{after['interval'][1]:+.2f}): {verdict(after)}.",
        f"- After {settings['finetune_epochs']} epochs of fine-tuning: ρ = {final['output error']:.2f} (output error) "
        f"and {final['loss rise']:.2f} (loss rise), difference {final['difference']:+.2f} "
        f"({final['interval'][0]:+.2f} to {final['interval'][1]:+.2f}): {verdict(final)}.",
        f"- Planning cost: the output error needs {ours['passes']} forward passes ({ours['images']} images; one of "
        f"the calibration batch, the others of one example image) and {ours['seconds']:.1f} s for the whole "
        f"`plan_budget`; the loss rise needs {loss['passes']} passes of the {settings['calibration_images']}-image "
        f"calibration batch ({summary['candidates']} candidates of {len(summary['layers'])} layers, each built and "
        f"run, plus the labels) and {loss['seconds']:.1f} s on top of the selection, "
        f"{loss['seconds'] / ours['seconds']:.0f}x the whole of `plan_budget`.",
    ]
    for kind in ("greedy (output error)", "greedy (loss rise)"):
        row = next(r for r in rows if r["plan"] == kind)
        lines.append(
            f"- The {kind} plan ({row['macs']:.3f} of the MACs) ranks {_rank(rows, kind, 'right_after')} of "
            f"{len(rows)} right after conversion ({100 * row['right_after']:.2f}%) and {_rank(rows, kind, 'final')} "
            f"after fine-tuning ({100 * row['final']:.2f}%)."
        )
    ours_plan, loss_plan = (
        next(r for r in rows if r["plan"] == k) for k in ("greedy (output error)", "greedy (loss rise)")
    )
    lower = loss_plan["loss_rise"] < ours_plan["loss_rise"]
    better = loss_plan["right_after"] > ours_plan["right_after"] and loss_plan["final"] > ours_plan["final"]
    worse = loss_plan["right_after"] < ours_plan["right_after"] and loss_plan["final"] < ours_plan["final"]
    lines.append(
        f"- Allocated on loss rises, the greedy plan predicts a {'lower' if lower else 'higher'} Σ loss rise "
        f"({loss_plan['loss_rise']:.3f} against {ours_plan['loss_rise']:.3f}) and ends "
        + (
            "more accurate"
            if better
            else "less accurate"
            if worse
            else "more accurate at one point and less at the other"
        )
        + " than the plan allocated on output errors, right after conversion and after fine-tuning"
        + (
            ": a lower sum of per-layer loss rises did not mean a more accurate network (the layers interact)."
            if lower and worse
            else "."
        )
    )
    best = max(r["final"] for r in rows if r["plan"].startswith("random"))
    median = statistics.median(r["final"] for r in rows if r["plan"].startswith("random"))
    lines.append(
        f"- The random plans end at {100 * median:.2f}% (median) and {100 * best:.2f}% (best) after fine-tuning; the "
        f"dense model fine-tuned the same way ends at {100 * summary['dense_finetuned']:.2f}% (drops are measured "
        "from the dense model before fine-tuning; the ranks do not depend on that)."
    )
    missed = []
    for name, c in (("right after conversion", after), ("after fine-tuning", final)):
        if verdict(c).startswith("the loss rise"):
            missed.append(
                f"sensitivity {name}: the loss rise ranks the accuracy drop better than the output error "
                f"(ρ {c['loss rise']:.2f} vs {c['output error']:.2f})"
            )
    return "\n" + "\n".join(lines) + "\n", missed


def _table(summary: dict[str, Any]) -> str:
    lines = [
        "| plan | MACs | Ghost / structured / dense layers | Σ output error | Σ loss rise | right after (%) | "
        "after fine-tuning (%) |",
        "|---|---|---|---|---|---|---|",
        f"| dense (reference) | 1.000 | 0 / 0 / {len(summary['layers'])} | 0 | 0 | {100 * summary['dense']:.2f} | "
        f"{100 * summary['dense_finetuned']:.2f} |",
    ]
    for r in summary["rows"]:
        kinds = [c.split()[0] for c in r["choices"]]
        counts = f"{kinds.count('ghost')} / {kinds.count('structured')} / {kinds.count('dense')}"
        lines.append(
            f"| {r['plan']} | {r['macs']:.3f} | {counts} | {r['output_error']:.3f} | {r['loss_rise']:.3f} | "
            f"{100 * r['right_after']:.2f} | {100 * r['final']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=20, help="random plans in the MACs band")
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (accuracy does not depend on it)")
    parser.add_argument("--quick", action="store_true", help="4 random plans, 1 epoch each: a smoke run")
    parser.add_argument("--from-json", action="store_true", help="only re-render results/sensitivity.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.plans, args.epochs, args.finetune_epochs = 4, 1, 1
    torch.set_num_threads(args.threads)
    if args.from_json:
        summary = json.loads((RESULTS / f"{NAME}.json").read_text())
        measured = measured_on(NAME)
    else:
        summary = run(args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
        measured = machine()
    after = _correlations(summary["rows"], "right_after", summary["dense"])
    final = _correlations(summary["rows"], "final", summary["dense"])
    settings = summary["settings"]
    findings, missed = _findings(summary, after, final)
    body = (
        f"Digits at {settings['image_size']}x{settings['image_size']}, CIFAR ResNet-20 trained {settings['epochs']} "
        f"epochs (seed 0); calibration batch of {settings['calibration_images']} training images; plans at "
        f"`macs={settings['fraction']}`: the greedy plan of `plan_budget`, the same greedy allocation on loss rises, "
        f"and {len(summary['rows']) - 2} random plans with MACs in {settings['band'][0]}-{settings['band'][1]} of the "
        f"dense model's ({settings['draws']} draws). Σ output error: `BudgetPlan.sensitivity` (squared relative "
        "output errors, summed); Σ loss rise: the calibration cross-entropy's rise per layer alone, summed. Accuracy: "
        f"top-1 on the 450 held-out images; right after conversion (BatchNorm "
        f"re-estimated on the calibration batch) and after {settings['finetune_epochs']} epochs of fine-tuning. "
        f"Torch threads: {settings['threads']}.\n\n" + _table(summary) + findings
    )
    rerun = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--from-json"]
    section = Section(NAME, TITLE, body, command(__spec__.name, rerun), missed, measured)
    section.save()
    return section


if __name__ == "__main__":
    main()
