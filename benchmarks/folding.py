"""BatchNorm folding into Ghost modules: what it saves in PyTorch eager and ONNX Runtime, and the exported nodes.

Run ``python -m benchmarks.folding`` (``--quick``: fewer repetitions, ResNet-18 at 112x112). For Ghost CIFAR
ResNet-20 and ResNet-56 (batch 32, 32x32) and a Ghost torchvision ResNet-18 (batch 8, 224x224), with
random weights and BatchNorm statistics (timing does not depend on them):

- ``dense, BN folded``: the original model with :func:`~lightning_cheapconv.deploy.fold_batchnorm` (the baseline:
  every runtime folds BatchNorm into a dense conv);
- ``ghost, BN kept``: ``convert_to_ghost(ratio=2, dw_size=3)`` with inherited weights (permuted outputs),
  :func:`~lightning_cheapconv.deploy.fold_ghost_permutations`, and BatchNorm folded only into the dense convs, as
  ``fold_batchnorm`` did before it could fold into Ghost modules (the Ghost fold is switched off here);
- ``ghost, BN folded``: the same Ghost model with ``fold_batchnorm``: every BatchNorm after a Ghost module folds,
  into a :class:`~lightning_cheapconv.nn.FusedGhostConv2d` where the depthwise conv must not see the shift.

Each form is exported with ``torch.onnx.export(dynamo=True)`` (its outputs checked against eager), its graph's
BatchNormalization, Concat, Gather, Slice and Add nodes counted, and it is timed in eager PyTorch and in an
ONNX Runtime ``InferenceSession`` (CPU, all graph optimizations), with ``--threads`` intra-op threads in both,
all six interleaved round-robin (:func:`~lightning_cheapconv.deploy.time_interleaved`), median of the
repetitions. Speed-up is dense BN-folded / form in the same runtime (above 1.00x: faster than dense).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torchvision
from torch import nn

import lightning_cheapconv.deploy.folding as folding
from lightning_cheapconv import convert_to_ghost, get_model
from lightning_cheapconv.deploy import fold_batchnorm, fold_ghost_permutations, relative_difference, time_interleaved

from .common import Section, command, randomize_bn

NODES = ("BatchNormalization", "Concat", "Gather", "Slice", "Add")
FORMS = ("dense, BN folded", "ghost, BN kept", "ghost, BN folded")


def _forms(build: Callable[[], nn.Module], x: torch.Tensor) -> tuple[dict[str, nn.Module], str]:
    torch.manual_seed(0)
    base = randomize_bn(build())
    dense = copy.deepcopy(base)
    fold_batchnorm(dense, x[:1])
    ghost = copy.deepcopy(base)
    convert_to_ghost(ghost, ratio=2, dw_size=3)
    fold_ghost_permutations(ghost.eval(), x[:1])
    kept = copy.deepcopy(ghost)
    with mock.patch.object(folding, "_fuse_ghost", lambda g, bn: (None, "switched off by the benchmark")):
        fold_batchnorm(kept, x[:1])
    folded = copy.deepcopy(ghost)
    folds = fold_batchnorm(folded, x[:1])
    fused = sum(type(m).__name__ == "FusedGhostConv2d" for m in folded.modules())
    note = f"{sum(f.applied for f in folds)}/{len(folds)} BatchNorms folded, {fused} into FusedGhostConv2d"
    return {"dense, BN folded": dense, "ghost, BN kept": kept, "ghost, BN folded": folded}, note


def _onnx(model: nn.Module, x: torch.Tensor, path: Path, threads: int) -> tuple[Callable[[], object], Counter]:
    import onnx  # noqa: PLC0415 - optional (export extra)
    import onnxruntime  # noqa: PLC0415

    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    nodes = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.inference_mode():
        expected = model(x)
    got = torch.from_numpy(session.run(None, feed)[0])
    if relative_difference(got, expected) > 1e-4:
        raise RuntimeError(f"{path.name}: ONNX Runtime output differs from eager")
    return (lambda: session.run(None, feed)), nodes


MODELS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "CIFAR ResNet-20": (lambda: get_model("resnet20", num_classes=10), 32, 32),
    "CIFAR ResNet-56": (lambda: get_model("resnet56", num_classes=10), 32, 32),
    "ResNet-18": (lambda: torchvision.models.resnet18(num_classes=1000), 8, 224),
}


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; ResNet-18 at 112x112")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads in PyTorch and ONNX Runtime")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per form (default 15, quick 5)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    torch.set_num_threads(args.threads)
    header = (
        "| model, batch | form | ORT ms | ORT speed-up | eager ms | eager speed-up | "
        + " | ".join(NODES)
        + " |\n|---|---|---:|---:|---:|---:|"
        + "---:|" * len(NODES)
    )
    rows, notes = [header], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            build, batch, size = MODELS[name]
            if args.quick and size == 224:
                size = 112
            x = torch.randn(batch, 3, size, size)
            models, note = _forms(build, x)
            notes.append(f"{name}: {note}.")
            calls, nodes = {}, {}
            for form, model in models.items():
                run, nodes[form] = _onnx(model, x, Path(tmp) / f"{form}.onnx", args.threads)
                calls[f"ort/{form}"] = run
                calls[f"eager/{form}"] = lambda model=model, x=x: model(x)
            latency = time_interleaved(calls, repeats=repeats, min_time=0.2, warmup=2)
            ms = {key: lat.median_ms for key, lat in latency.items()}
            for form in FORMS:
                ort, eager = ms[f"ort/{form}"], ms[f"eager/{form}"]
                counts = " | ".join(str(nodes[form][op]) for op in NODES)
                rows.append(
                    f"| {name}, {batch}, {size}² | {form} | {ort:.2f} | "
                    f"{ms['ort/dense, BN folded'] / ort:.2f}x | {eager:.2f} | "
                    f"{ms['eager/dense, BN folded'] / eager:.2f}x | {counts} |"
                )
    body = (
        "\n".join(rows)
        + "\n\nSpeed-up: dense with BatchNorm folded / form, in the same runtime (ONNX Runtime CPU provider, or eager "
        f"PyTorch), {args.threads} threads, median of {repeats} interleaved repetitions. Node counts: the exported "
        "ONNX graph (dynamo exporter), before ONNX Runtime's own optimizations. " + " ".join(notes)
    )
    section = Section("folding", "2e. BatchNorm folded into Ghost modules", body, command(__spec__.name, argv))
    section.save()
    return section


if __name__ == "__main__":
    main()
