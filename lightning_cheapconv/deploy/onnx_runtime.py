"""Timing models in ONNX Runtime: :func:`onnx_session` (export in memory with the dynamo exporter, open an
``InferenceSession``), :func:`onnx_runner` (a session as a callable on a fixed input) and
:func:`time_onnxruntime` (several models against each other, interleaved by
:func:`~lightning_cheapconv.deploy.time_interleaved`).

Needs the ``export`` extra (``onnx``, ``onnxscript``, ``onnxruntime``):
``pip install 'lightning-cheapconv[export]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._utils import _device_dtype, _forward, _require_close, _tolerance
from .timing import Latency, time_interleaved

INSTALL_HINT = "pip install 'lightning-cheapconv[export]'"


def require_onnxruntime(what: str = "runtime='onnxruntime'") -> Any:
    """Import and return ``onnxruntime``, or raise ``ImportError`` naming the missing package and the extra.

    Example::

        >>> ort = require_onnxruntime()
        >>> "CPUExecutionProvider" in ort.get_available_providers()
        True
    """
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as err:
            raise ImportError(
                f"{what} needs onnx, onnxscript and onnxruntime ({name} is not installed): {INSTALL_HINT}"
            ) from err
    import onnxruntime  # noqa: PLC0415 - optional dependency

    return onnxruntime


def onnx_providers(device: torch.device | str) -> list[Any]:
    """ONNX Runtime execution providers for ``device``: ``CUDAExecutionProvider`` (on that GPU) then CPU where the
    device is CUDA and the installed onnxruntime has the CUDA provider (``onnxruntime-gpu``), else CPU only.

    Example::

        >>> onnx_providers("cpu")
        ['CPUExecutionProvider']
    """
    ort = require_onnxruntime()
    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _export(model: nn.Module, example_input: Tensor) -> bytes:
    """``model`` exported by :func:`torch.onnx.export` (``dynamo=True``) on ``example_input``, serialized."""
    try:
        program = torch.onnx.export(model.eval(), (example_input,), dynamo=True, verbose=False, report=False)
    except Exception as err:  # the exporter raises many types; each means "cannot export this model"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(
            f"onnx_session: torch.onnx.export(dynamo=True) failed on {type(model).__name__} "
            f"({type(err).__name__}: {first})"
        ) from err
    return program.model_proto.SerializeToString()


def _open(graph: bytes | str, device: torch.device) -> Any:
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    # Sessions timed against each other in one process: idle threads spinning after one session's run slowed the
    # next candidate (benchmarks/pooling.py). Not spinning costs graphs of many small ops most, so it does not
    # flatter the cheap forms.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(graph, options, providers=onnx_providers(device))
    except Exception as err:  # onnxruntime raises its own exception types
        raise RuntimeError(f"onnx_session: ONNX Runtime cannot load the exported graph: {err}") from err


def onnx_session(model: nn.Module, example_input: Tensor, device: torch.device | str | None = None) -> Any:
    """Export ``model`` (eval mode) on ``example_input`` to ONNX in memory and open an ONNX Runtime session on it.

    The export is :func:`torch.onnx.export` with ``dynamo=True`` (static shapes: the session takes inputs
    shaped like ``example_input``); the session runs with every graph optimization
    (``ORT_ENABLE_ALL``: BatchNorm folding, conv+activation fusion, ...) and
    ``intra_op_num_threads = torch.get_num_threads()``, on the providers of :func:`onnx_providers`
    for ``device`` (default: the model's device).

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is not installed.
        RuntimeError: the model cannot be exported, or ONNX Runtime cannot load the graph.

    Example::

        >>> session = onnx_session(model, torch.randn(1, 3, 32, 32))
        >>> logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    """
    require_onnxruntime()
    device = torch.device(device) if device is not None else _device_dtype(model)[0]
    return _open(_export(model, example_input), device)


def onnx_runner(
    model: nn.Module, example_input: Tensor, device: torch.device | str | None = None, rtol: float | None = None
) -> Callable[[], list[Tensor]]:
    """A callable that runs ``model`` in ONNX Runtime on ``example_input`` (fixed), checked against eager first.

    The input is converted once (to a contiguous numpy array; on the CUDA provider it is placed on the
    GPU once and bound with IO binding, outputs stay on the GPU), so a call times the session's run only.
    ``runner.outputs()`` returns the outputs as CPU tensors, ``runner.graph`` the serialized ONNX model that
    runs (write it to a ``.onnx`` file to deploy exactly what was timed) and ``runner.session`` the session.

    Raises:
        ImportError, RuntimeError: as :func:`onnx_session`; ``RuntimeError`` also when ONNX Runtime's
            outputs differ from eager PyTorch's by more than ``rtol`` (relative; default by dtype,
            1e-4 in float32).
        ValueError: ``example_input`` is bfloat16 (numpy has no bfloat16).

    Example::

        >>> run = onnx_runner(model, torch.randn(8, 3, 32, 32))
        >>> time_interleaved({"ort": run}, repeats=5)["ort"].median_ms
    """
    if example_input.dtype == torch.bfloat16:
        raise ValueError(
            "onnx_runner: example_input is bfloat16, which numpy (and so the ONNX Runtime Python API) cannot hold; "
            "use float32 or float16"
        )
    ort = require_onnxruntime()
    device = torch.device(device) if device is not None else _device_dtype(model)[0]
    graph = _export(model, example_input)
    session = _open(graph, device)
    name = session.get_inputs()[0].name
    array = np.ascontiguousarray(example_input.detach().cpu().numpy())
    if "CUDAExecutionProvider" in session.get_providers():
        index = device.index if device.index is not None else torch.cuda.current_device()
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", index))
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda", index)

        def run() -> Any:
            return session.run_with_iobinding(binding)

        def outputs() -> list[Tensor]:
            return [torch.from_numpy(o) for o in binding.copy_outputs_to_cpu()]
    else:
        feed = {name: array}

        def run() -> Any:
            return session.run(None, feed)

        def outputs() -> list[Tensor]:
            return [torch.from_numpy(o) for o in session.run(None, feed)]

    expected = _forward(model, example_input, "onnx_runner")
    rtol = _tolerance(_device_dtype(model)[1]) if rtol is None else rtol
    run()
    _require_close(
        outputs(), expected, rtol, f"onnx_runner: ONNX Runtime's outputs of {type(model).__name__} differ from eager"
    )
    run.outputs = outputs  # type: ignore[attr-defined]
    run.session = session  # type: ignore[attr-defined]
    run.graph = graph  # type: ignore[attr-defined]
    return run


def time_onnxruntime(
    models: Mapping[str, nn.Module],
    example_input: Tensor,
    repeats: int = 7,
    min_time: float = 0.005,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Latency]:
    """Time models against each other in ONNX Runtime: each exported and checked by :func:`onnx_runner`, then
    sampled round-robin by :func:`~lightning_cheapconv.deploy.time_interleaved` (median of ``repeats``).

    Example::

        >>> t = time_onnxruntime({"dense": dense, "ghost": ghost}, torch.randn(8, 3, 224, 224))
        >>> t["dense"].median_ms / t["ghost"].median_ms      # speed-up in ONNX Runtime
    """
    runners = {name: onnx_runner(model, example_input, device) for name, model in models.items()}
    return time_interleaved(runners, repeats, min_time, warmup, device)


def check_onnx_file(path: str | Path, model: nn.Module, example_input: Tensor, rtol: float | None = None) -> float:
    """Run the ONNX file at ``path`` in ONNX Runtime (CPU) on ``example_input`` and compare with ``model`` in eager
    PyTorch; returns the relative difference.

    Raises:
        RuntimeError: the outputs differ by more than ``rtol`` (relative; default by dtype, 1e-4 in float32).

    Example::

        >>> Path("model.onnx").write_bytes(report.onnx_model)
        >>> check_onnx_file("model.onnx", report.model, x) < 1e-4
        True
    """
    session = _open(str(path), torch.device("cpu"))
    array = np.ascontiguousarray(example_input.detach().cpu().numpy())
    got = [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: array})]
    rtol = _tolerance(_device_dtype(model)[1]) if rtol is None else rtol
    expected = _forward(model, example_input, "check_onnx_file")
    return _require_close(got, expected, rtol, f"check_onnx_file: {path} differs from eager {type(model).__name__}")
