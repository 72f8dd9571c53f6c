"""Helpers that more than one part of :mod:`lightning_cheapconv.deploy` needs: output comparison
(:func:`relative_difference`), a model's device and dtype, tolerances, unique module lookup and a
forward pass that explains a rejected example input, and the input each layer sees."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

T = TypeVar("T")


def relative_difference(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` over all tensors of two (nested) outputs.

    The measure every exactness check of this package uses (0 means bitwise equal).

    Example::

        >>> relative_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
        0.2
    """
    got, want = tree_leaves(actual), tree_leaves(expected)
    got = [t for t in got if isinstance(t, Tensor)]
    want = [t for t in want if isinstance(t, Tensor)]
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return math.inf
    diff = scale = 0.0
    for a, b in zip(got, want, strict=True):
        if b.numel() == 0:
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        diff = max(diff, float((a64 - b64).abs().max()))
        scale = max(scale, float(b64.abs().max()))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def _require_close(
    actual: Any, expected: Any, rtol: float, what: str, error: type[Exception] = RuntimeError, after: str = ""
) -> float:
    """The :func:`relative_difference` of two outputs; above ``rtol`` raises ``error`` with
    ``"{what} by {diff} (relative; tolerance {rtol}){after}"``."""
    diff = relative_difference(actual, expected)
    if not diff <= rtol:
        raise error(f"{what} by {diff:.2e} (relative; tolerance {rtol:.0e}){after}")
    return diff


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` on ``reference``'s device, dtype and (for 4-D weights) memory format."""
    weight = getattr(reference, "weight", None)
    if not isinstance(weight, Tensor):
        weight = next(iter(reference.parameters()), None)
    if weight is None:
        return module
    module = module.to(device=weight.device, dtype=weight.dtype)
    if _channels_last(weight):
        module = module.to(memory_format=torch.channels_last)
    return module


def _tolerance(dtype: torch.dtype) -> float:
    """Whole-model agreement expected between a model and its optimized form in ``dtype``."""
    return {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-9}.get(dtype, 1e-4)


def _shape_text(shape: Sequence[int] | None) -> str:
    return "?" if shape is None else "×".join(str(d) for d in shape)


def _unique_modules(model: nn.Module, types: tuple[type, ...]) -> dict[str, nn.Module]:
    """First qualified name -> module, for each module object of ``types`` (shared modules once)."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, types) and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    return found


def _forward(model: nn.Module, x: Tensor, what: str = "optimize_for_inference") -> Any:
    try:
        with torch.inference_mode():
            return model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(
            f"{what}: the model does not accept an example input of shape {_shape_text(tuple(x.shape))} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass an input of the shape the "
            f"model expects, e.g. (batch, 3, 32, 32) for the CIFAR models"
        ) from err


def _first_inputs(
    model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module], keep: Callable[[Tensor], T]
) -> tuple[dict[str, T], Any]:
    """Run ``model`` once on ``x``; return ``keep(input)`` for the input each named module saw on its first
    call, and the model's output."""
    seen: dict[str, T] = {}
    handles = []
    for name, module in modules.items():

        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = keep(args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        output = _forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output
