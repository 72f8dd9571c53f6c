"""Whole-model latency: original, converted (Ghost, structured) and optimized, on this machine.

BENCHMARKS.md takes table 2c (``--compile``) from it; the CPU eager and ONNX Runtime tables come from
``benchmarks/runtimes.py``. Without ``--compile`` it adds CUDA tables (fp32, bf16 channels_last) where a GPU
is visible. Speed-ups are against the original with BatchNorm folded.

Run ``python -m benchmarks.latency`` (``--quick`` for a CPU run of a few minutes on 2 cores: fewer
repetitions, and batch 8 instead of 32 for the 224x224 models). It answers "MACs went down, did
latency?" for CIFAR ResNet-56 (32x32) and torchvision ResNet-18, ResNet-50 and MobileNetV2
(224x224), at batch 1 and 32, on CPU (2 threads by default) and, when CUDA is available, on the
GPU in float32 and in bfloat16 with channels_last.

Forms of each model:

- ``original``: the dense model as built (random weights: timing does not depend on them);
- ``original, BN folded``: the same with BatchNorm folded into the convs (what any deployment does);
- ``ghost``: ``convert_to_ghost(ratio=2, dw_size=3)`` (first conv and classifier kept);
- ``ghost optimized``: :func:`~lightning_cheapconv.deploy.optimize_for_inference` on it, given the
  original so that it may fall back to it (the kept configuration is shown);
- ``structured``: ``decompose_structured`` with c = C, n = k - 1 (3x3 -> 2x2; 1x1 convs are kept),
  decomposed (sum-pool + small conv);
- ``structured, dense``: the same folded back into dense convs (``to_dense()``);
- ``structured optimized``: ``optimize_for_inference`` on the decomposed model, given the original.

With ``--compile`` every form runs compiled by :func:`~lightning_cheapconv.deploy.compile_for_inference`
(``torch.compile``, inductor with freezing: weights constant, BatchNorm folded, elementwise work such
as the sum-pool fused with its neighbours), and the optimized forms come from
``optimize_for_inference(compile=True)``; by default for CIFAR
ResNet-56 and ResNet-18 (compiling takes about half a minute per form here). That
table (2c) answers the same question for a deployment that compiles.

All forms of one model, device and batch are timed in one process, interleaved round-robin
(:func:`~lightning_cheapconv.deploy.time_interleaved`), median of the repetitions. Speed-up is
original / form (2.00x = half the time). The MAC ratio (original / form, FlopCounterMode FLOPs / 2)
is the compute-bound limit of the speed-up. IQR is the interquartile range of the samples over
their median: how noisy the machine was while measuring.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from lightning_cheapconv import convert_to_ghost, count_complexity, decompose_structured, get_model
from lightning_cheapconv.deploy import compile_for_inference, fold_batchnorm, optimize_for_inference, time_interleaved
from lightning_cheapconv.nn import StructuredConv2d, StructuredLinear

from .common import Section, command, randomize_bn


@dataclass(frozen=True)
class Spec:
    name: str
    build: Callable[[], nn.Module]
    size: int


SPECS = {
    "resnet56": Spec("CIFAR ResNet-56", lambda: get_model("resnet56", num_classes=10), 32),
    "resnet18": Spec("ResNet-18", lambda: torchvision.models.resnet18(num_classes=1000), 224),
    "resnet50": Spec("ResNet-50", lambda: torchvision.models.resnet50(num_classes=1000), 224),
    "mobilenet_v2": Spec("MobileNetV2", lambda: torchvision.models.mobilenet_v2(num_classes=1000), 224),
}


def all_dense(model: nn.Module) -> nn.Module:
    """A copy with every structured layer folded back into its dense layer."""
    from lightning_cheapconv.convert import replace_modules

    dense = copy.deepcopy(model)
    replacements = {
        name: m.to_dense() for name, m in dense.named_modules() if isinstance(m, (StructuredConv2d, StructuredLinear))
    }
    replace_modules(dense, replacements)
    return dense.eval()


def base_forms(spec: Spec) -> dict[str, nn.Module]:
    """The forms that do not depend on device or batch."""
    torch.manual_seed(0)
    original = randomize_bn(spec.build())
    ghost = copy.deepcopy(original)
    convert_to_ghost(ghost, ratio=2, dw_size=3, init="random")
    structured = copy.deepcopy(original)
    decompose_structured(structured, channel_ratio=1.0, kernel_reduction=1)
    return {
        "original": original,
        "ghost": ghost.eval(),
        "structured": structured.eval(),
        "structured, dense": all_dense(structured),
    }


def macs(model: nn.Module, size: int) -> int:
    return count_complexity(copy.deepcopy(model).float().cpu(), input_shape=(1, 3, size, size)).macs


def measure(
    spec: Spec,
    base: dict[str, nn.Module],
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    batch: int,
    repeats: int,
    min_time: float,
    mac_counts: dict[str, int],
    compile: bool = False,
) -> list[dict]:
    def place(m: nn.Module) -> nn.Module:
        m = copy.deepcopy(m).to(device=device, dtype=dtype).eval()
        return m.to(memory_format=torch.channels_last) if channels_last else m

    if compile:
        torch._dynamo.reset()  # drop the previous models' compiled code
    x = torch.randn(batch, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    forms = {name: place(m) for name, m in base.items()}
    folded = copy.deepcopy(forms["original"])
    fold_batchnorm(folded, x)
    forms = {
        "original": forms["original"],
        "original, BN folded": folded,
        **{k: v for k, v in forms.items() if k != "original"},
    }
    kept: dict[str, str] = {}
    form_macs = dict(mac_counts)
    for method in ("ghost", "structured"):
        report = optimize_for_inference(
            forms[method], x, device, repeats=repeats, min_time=min_time, original=forms["original"], compile=compile
        )
        forms[f"{method} optimized"] = report.model
        kept[f"{method} optimized"] = report.chosen_configuration
        form_macs[f"{method} optimized"] = macs(report.model, spec.size)
    order = [
        "original",
        "original, BN folded",
        "ghost",
        "ghost optimized",
        "structured",
        "structured, dense",
        "structured optimized",
    ]
    runners = {name: compile_for_inference(forms[name], x) if compile else forms[name] for name in order}
    latency = time_interleaved(
        {name: (lambda r=r: r(x)) for name, r in runners.items()},
        repeats=repeats,
        min_time=min_time,
        warmup=1,
        device=device,
    )
    rows = []
    for name in order:
        lat = latency[name]
        rows.append(
            {
                "model": spec.name,
                "batch": batch,
                "form": name + (f" (kept: {kept[name]})" if name in kept else ""),
                "ms": lat.median_ms,
                "spread": lat.spread,
                "speedup": latency["original, BN folded"].median_ms / lat.median_ms,
                "mac_ratio": form_macs["original"] / form_macs[name],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | batch | form | ms | IQR | speed-up vs original, BN folded | MAC ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['form']} | {r['ms']:.2f} | {r['spread']:.0%} | {r['speedup']:.2f}x "
            f"| {r['mac_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def missed_targets(rows: list[dict], device: torch.device, compiled: bool = False) -> list[str]:
    """The issue's goals: optimized never slower than the original (beyond 5% noise); on CPU, a converted ResNet
    whose MAC cut is 2x or more runs, in its optimized form, at least 1.3x faster than the original at batch 32."""
    missed = []
    where = f"{device.type}, compiled" if compiled else device.type
    cut = {(r["model"], r["batch"], r["form"]): r["mac_ratio"] for r in rows}
    for r in rows:
        if "optimized" not in r["form"]:
            continue
        method = r["form"].split()[0]
        if r["speedup"] < 0.95:
            missed.append(f"latency ({where}): {r['model']} batch {r['batch']} {r['form']} is {r['speedup']:.2f}x")
        mac_cut = cut.get((r["model"], r["batch"], method), 1.0)
        if device.type == "cpu" and r["batch"] == 32 and "ResNet" in r["model"] and mac_cut >= 2.0:
            if r["speedup"] < 1.3:
                missed.append(
                    f"latency ({where}): {r['model']} batch 32, {method} (MAC cut {mac_cut:.2f}x), optimized: "
                    f"{r['speedup']:.2f}x faster than the original (target: 1.3x)"
                )
    return missed


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions; batch 8 instead of 32 at 224x224")
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=None, help="models (default: all)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 32)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all", help="'all': CPU, and CUDA if any")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per form (default 7, --quick 3)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="every form under torch.compile (default models: resnet56 and resnet18); writes table 2c",
    )
    args = parser.parse_args(argv)
    models = args.models or (["resnet56", "resnet18"] if args.compile else list(SPECS))

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    setups: list[tuple[torch.device, torch.dtype, bool, str]] = []
    if args.device in ("all", "cpu"):
        setups.append((torch.device("cpu"), torch.float32, False, f"CPU, {args.threads} threads, float32"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        gpu = torch.cuda.get_device_name()
        setups.append((torch.device("cuda"), torch.float32, False, f"{gpu}, float32, NCHW"))
        setups.append((torch.device("cuda"), torch.bfloat16, True, f"{gpu}, bfloat16, channels_last"))
    if not setups:
        parser.error("CUDA is not available")

    parts = [
        f"Median of {repeats} interleaved round-robin samples per form after warm-up (inference_mode). Speed-up = "
        "original with BatchNorm folded (as any deployment runs it) / form; the unfolded original is a row of its "
        "own; MAC ratio = original / form (FLOPs / 2, FlopCounterMode) = the compute-bound limit. "
        "IQR = interquartile range / median (noise). 'kept' = the configuration optimize_for_inference returned "
        "('optimized': per-layer choice; 'all dense': every structured layer folded; 'original': the dense model; "
        "'as given': unchanged). Much of the optimized forms' gain is BatchNorm folding: compare them with "
        "'original, BN folded' too. Speed-ups below 1.00x are cheap forms slower than the original."
        + (
            " Every form runs compiled by compile_for_inference (torch.compile, inductor with freezing), the "
            "optimized ones chosen by optimize_for_inference(compile=True); speed-ups are against the compiled "
            "original."
            if args.compile
            else ""
        )
    ]
    missed: list[str] = []
    for device, dtype, channels_last, title in setups:
        rows: list[dict] = []
        for key in models:
            spec = SPECS[key]
            base = base_forms(spec)
            counts = {name: macs(m, spec.size) for name, m in base.items()}
            counts["original, BN folded"] = counts["original"]
            batches = args.batches or ([1, 8] if args.quick and spec.size > 64 and device.type == "cpu" else [1, 32])
            for batch in batches:
                part = measure(spec, base, device, dtype, channels_last, batch, repeats, 0.01, counts, args.compile)
                print(markdown(part), flush=True)
                rows.extend(part)
        missed += missed_targets(rows, device, args.compile)
        parts.append(f"### {title}{', torch.compile' if args.compile else ''}\n\n{markdown(rows)}")
    name, title = (
        ("latency_compiled", "2c. Latency of whole models under torch.compile")
        if args.compile
        else (
            "latency",
            "2. Latency of whole models",
        )
    )
    section = Section(name, title, "\n\n".join(parts), command(__spec__.name, argv), missed)
    section.save()
    return section


if __name__ == "__main__":
    main()
