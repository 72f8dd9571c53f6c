"""Export of a converted or optimized model (:func:`export_model`: TorchScript, ``torch.export``
or ONNX), with the saved file's outputs checked against PyTorch's (:class:`ExportMismatchError`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._utils import _require_close

ExportFormat = Literal["onnx", "torchscript", "exported_program"]
# The file suffixes each format is known by; a path with another format's suffix (or an unknown one) is refused.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "onnx": (".onnx",),
    "torchscript": (".pt", ".pth", ".ts", ".torchscript"),
    "exported_program": (".pt2",),
}


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
    dynamic_batch: bool = False,
) -> Path:
    """Export a (converted or optimized) model in eval mode and check the file's outputs against PyTorch's.

    Formats: ``"torchscript"`` (:func:`torch.jit.trace`, loaded with :func:`torch.jit.load`),
    ``"exported_program"`` (:func:`torch.export.export`, saved with :func:`torch.export.save`) and
    ``"onnx"`` (:func:`torch.onnx.export` with the dynamo exporter; needs the ``export`` extra:
    ``pip install lightning-cheapconv[export]``, and checks through onnxruntime on CPU). With
    ``check`` the saved file is loaded, run on ``example_input`` and compared (relative
    difference, see :func:`relative_difference`, at most ``rtol``); a larger difference raises
    :class:`ExportMismatchError`.

    Shapes are those of ``example_input``: an ONNX file or exported program takes that batch size only,
    unless ``dynamic_batch=True`` (dimension 0 is then symbolic, and the check also runs a batch of one
    more). The path's suffix must be one of the format's (:data:`SUFFIXES`, e.g. ``.onnx``, ``.pt``,
    ``.pt2``), so that a file is what its name says; otherwise ``ValueError`` names both.

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
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES[format]:
        meant = next((f for f, known in SUFFIXES.items() if suffix in known), None)
        hint = f" (that suffix is for format={meant!r})" if meant else ""
        raise ValueError(
            f"export_model: path {str(path)!r} has suffix {suffix!r}{hint}; format={format!r} writes "
            f"{' or '.join(SUFFIXES[format])}"
        )
    model = model.eval()
    with torch.inference_mode():
        expected = model(example_input)
    batch = {0: torch.export.Dim("batch")} if dynamic_batch else None
    if format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, (example_input,))
        traced.save(str(path))
    elif format == "exported_program":
        program = torch.export.export(model, (example_input,), dynamic_shapes=(batch,) if batch else None)
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
        shapes = (batch,) if batch else None
        program = torch.onnx.export(
            model, (example_input,), dynamo=True, verbose=False, report=False, dynamic_shapes=shapes
        )
        program.save(str(path))
    if check:
        if format == "onnx":
            try:
                import onnxruntime  # noqa: F401, PLC0415
            except ImportError:
                return path
        inputs = [example_input]
        if dynamic_batch:
            inputs.append(torch.cat([example_input, example_input[:1]]))
        what = f"export_model: the {format} export of {type(model).__name__} differs from PyTorch"
        for x in inputs:
            with torch.inference_mode():
                want = expected if x is example_input else model(x)
                got = _run_exported(path, format, x)
            _require_close(got, want, rtol, what, ExportMismatchError, f"; the file is at {path}")
    return path
