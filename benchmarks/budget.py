"""Planning time of ``compress_to_budget``: torchvision ResNet-50, a 32-image calibration batch at 224x224.

Run ``python -m benchmarks.budget`` (``--quick``: 8 images). CPU, 2 threads, fp32, random weights and random images
(no downloads here). Times :func:`~lightning_cheapconv.budget.plan_budget` (selection, counting, the forward pass that
scores every candidate of every layer, and the allocation; the model is not changed) and the whole
:func:`~lightning_cheapconv.budget.compress_to_budget` (planning, then Ghost inheritance on activations, projection
and the BatchNorm re-estimation on the calibration batch) at half the MACs, once each after one warm-up forward pass,
and counts the converted model independently with ``count_complexity``. The section is written to
``benchmarks/results/budget.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torchvision

from lightning_cheapconv import count_complexity
from lightning_cheapconv.budget import TOLERANCE, compress_to_budget, plan_budget

from .common import Section, command

TARGET_S = 60.0
FRACTION = 0.5


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 8
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randn(args.images, 3, 224, 224, generator=generator)
    example = calibration[:1].clone()
    with torch.no_grad():
        model(calibration)  # warm-up: allocator and kernels, as a user's model has run before
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    plan = plan_budget(model, example, macs=FRACTION, calibration=calibration)
    plan_s = time.perf_counter() - start
    converted = copy.deepcopy(model)
    start = time.perf_counter()
    result = compress_to_budget(converted, example, macs=FRACTION, calibration=calibration)
    total_s = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    reached = (
        count_complexity(converted, example_input=example).macs / count_complexity(model, example_input=example).macs
    )
    kinds = {m: sum(layer.choice.method == m for layer in plan.layers) for m in ("dense", "ghost", "structured")}
    missed = []
    if plan_s > TARGET_S:
        missed.append(f"planning ResNet-50 with {args.images} images took {plan_s:.1f} s (target: under {TARGET_S} s)")
    if not FRACTION - TOLERANCE <= reached <= FRACTION:
        missed.append(f"MACs budget {FRACTION}: reached {reached:.4f} (target: {FRACTION - TOLERANCE}..{FRACTION})")
    body = (
        f"torchvision ResNet-50 (random weights), calibration {args.images}x3x224x224, example 1x3x224x224, "
        f"`macs={FRACTION}`, methods Ghost and structured. Target: planning under {TARGET_S:.0f} s; the budget met "
        f"within {TOLERANCE} below. 1-minute load average {load_before:.1f} before, {load_after:.1f} after (2 cores, "
        "shared).\n\n"
        "| step | seconds |\n|---|---|\n"
        f"| `plan_budget` (scoring {sum(len(layer.candidates) for layer in plan.layers)} candidates of "
        f"{len(plan.layers)} layers, allocation) | {plan_s:.1f} |\n"
        f"| `compress_to_budget` (planning + conversion + BatchNorm re-estimation) | {total_s:.1f} |\n\n"
        f"Plan: {kinds['ghost']} Ghost, {kinds['structured']} structured, {kinds['dense']} dense; MACs counted "
        f"independently after conversion: {reached:.4f} of the original; {len(result.changes)} layers converted.\n"
    )
    section = Section("budget", "6. Planning a per-layer budget", body, command(__spec__.name, argv), missed)
    section.save()
    return section


if __name__ == "__main__":
    main()
