"""Export of a converted or optimized model (:func:`export_model`: TorchScript, ``torch.export``
or ONNX), with the saved file's outputs checked against PyTorch's (:class:`ExportMismatchError`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._utils import _require_close

ExportFormat = Literal["onnx", "torchscript", "exported_program"]


class ExportMismatchError(ValueError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance."""


def _run_exported(path: Path, fmt: str, x: Tensor) -> Any:
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location=x.device)(x)
    if fmt == "exported_program":
        return torch.export.load(str(path)).module()(x)
    import onnxruntime  # noqa: PLC0415 - optional dependency

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return [torch.from_numpy(o) for o in outputs]


def export_model(
    model: nn.Module,
    example_input: Tensor,
    path: str | Path,
    format: ExportFormat = "onnx",
    check: bool = True,
    rtol: float = 1e-4,
) -> Path:
    """Export a (converted or optimized) model in eval mode and check the file's outputs against PyTorch's.

    Formats: ``"torchscript"`` (:func:`torch.jit.trace`, loaded with :func:`torch.jit.load`),
    ``"exported_program"`` (:func:`torch.export.export`, saved with :func:`torch.export.save`) and
    ``"onnx"`` (:func:`torch.onnx.export` with the dynamo exporter; needs the ``export`` extra:
    ``pip install lightning-cheapconv[export]``, and checks through onnxruntime on CPU). With
    ``check`` the saved file is loaded, run on ``example_input`` and compared (relative
    difference, see :func:`relative_difference`, at most ``rtol``); a larger difference raises
    :class:`ExportMismatchError`.

    Example::

        >>> report = optimize_for_inference(model, torch.randn(1, 3, 32, 32))
        >>> export_model(report.model, torch.randn(1, 3, 32, 32), "model.onnx")
        PosixPath('model.onnx')
    """
    path = Path(path)
    if format not in ("onnx", "torchscript", "exported_program"):
        raise ValueError(
            f"export_model: format={format!r}; valid formats are 'onnx', 'torchscript', 'exported_program'"
        )
    model = model.eval()
    with torch.inference_mode():
        expected = model(example_input)
    if format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, (example_input,))
        traced.save(str(path))
    elif format == "exported_program":
        program = torch.export.export(model, (example_input,))
        torch.export.save(program, str(path))
    else:
        try:
            import onnx  # noqa: F401, PLC0415
            import onnxscript  # noqa: F401, PLC0415
        except ImportError as err:
            raise ImportError(
                "export_model(format='onnx') needs onnx and onnxscript (and onnxruntime to check): "
                "pip install 'lightning-cheapconv[export]'"
            ) from err
        program = torch.onnx.export(model, (example_input,), dynamo=True, verbose=False, report=False)
        program.save(str(path))
    if check:
        if format == "onnx":
            try:
                import onnxruntime  # noqa: F401, PLC0415
            except ImportError:
                return path
        with torch.inference_mode():
            got = _run_exported(path, format, example_input)
        what = f"export_model: the {format} export of {type(model).__name__} differs from PyTorch"
        _require_close(got, expected, rtol, what, ExportMismatchError, f"; the file is at {path}")
    return path
