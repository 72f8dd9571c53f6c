"""Peak memory of weight inheritance on real activations: ``convert_to_ghost`` of torchvision ResNet-50 with a
calibration batch, and the activation-space fit of its layer with the largest output on its own.

Run ``python -m benchmarks.memory`` (``--quick`` for 4 images instead of 32). CPU, 2 threads, fp32, random weights
and random 224x224 images. Memory is the growth of the process's *peak resident set size*
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: no tracemalloc, which does not see torch's allocations) over the
call, each measurement in a fresh Python process after the model and the inputs exist, so library loading and the
model's own weights are not counted. The section is written to ``benchmarks/results/memory.md`` and spliced into
BENCHMARKS.md in place of an earlier version of itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_cheapconv import convert_to_ghost
from lightning_cheapconv.convert import capture_inputs, select_layers
from lightning_cheapconv.inherit import fit_ghost_from_activations

from .common import Section, command

TITLE = "5. Peak memory of weight inheritance on activations"
OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
MB = 1e6
# What the fit held before positions were subsampled ahead of gathering neighbourhoods: F.unfold of the whole
# output (d² = 9 copies), its permuted copy (9 more) and the flattened targets (1): 19 times the layer's output.
UNFOLD_FACTOR = 19


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _largest_output(model: nn.Module, images: torch.Tensor, targets: list[str]) -> tuple[str, tuple, tuple]:
    """The target conv with the largest output for ``images``: its name, input shape and output shape."""
    shapes: dict[str, tuple[tuple, tuple]] = {}

    def record(_module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
        shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))

    handles = [
        model.get_submodule(name).register_forward_hook(functools.partial(record, name=name)) for name in targets
    ]
    with torch.no_grad():
        model.eval()(images[:1])
    for handle in handles:
        handle.remove()
    name = max(shapes, key=lambda n: torch.Size(shapes[n][1]).numel())
    batch = len(images)
    return name, (batch, *shapes[name][0][1:]), (batch, *shapes[name][1][1:])


def _child(kind: str, images: int) -> dict:
    """One measurement in this (fresh) process; returns the numbers as a dict."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    calibration = torch.randn(images, 3, 224, 224)
    targets = [p.name for p in select_layers(model, "ghost") if p.action == "convert"]
    name, in_shape, out_shape = _largest_output(model, calibration, targets)
    result = {"layer": name, "input_shape": in_shape, "output_shape": out_shape, "targets": len(targets)}
    if kind == "fit":
        conv, layer_input = model.get_submodule(name), torch.randn(in_shape)
        fit_ghost_from_activations(conv, layer_input[:1, :, :8, :8], 2, 3)  # load kernels first
        before = _peak_bytes()
        start = time.perf_counter()
        fit_ghost_from_activations(conv, layer_input, 2, 3)
    elif kind == "capture":
        before = _peak_bytes()
        start = time.perf_counter()
        inputs = capture_inputs(model, calibration, targets)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs.values()}
        result["captured_bytes"] = sum(storages.values())
    else:
        before = _peak_bytes()
        start = time.perf_counter()
        conversion = convert_to_ghost(model, calibration=calibration)
        result["converted"] = len(conversion.changes)
    result["seconds"] = time.perf_counter() - start
    result["growth_bytes"] = _peak_bytes() - before
    return result


def _measure(kind: str, images: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", kind, "--images", str(images)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _splice(markdown: str) -> None:
    """Put this section into BENCHMARKS.md: replace its earlier version, or append it; other sections stay as is."""
    text = OUTPUT.read_text() if OUTPUT.exists() else ""
    pattern = re.compile(rf"^## {re.escape(TITLE)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: markdown + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + markdown
    OUTPUT.write_text(text)


def main(argv: list[str] | None = None) -> Section | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="calibration images (224x224)")
    parser.add_argument("--quick", action="store_true", help="4 images: a smoke run, not for publishing")
    parser.add_argument("--child", choices=["convert", "fit", "capture"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 4
    if args.child:
        print(json.dumps(_child(args.child, args.images)))
        return None
    convert, fit, capture = (_measure(kind, args.images) for kind in ("convert", "fit", "capture"))
    out_shape = "x".join(str(d) for d in fit["output_shape"])
    output_bytes = torch.Size(fit["output_shape"]).numel() * 4
    rows = [
        "| measured call | peak RSS growth (MB) | x the largest layer output | seconds |",
        "|---|---|---|---|",
        f"| `convert_to_ghost(resnet50(), calibration=<{args.images}x3x224x224>)` ({convert['converted']} layers) "
        f"| {convert['growth_bytes'] / MB:,.0f} | {convert['growth_bytes'] / output_bytes:.1f} "
        f"| {convert['seconds']:.1f} |",
        f"| of which `capture_inputs` (the {capture['targets']} target layers' inputs, held for the fits) "
        f"| {capture['growth_bytes'] / MB:,.0f} | {capture['growth_bytes'] / output_bytes:.1f} "
        f"| {capture['seconds']:.1f} |",
        f"| `fit_ghost_from_activations` on `{fit['layer']}` alone (output {out_shape}) "
        f"| {fit['growth_bytes'] / MB:,.0f} | {fit['growth_bytes'] / output_bytes:.1f} | {fit['seconds']:.1f} |",
    ]
    body = (
        f"CPU, 2 threads, fp32, random weights and images. Growth of the peak resident set size "
        f"(`ru_maxrss`) over the call, in a fresh process after the model and inputs exist. The largest target "
        f"output is `{fit['layer']}`'s, {out_shape} fp32 = {output_bytes / MB:,.0f} MB; the captured layer inputs "
        f"come to {capture['captured_bytes'] / MB:,.0f} MB (unique storages). The activation fit now draws its "
        f"at most 16,384 positions before gathering their 3x3 neighbourhoods; unfolding the whole map first held "
        f"about {UNFOLD_FACTOR}x the output ({UNFOLD_FACTOR * output_bytes / MB:,.0f} MB for this layer, computed "
        f"from the shapes, not measured).\n\n" + "\n".join(rows) + "\n"
    )
    section = Section("memory", TITLE, body, command(__spec__.name, argv))
    section.save()
    _splice(section.markdown())
    return section


if __name__ == "__main__":
    main()
