"""Forward-pass timing of single layers: dense conv against its cheap forms.

Run ``python -m benchmarks.ops`` (``--quick`` for fewer repetitions, ``--channels-last`` for NHWC).
On CPU it uses 2 threads; on CUDA (when available) it synchronizes around every sample. All
candidates of one layer are timed in one process and interleaved round-robin, so that a noisy
shared machine slows them alike; each number is the median of the repetitions.

Layers: three representative ImageNet-ResNet layers (the 1.3x target applies to them), and the three
stages of the CIFAR ResNets (16-64 channels at 32/16/8 pixels), which explain their whole-model latency.

Forms per layer:

- ``dense``: the ``nn.Conv2d``;
- ``structured c=C n=k-1`` / ``structured c=C/2 n=k-1``: ``StructuredConv2d`` in decomposed form
  (sum-pool, then the small conv); for a 1x1 layer only the channel structure applies (``c=C/2``);
- ``structured folded``: the latter folded back with ``to_dense()`` (an ``nn.Conv2d`` again);
- ``ghost s=2 d=3``: ``GhostConv2d`` (conv-only, as a drop-in replacement).

Ratios are dense / form: a speed-up of 2.0 means half the time; a MAC ratio of 2.0 means half the
MACs. MACs are ``FlopCounterMode`` FLOPs / 2 (bias excluded); the structured layers' sum-pool
additions are not MACs and are listed in their own column (millions). IQR is the samples'
interquartile range over their median: how noisy the machine was.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_cheapconv.deploy import time_interleaved
from lightning_cheapconv.nn import GhostConv2d, StructuredConv2d

from .common import Section, command


@dataclass(frozen=True)
class Layer:
    in_channels: int
    out_channels: int
    kernel: int
    size: int
    targeted: bool = True  # the representative layers carry the 1.3x target; the others explain latency

    @property
    def name(self) -> str:
        k = self.kernel
        return f"{k}x{k} {self.in_channels}->{self.out_channels} @{self.size}x{self.size}"


# ResNet-18/50 layers (ImageNet, the target's layers), then the three stages of the CIFAR ResNets
# (16-64 channels), which show why a CIFAR ResNet-56 gains little from its MAC cut on a CPU.
LAYERS = (
    Layer(64, 64, 3, 56),
    Layer(256, 256, 3, 14),
    Layer(256, 256, 1, 28),
    Layer(16, 16, 3, 32, targeted=False),
    Layer(32, 32, 3, 16, targeted=False),
    Layer(64, 64, 3, 8, targeted=False),
)
BATCHES = (1, 32)


def build_forms(layer: Layer) -> dict[str, nn.Module]:
    """The candidates for one layer, dense first."""
    dense = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, padding=layer.kernel // 2)
    n = max(1, layer.kernel - 1)
    half = layer.in_channels // 2
    forms: dict[str, nn.Module] = {"dense": dense}
    if layer.kernel > 1:
        forms[f"structured c=C n={n}"] = StructuredConv2d.from_dense(dense, layer.in_channels, n)
    structured_half = StructuredConv2d.from_dense(dense, half, n)
    forms[f"structured c=C/2 n={n}"] = structured_half
    forms["structured folded (to_dense)"] = structured_half.to_dense()
    forms["ghost s=2 d=3"] = GhostConv2d(
        layer.in_channels, layer.out_channels, layer.kernel, padding=layer.kernel // 2, ratio=2, dw_size=3
    )
    return forms


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    return counter.get_total_flops() // 2


def run(device: torch.device, channels_last: bool, reps: int, warmup: int, target_s: float) -> list[dict]:
    rows = []
    for layer in LAYERS:
        torch.manual_seed(0)
        forms = {name: module.to(device).eval() for name, module in build_forms(layer).items()}
        if channels_last:
            forms = {name: module.to(memory_format=torch.channels_last) for name, module in forms.items()}
        for batch in BATCHES:
            x = torch.randn(batch, layer.in_channels, layer.size, layer.size, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                reference = forms["dense"](x)
                for name, module in forms.items():
                    if module(x).shape != reference.shape:
                        raise RuntimeError(f"{layer.name} {name}: output shape differs from the dense layer's")
            macs = {name: count_macs(module, x) for name, module in forms.items()}
            timings = time_interleaved(
                {name: (lambda m=module, x=x: m(x)) for name, module in forms.items()},
                repeats=reps,
                min_time=target_s,
                warmup=warmup,
                device=device,
            )
            for name, module in forms.items():
                latency = timings[name]
                adds = module.pooling_additions(tuple(x.shape)) if isinstance(module, StructuredConv2d) else 0
                rows.append(
                    {
                        "layer": layer.name,
                        "targeted": layer.targeted,
                        "batch": batch,
                        "form": name,
                        "ms": latency.median_ms,
                        "min_ms": latency.min_ms,
                        "spread": latency.spread,
                        "speedup": timings["dense"].median_ms / latency.median_ms,
                        "mac_ratio": macs["dense"] / macs[name],
                        "pool_adds_m": adds / 1e6,
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| layer | batch | form | ms | min ms | IQR | speed-up vs dense | MAC ratio | pool adds (M) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        adds = f"{r['pool_adds_m']:.2f}" if r["pool_adds_m"] else "-"
        lines.append(
            f"| {r['layer']} | {r['batch']} | {r['form']} | {r['ms']:.3f} | {r['min_ms']:.3f} | {r['spread']:.0%} "
            f"| {r['speedup']:.2f}x | {r['mac_ratio']:.2f}x | {adds} |"
        )
    return "\n".join(lines)


def missed_targets(rows: list[dict], device: str, layout: str) -> list[str]:
    """Issue target: on CPU, a structured layer with a MAC cut >= 2x is at least 1.3x faster than dense at batch 32
    (on the representative ImageNet-ResNet layers; the CIFAR-stage rows are there to explain whole-model latency)."""
    return [
        f"ops ({device}, {layout}): {r['layer']} batch {r['batch']}, {r['form']} (MAC cut {r['mac_ratio']:.2f}x) is "
        f"{r['speedup']:.2f}x the dense speed (target: at least 1.3x)"
        for r in rows
        if device == "cpu"
        and r["targeted"]
        and r["batch"] == 32
        and r["form"].startswith("structured c=")
        and r["mac_ratio"] >= 2.0
        and r["speedup"] < 1.3
    ]


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for inputs and weights")
    parser.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all", help="'all': CPU, and CUDA when available"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        parser.error("CUDA is not available")
    reps, warmup = (3, 1) if args.quick else (15, 3)

    parts, missed = [], []
    for device in devices:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            what = f"{torch.cuda.get_device_name(device)} (cudnn.benchmark, TF32 off by default)"
            target_s = 0.01
        else:
            what = f"CPU, {torch.get_num_threads()} threads"
            target_s = 0.02
        rows = run(device, args.channels_last, reps, warmup, target_s)
        missed += missed_targets(rows, device.type, "channels_last" if args.channels_last else "NCHW")
        parts.append(
            f"### {what}, float32, {'channels_last' if args.channels_last else 'NCHW'}\n\n"
            f"inference_mode forward; median of {reps} round-robin samples after {warmup} warm-up rounds. "
            "ms: median; IQR: interquartile range of the samples / median (noise). Speed-up (from medians) and "
            "MAC ratio are dense / form (2.00x = half); pool adds are the structured sum-pool's additions, which MAC "
            "counts leave out. The last three layers are the stages of the CIFAR ResNets (no per-layer target): at "
            "16-64 channels the convolution is too small for its MAC cut to show, so the sum-pool's or the depthwise "
            "pass's extra memory traffic cancels it.\n\n" + markdown(rows)
        )
    name = "ops_channels_last" if args.channels_last else "ops"
    title = "2b. Single layers: dense vs cheap forms" + (" (channels_last)" if args.channels_last else "")
    section = Section(name, title, "\n\n".join(parts), command(__spec__.name, argv), missed)
    section.save()
    return section


if __name__ == "__main__":
    main()
