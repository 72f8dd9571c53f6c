"""Latency budgets where the model runs: a plan timed in PyTorch eager against one timed in ONNX Runtime.

Run ``python -m benchmarks.latency_budget`` (about 8 minutes on 2 CPU cores; ``--quick``: one budget). CIFAR
ResNet-20, random weights and seeded BatchNorm statistics, batch 32 at 32x32, fp32, 2 threads. For each budget
fraction ``f`` of the dense network's latency, :func:`~lightning_cheapconv.budget.compress_to_budget` plans with
``latency_ms = f x`` the dense latency that the planner measures in its ``latency_runtime`` (``"pytorch"``: eager;
``"onnxruntime"``: every candidate form and the whole model exported with ``torch.onnx.export(dynamo=True)`` and run
in ONNX Runtime), default methods (Ghost and structured) and grid. The columns give the fraction the plan predicts
(its own total over its own dense measurement) and the fraction measured afterwards in ONNX Runtime: the converted
network against the dense one, both BatchNorm-folded (:func:`~lightning_cheapconv.deploy.fold_batchnorm`) and timed
interleaved in one process (:func:`~lightning_cheapconv.deploy.time_onnxruntime`, median of ``--repeats`` samples).
The question: does a latency budget hold in the runtime a user deploys with.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lightning_cheapconv import get_model
from lightning_cheapconv.budget import compress_to_budget
from lightning_cheapconv.deploy import fold_batchnorm, time_interleaved, time_onnxruntime

from .common import Section, command, randomize_bn

NAME = "latency_budget"
TITLE = "6c. Latency budgets measured in PyTorch or in ONNX Runtime"
FRACTIONS = (0.8, 0.65)
BATCH, SIZE = 32, 32
RUNTIMES = {"pytorch": "PyTorch eager", "onnxruntime": "ONNX Runtime"}


def _folded(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    model = copy.deepcopy(model).eval()
    fold_batchnorm(model, x)
    return model


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="latency samples per network")
    parser.add_argument("--quick", action="store_true", help="one budget, 5 samples: a smoke run")
    args = parser.parse_args(argv)
    fractions = FRACTIONS[:1] if args.quick else FRACTIONS
    repeats = 5 if args.quick else args.repeats
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dense = randomize_bn(get_model("resnet20", 10))
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    # The dense model as the planner sees it (unfolded), in each runtime: the budgets are fractions of these.
    dense_ms = {
        "pytorch": time_interleaved({"dense": lambda: dense(x)}, repeats)["dense"].median_ms,
        "onnxruntime": time_onnxruntime({"dense": dense}, x, repeats, warmup=2)["dense"].median_ms,
    }
    rows, converted = [], {}
    for fraction in fractions:
        for runtime in RUNTIMES:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            result = compress_to_budget(
                model, x, latency_ms=fraction * dense_ms[runtime], latency_runtime=runtime, calibration=x
            )
            seconds = time.perf_counter() - start
            plan = result.budget
            kinds = {m: sum(layer.choice.method == m for layer in plan.layers) for m in ("ghost", "structured")}
            key = f"{runtime} @ {fraction}"
            converted[key] = _folded(model, x)
            rows.append((fraction, runtime, plan, kinds, seconds, key))
    timed = time_onnxruntime({"dense": _folded(dense, x), **converted}, x, repeats, warmup=2)
    folded_ms = timed["dense"].median_ms
    lines = [
        "| budget (fraction of the dense latency) | latency measured by the planner in | plan | predicted fraction | "
        "measured in ONNX Runtime (BN folded) | MACs fraction | planning + conversion (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    findings = []
    for fraction, runtime, plan, kinds, seconds, key in rows:
        measured = timed[key].median_ms / folded_ms
        lines.append(
            f"| {fraction} | {RUNTIMES[runtime]} | {kinds['ghost']} Ghost, {kinds['structured']} structured | "
            f"{plan.fraction('latency_ms'):.3f} | {measured:.3f} (IQR {timed[key].spread:.0%}) | "
            f"{plan.fraction('macs'):.3f} | {seconds:.0f} |"
        )
        findings.append(
            f"- Budget {fraction} planned on {RUNTIMES[runtime]} latencies: {measured:.3f} of the dense latency in "
            f"ONNX Runtime ({'within' if measured <= fraction else 'over'} the budget)."
        )
    body = "\n".join(
        [
            f"CIFAR ResNet-20 (random weights), batch {BATCH} at {SIZE}x{SIZE}, fp32; the BN-folded dense network "
            f"runs in {folded_ms:.2f} ms in ONNX Runtime (IQR {timed['dense'].spread:.0%}). Each plan asks the "
            "fraction of the dense latency in the planner's runtime (measured before planning: "
            f"{dense_ms['pytorch']:.2f} ms eager, {dense_ms['onnxruntime']:.2f} ms in ONNX Runtime); the predicted "
            "fraction is the plan's own total over its own measurement of the dense model; the measured column "
            "times the converted network against the dense one in ONNX Runtime, median of "
            f"{repeats} interleaved samples.\n",
            *lines,
            "",
            *findings,
        ]
    )
    section = Section(NAME, TITLE, body + "\n", command(__spec__.name, argv))
    section.save()
    return section


if __name__ == "__main__":
    main()
