"""One recorded call of a model's ``forward``: the positional and keyword arguments it received.

A network's input is not always "the first tensor of the batch": batches may be dicts (with the label first),
and ``forward`` may take several arguments. What the callbacks count MACs on and calibrate with is exactly
what ``forward`` received during a training step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelCall", "as_calls", "tensors_in"]


def _map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, Mapping):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def tensors_in(value: Any) -> Iterator[Tensor]:
    """Every tensor in ``value``: a tensor, or lists, tuples and dicts of them, depth first."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from tensors_in(v)


def _is_example_list(value: Any) -> bool:
    """A list or tuple with one item per example: of dicts (torchvision's detection targets), or of 3-D tensors
    (images ``(C, H, W)`` of any size, torchvision's detection and segmentation input)."""
    if not isinstance(value, (list, tuple)) or hasattr(value, "_fields") or not value:
        return False
    return all(isinstance(v, Mapping) for v in value) or all(isinstance(v, Tensor) and v.dim() == 3 for v in value)


@dataclass(frozen=True)
class ModelCall:
    """The arguments of one ``model(*args, **kwargs)`` call; tensors anywhere inside (lists, dicts) are
    the batch's. Call it on a model to repeat the call.

    Example::

        >>> call = ModelCall((torch.randn(8, 3, 32, 32),))
        >>> call.first(1).batch_size, call(model).shape
        (1, torch.Size([8, 10]))
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def run(self, model: nn.Module, argument: str) -> Any:
        """``self(model)``, with a failure turned into a ``ValueError`` naming ``argument`` and the input shapes.

        Raises:
            ValueError: ``"{argument} with input shapes [...] does not run through {Model}: {error}"``, chained
                to the original error.
        """
        try:
            return self(model)
        except Exception as err:
            shapes = [tuple(t.shape) for t in self.tensors()]
            raise ValueError(
                f"{argument} with input shapes {shapes} does not run through {type(model).__name__}: "
                f"{type(err).__name__}: {err}"
            ) from err

    def _map(self, fn: Callable[[Tensor], Any]) -> ModelCall:
        return ModelCall(tuple(_map_tensors(a, fn) for a in self.args), _map_tensors(self.kwargs, fn))

    @property
    def batch_size(self) -> int | None:
        """The number of examples: the length of the first argument when it is a list of examples (dicts, or
        ``(C, H, W)`` images as torchvision's detection models take them), else the length of the first dimension
        of the first tensor argument (``None`` without tensors)."""
        leading = next(iter((*self.args, *self.kwargs.values())), None)
        if _is_example_list(leading):
            return len(leading)
        first = next(self.tensors(), None)
        return None if first is None or first.dim() == 0 else first.shape[0]

    def tensors(self) -> Iterator[Tensor]:
        yield from tensors_in(self.args)
        yield from tensors_in(self.kwargs)

    def detached(self) -> ModelCall:
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str, floating_dtype: torch.dtype | None = None) -> ModelCall:
        """Tensors moved to ``device``; floating-point ones also cast to ``floating_dtype`` when given."""
        return self._map(
            lambda t: (
                t.to(device, floating_dtype) if floating_dtype is not None and t.is_floating_point() else t.to(device)
            )
        )

    def first(self, n: int) -> ModelCall:
        """The call on the first ``n`` examples (copies): lists of examples keep their first ``n`` items, tensors
        whose first dimension is the batch are sliced (see :attr:`batch_size`)."""
        size = self.batch_size

        def cut(value: Any) -> Any:
            if _is_example_list(value) and len(value) == size:
                return type(value)(_map_tensors(v, torch.clone) for v in value[:n])
            if isinstance(value, Tensor):
                return (value[:n] if size is not None and value.dim() > 0 and value.shape[0] == size else value).clone()
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                return type(value)(*(cut(v) for v in value))
            if isinstance(value, (list, tuple)):
                return type(value)(cut(v) for v in value)
            if isinstance(value, Mapping):
                return {k: cut(v) for k, v in value.items()}
            return value

        return ModelCall(tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()})


def as_calls(inputs: Tensor | ModelCall | Sequence[Tensor | ModelCall]) -> list[ModelCall]:
    """``inputs`` as a list of calls: a tensor is one call with that one positional argument."""
    if isinstance(inputs, (Tensor, ModelCall)):
        inputs = [inputs]
    return [x if isinstance(x, ModelCall) else ModelCall((x,)) for x in inputs]
