"""``cheapconv-optimize``: choose the fastest form of a converted model's layers on this machine, and save it.

Usage::

    cheapconv-optimize run.ckpt --input-shape 32,3,32,32                       # a Lightning ImageClassifier checkpoint
    cheapconv-optimize weights.pt --arch resnet56 --num-classes 10 --input-shape 1,3,32,32 --device cuda
    cheapconv-optimize run.ckpt --input-shape 1,3,224,224 --dtype bfloat16 --channels-last --export torchscript
    cheapconv-optimize run.ckpt --input-shape 8,3,224,224 --runtime onnxruntime --export onnx
    cheapconv-optimize ghost.pt --arch resnet56 --original dense.pt --input-shape 32,3,32,32  # never slower than dense

It loads the checkpoint of a converted model (any stage: the structure is rebuilt from the
checkpoint's records with :func:`~lightning_cheapconv.restructure`), runs
:func:`~lightning_cheapconv.deploy.optimize_for_inference` on a random input of ``--input-shape``,
prints the per-layer table, and writes the optimized state dict (``--output``, default
``CHECKPOINT.optimized.pt`` beside the input). It restructures into a fresh model of the same
architecture: ``restructure(model, state); model.load_state_dict(state)`` (for a Lightning
checkpoint the keys keep the ``backbone.`` prefix, so ``ImageClassifier(arch).load_state_dict(state)``
works directly). ``--runtime onnxruntime`` measures every form in ONNX Runtime instead of PyTorch
(needs ``pip install 'lightning-cheapconv[export]'``); with ``--export onnx`` the ``.onnx`` file written
is then the very graph that was timed (checked against PyTorch). Bad input (missing file,
unparseable shape, a model without cheap layers, an input shape the model rejects, a runtime that
is not installed or cannot be combined with ``--compile``) exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .deploy.optimize import RUNTIMES

__all__ = ["main", "parse_input_shape", "load_converted_model"]

PROG = "cheapconv-optimize"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported_program": ".pt2"}


class UsageError(ValueError):
    """Bad input on the command line: reported in one line, exit status 2."""


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,32,32"`` (commas or ``x``) into a tuple of positive ints.

    Example::

        >>> parse_input_shape("1,3,32,32")
        (1, 3, 32, 32)
    """
    parts = [p.strip() for p in text.replace("x", ",").replace("×", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected comma-separated positive ints, e.g. 1,3,32,32") from None
    if len(shape) < 2 or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r}: expected at least 2 positive ints (batch first), e.g. 1,3,32,32")
    return shape


def _brief(err: BaseException, lines: int = 1) -> str:
    """An exception as one line: its first ``lines`` lines joined, and how many more there were."""
    text = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    more = f" (and {len(text) - lines} more)" if len(text) > lines else ""
    return "; ".join(text[:lines]) + more


def _is_lightning_checkpoint(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("state_dict"), dict)
        and ("hyper_parameters" in obj or "pytorch-lightning_version" in obj)
    )


def _infer_num_classes(arch: str, state: dict[str, Any]) -> int:
    """The classifier width of ``state`` for architecture ``arch`` (its last Linear layer's rows)."""
    from .models import get_model

    probe = get_model(arch, num_classes=10)
    linears = [name for name, m in probe.named_modules() if isinstance(m, nn.Linear)]
    for name in reversed(linears):
        weight = state.get(f"{name}.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    raise UsageError(f"cannot tell the number of classes of this {arch} state dict; pass --num-classes N")


def load_converted_model(
    path: str | Path, arch: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, str]:
    """Load the network of a checkpoint at any stage of conversion; returns it and its state-dict key prefix.

    A Lightning checkpoint of :class:`~lightning_cheapconv.ImageClassifier` is loaded with
    ``load_from_checkpoint`` (its restructure hook rebuilds converted layers) and its ``backbone``
    returned (prefix ``"backbone."``); pass ``arch`` when the backbone was an ``nn.Module``, not a
    name. A plain state dict (or a ``{"state_dict": ...}`` dict) needs ``arch`` (a
    :func:`~lightning_cheapconv.models.get_model` name); the model is built, restructured and loaded.

    Example::

        >>> model, prefix = load_converted_model("run.ckpt")
        >>> model, prefix = load_converted_model("weights.pt", arch="resnet56", num_classes=10)
    """
    from .checkpoint import restructure
    from .models import get_model
    from .module import ImageClassifier

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a usage error
        raise UsageError(f"{path}: cannot read it as a PyTorch checkpoint ({_brief(err)})") from err
    try:
        if _is_lightning_checkpoint(obj):
            hparams = obj.get("hyper_parameters") or {}
            kwargs: dict[str, Any] = {}
            if not isinstance(hparams.get("backbone"), str):
                if arch is None:
                    raise UsageError(
                        f"{path}: the checkpoint's backbone was an nn.Module (not saved by name); pass --arch NAME"
                    )
                classes = num_classes or hparams.get("num_classes") or 10
                kwargs["backbone"] = get_model(arch, num_classes=classes)
            module = ImageClassifier.load_from_checkpoint(path, map_location="cpu", **kwargs)
            return module.backbone, "backbone."
        if not isinstance(obj, dict):
            raise UsageError(f"{path}: expected a state dict or a Lightning checkpoint, got a {type(obj).__name__}")
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
        prefix = "backbone." if state and all(str(k).startswith("backbone.") for k in state) else ""
        state = {k[len(prefix) :]: v for k, v in state.items()}
        if arch is None:
            raise UsageError(f"{path}: a plain state dict needs --arch NAME (and --num-classes N)")
        model = get_model(arch, num_classes=num_classes or _infer_num_classes(arch, state))
        restructure(model, state)
        model.load_state_dict(state)
        return model, prefix
    except UsageError:
        raise
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise UsageError(f"{path}: cannot load it: {_brief(err, lines=4)}") from err


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Time the forms of a converted model's cheap layers on this machine, keep the fastest, fold "
        "BatchNorm, print the table and write the optimized state dict.",
    )
    parser.add_argument("checkpoint", type=Path, help="Lightning .ckpt of ImageClassifier, or a state dict (.pt)")
    parser.add_argument("--input-shape", required=True, help="input shape, batch first, e.g. 1,3,32,32")
    parser.add_argument("--device", default="cpu", help="device to optimize for: cpu (default), cuda, cuda:1")
    parser.add_argument("--arch", default=None, help="model name for get_model (plain state dicts)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the model (default: inferred)")
    parser.add_argument("--output", type=Path, default=None, help="where to write (default CHECKPOINT.optimized.pt)")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per form (median; default 7)")
    parser.add_argument("--min-time", type=float, default=0.005, help="seconds per sample at least (default 0.005)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="precision (default float32)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and input")
    parser.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers")
    parser.add_argument(
        "--original",
        type=Path,
        default=None,
        help="checkpoint of the dense model the converted one came from (same --arch): compared as a whole, "
        "BatchNorm folded, and returned if it is faster",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time the whole-model candidates under torch.compile (inductor, freezing), as you will run them",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="pytorch",
        help="where to measure the forms: pytorch (default; eager, or compiled with --compile) or onnxruntime "
        "(each form exported to ONNX and timed in an ONNX Runtime session)",
    )
    parser.add_argument(
        "--export",
        action="append",
        choices=sorted(_EXPORT_SUFFIX),
        default=[],
        help="also export the optimized model (repeatable), next to --output",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cheapconv-optimize``; returns the exit status (2 for bad input).

    Example::

        >>> main(["weights.pt", "--arch", "resnet56", "--input-shape", "1,3,32,32"])
        0
    """
    from .deploy import export_model, optimize_for_inference
    from .deploy.onnx_runtime import check_onnx_file

    args = _parser().parse_args(argv)
    try:
        shape = parse_input_shape(args.input_shape)
        if args.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            raise UsageError(f"--device {args.device!r}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
        model, prefix = load_converted_model(args.checkpoint, args.arch, args.num_classes)
        dtype = _DTYPES[args.dtype]
        model = model.to(device=device, dtype=dtype).eval()
        original = None
        if args.original is not None:
            original, _ = load_converted_model(args.original, args.arch, args.num_classes)
            original = original.to(device=device, dtype=dtype).eval()
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        if args.channels_last:
            if len(shape) != 4:
                raise UsageError(f"--channels-last needs a 4-D --input-shape, got {args.input_shape}")
            model = model.to(memory_format=torch.channels_last)
            example = example.contiguous(memory_format=torch.channels_last)
            if original is not None:
                original = original.to(memory_format=torch.channels_last)
        try:
            report = optimize_for_inference(
                model,
                example,
                device,
                repeats=args.repeats,
                min_time=args.min_time,
                fold_bn=not args.no_fold_bn,
                compile=args.compile,
                runtime=args.runtime,
                original=original,
            )
        except (ValueError, ImportError) as err:
            raise UsageError(str(err)) from None
    except UsageError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2

    report.print()
    output = args.output or args.checkpoint.with_name(args.checkpoint.stem + ".optimized.pt")
    state = {prefix + key: value for key, value in report.model.state_dict().items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    print(f"wrote {output} (load: restructure(model, state); model.load_state_dict(state))")
    for fmt in args.export:
        target = output.with_name(output.name.removesuffix(".pt") + _EXPORT_SUFFIX[fmt])
        if fmt == "onnx" and report.onnx_model is not None:
            target.write_bytes(report.onnx_model)  # the graph that was timed in ONNX Runtime
            check_onnx_file(target, report.model, example)
            print(f"exported {fmt} to {target}: the graph timed in ONNX Runtime (outputs checked against PyTorch)")
            continue
        export_model(report.model, example, target, format=fmt)
        print(f"exported {fmt} to {target} (outputs checked against PyTorch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
