"""Compiling a (converted or optimized) model for inference: :func:`compile_for_inference`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import _device_dtype, _forward, _require_close, _tolerance

# Every form of one architecture is a new compilation of the same forward code; dynamo's default
# limit (8) would silently leave the later ones eager.
_RECOMPILE_LIMIT = 64


def compile_for_inference(model: nn.Module, example_input: Tensor, rtol: float | None = None) -> Callable[..., Any]:
    """``torch.compile`` for deployment: compiled now on ``example_input`` and checked against eager.

    Inductor with ``freezing`` (weights become constants: BatchNorm folds into the convs, CPU convs
    get prepacked weights, and elementwise work such as a structured layer's sum-pool fuses with its
    neighbours) and static shapes (inputs shaped like ``example_input``). The model is put in eval
    mode; because its weights are frozen into the compiled code, later changes to them are not
    seen. Call the result under :func:`torch.inference_mode`. On a CPU inductor needs a C++
    compiler; on CUDA, triton.

    Raises:
        RuntimeError: compilation failed, or the compiled outputs differ from eager ones by more than
            ``rtol`` (relative; default 1e-4 in float32, 2e-2 in float16, 1e-1 in bfloat16).

    Example::

        >>> report = optimize_for_inference(model, x, compile=True)
        >>> runner = compile_for_inference(report.model, x)
        >>> with torch.inference_mode():
        ...     logits = runner(x)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_for_inference expects an nn.Module, got {type(model).__name__}")
    model.eval()
    rtol = _tolerance(_device_dtype(model)[1]) if rtol is None else rtol
    expected = _forward(model, example_input, "compile_for_inference")
    runner = torch.compile(model, dynamic=False)
    limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    try:
        with (
            torch.inference_mode(),
            torch._inductor.config.patch(freezing=True),
            torch._dynamo.config.patch(recompile_limit=limit),
        ):
            got = runner(example_input)
    except Exception as err:  # dynamo and inductor raise many types; each means "cannot compile here"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(
            f"compile_for_inference: torch.compile failed on {type(model).__name__} ({type(err).__name__}: {first}); "
            f"on a CPU inductor needs a C++ compiler (g++), on CUDA triton"
        ) from err
    _require_close(
        got,
        expected,
        rtol,
        f"compile_for_inference: the compiled {type(model).__name__} differs from its eager outputs",
    )
    return runner
