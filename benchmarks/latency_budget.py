"""Latency budgets where the model runs: a plan timed in PyTorch eager against one timed in ONNX Runtime.

Run ``python -m benchmarks.latency_budget`` (about 6 minutes on 2 CPU cores; ``--quick``: one budget). CIFAR
ResNet-20, random weights and seeded BatchNorm statistics, batch 32 at 32x32, fp32, 2 threads. For each budget
fraction ``f``, :func:`~lightning_cheapconv.budget.compress_to_budget` plans with ``latency_ms = f x`` the dense
model's latency as the same planner measures it (a :func:`~lightning_cheapconv.budget.plan_budget` with an unbounded
budget, beforehand, the second of two) in its ``latency_runtime`` (``"pytorch"``: eager; ``"onnxruntime"``: every
candidate form and the whole model exported with ``torch.onnx.export(dynamo=True)`` and run in ONNX Runtime), default
methods (Ghost and structured) and grid. The columns give the fraction the plan predicts from its layers, the
fraction it measured on the planned model as a whole (after its re-allocation rounds), and the fraction measured
afterwards in ONNX Runtime: the converted network against the dense one, both BatchNorm-folded
(:func:`~lightning_cheapconv.deploy.fold_batchnorm`) and timed interleaved in one process
(:func:`~lightning_cheapconv.deploy.time_onnxruntime`, median of ``--repeats`` samples). The question: does a latency
budget hold in the runtime a user deploys with.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lightning_cheapconv import get_model
from lightning_cheapconv.budget import compress_to_budget, plan_budget
from lightning_cheapconv.deploy import fold_batchnorm, time_onnxruntime

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
    # The dense model as each planner measures it: a plan with an unbounded budget keeps every layer dense and
    # records its whole-model time. The budgets are fractions of it (a separate measurement drifted by 20% here).
    # Each is taken twice and the second kept (the first eager one once ran 1.6x the planner's later one; but
    # eager times of this model seconds apart ranged 20-27 ms on this shared machine: noise, not only a cold start).
    planner_ms = {
        runtime: [
            plan_budget(dense, x, latency_ms=1e9, latency_runtime=runtime, calibration=x).before["latency_ms"]
            for _ in range(2)
        ][-1]
        for runtime in RUNTIMES
    }
    rows, converted, findings = [], {}, []
    for fraction in fractions:
        for runtime in RUNTIMES:
            model = copy.deepcopy(dense)
            asked = fraction * planner_ms[runtime]
            start = time.perf_counter()
            try:
                plan = compress_to_budget(model, x, latency_ms=asked, latency_runtime=runtime, calibration=x).budget
            except ValueError as err:  # the machine ran slower than when the dense model was measured
                findings.append(f"- Budget {fraction} planned on {RUNTIMES[runtime]} latencies: refused ({err}).")
                continue
            seconds = time.perf_counter() - start
            kinds = {m: sum(layer.choice.method == m for layer in plan.layers) for m in ("ghost", "structured")}
            key = f"{runtime} @ {fraction}"
            converted[key] = _folded(model, x)
            rows.append((fraction, runtime, asked, plan, kinds, seconds, key))
    timed = time_onnxruntime({"dense": _folded(dense, x), **converted}, x, repeats, warmup=2)
    folded_ms = timed["dense"].median_ms
    lines = [
        "| budget: fraction (ms) | planner's runtime | its dense model (ms) | plan | predicted | measured as a whole "
        "by the planner | measured afterwards in ONNX Runtime (BN folded) | MACs fraction | planning + conversion "
        "(s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fraction, runtime, asked, plan, kinds, seconds, key in rows:
        before = plan.before["latency_ms"]
        measured = timed[key].median_ms / folded_ms
        lines.append(
            f"| {fraction} ({asked:.2f}) | {RUNTIMES[runtime]} | {before:.2f} | {kinds['ghost']} Ghost, "
            f"{kinds['structured']} structured | {plan.total('latency_ms') / before:.3f} | "
            f"{plan.measured_latency_ms / before:.3f} | {measured:.3f} (IQR {timed[key].spread:.0%}) | "
            f"{plan.fraction('macs'):.3f} | {seconds:.0f} |"
        )
        findings.append(
            f"- Budget {fraction} of the dense latency, planned on {RUNTIMES[runtime]} latencies: {measured:.3f} of "
            f"the dense latency in ONNX Runtime ({'within' if measured <= fraction else 'over'} the fraction asked)."
        )
    body = "\n".join(
        [
            f"CIFAR ResNet-20 (random weights), batch {BATCH} at {SIZE}x{SIZE}, fp32. Each budget is a fraction of "
            "the dense model's latency as that planner measured it beforehand (`plan_budget` with an unbounded "
            "budget, first column in ms); the plan's own measurement of the dense model when it planned follows "
            "(the two drift apart on a shared machine). Fractions in the next columns are of the latter: predicted "
            "from the layers, and the planned model timed as a whole against the dense one (after its re-allocation "
            "rounds). The last measurement times the converted networks against the dense one, all BatchNorm-folded, "
            f"in ONNX Runtime, interleaved in one process, median of {repeats} samples (dense: {folded_ms:.2f} ms, "
            f"IQR {timed['dense'].spread:.0%}).\n",
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
