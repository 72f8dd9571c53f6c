"""Weights used outside their layer, found before a conversion replaces the layer.

A converted layer's ``weight`` and ``bias`` leave the model with it. Code that reads them elsewhere — a tied
autoencoder whose decoder calls ``F.conv_transpose2d(z, self.enc.weight)``, a second module registering the same
``Parameter`` — then fails after the swap (``AttributeError``) or silently keeps using the old tensor. So such layers
are found first and skipped (:func:`~lightning_cheapconv.convert.select_layers` does it for every plan):

1. statically, a parameter registered under a name outside the layer (``named_parameters(remove_duplicate=False)``);
2. with an example input, by one forward pass under a :class:`~torch.overrides.TorchFunctionMode` that sees every
   torch function call: a call that takes a target's parameter and returns a tensor (reading ``.shape`` or
   ``.dtype`` does not count) while the innermost running module is not that layer is a use outside it;
3. without an input, in a :func:`torch.fx` trace of the model (``get_attr`` nodes of a target's parameters are uses
   outside its ``call_module``); a model that cannot be traced is left to check 1.

Example::

    >>> find_weight_reuse(tied_autoencoder, ["enc"], example_input=torch.randn(1, 3, 8, 8))
    {'enc': 'weight used outside the layer (by conv_transpose2d in dec.forward)'}
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .calls import ModelCall, as_calls, tensors_in
from .validation import check_instance

__all__ = ["evaluating", "run_example", "module_names", "find_weight_reuse"]


def copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with none of its hooks: bound-method hooks (a Lightning callback's) would otherwise be
    copied with their owners (and a Trainer) inside. ``LightningModule`` drops its Trainer reference when copied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for key, value in vars(module).items():
            if "hooks" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode under :func:`torch.no_grad`; every module's own training flag is restored afterwards (a frozen
    BatchNorm in eval mode inside a training model stays so), also when the body raises."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def run_example(model: nn.Module, example_input: Tensor | ModelCall, argument: str = "example_input") -> Any:
    """``model(example_input)`` once, under :func:`evaluating`; returns the output. ``example_input`` is a batch of
    model inputs, or a recorded call (:class:`~lightning_cheapconv.calls.ModelCall`: positional and keyword
    arguments).

    Raises:
        ValueError: naming ``argument`` and the input shapes when it is neither or the forward pass fails (a
            batch with the wrong channel count, say), chained to the original error.
    """
    if not isinstance(example_input, (Tensor, ModelCall)):
        raise ValueError(
            f"{argument} must be a torch.Tensor batch of model inputs or a ModelCall, "
            f"got {type(example_input).__name__}"
        )
    with evaluating(model):
        return as_calls(example_input)[0].run(model, argument)


def _reason(where: str) -> str:
    return f"weight used outside the layer (by {where})"


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property such as ``.data``: name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _UseRecorder(TorchFunctionMode):
    """Records, per target, the first torch call that takes one of its parameters outside its own forward."""

    def __init__(self, owner_of: dict[int, str], layers: dict[str, nn.Module], labels: dict[int, str]) -> None:
        super().__init__()
        self.owner_of, self.layers, self.labels = owner_of, layers, labels
        self.stack: list[nn.Module] = []
        self.found: dict[str, str] = {}

    def push(self, module: nn.Module, args: tuple) -> None:
        self.stack.append(module)

    def pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        owners = {self.owner_of[id(t)] for t in tensors_in((args, kwargs)) if id(t) in self.owner_of}
        if owners and any(True for _ in tensors_in(result)):
            current = self.stack[-1] if self.stack else None
            for name in sorted(owners):
                if current is not self.layers[name]:
                    where = self.labels.get(id(current), "the caller")
                    self.found.setdefault(name, _reason(f"{_function_name(func)} in {where}"))
        return result


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module object, by ``id`` (a shared module has several; the root's is ``""``)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _registered_elsewhere(
    model: nn.Module, layers: dict[str, nn.Module], aliases: dict[int, list[str]]
) -> dict[str, str]:
    registered: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        registered.setdefault(id(param), []).append(name)
    found: dict[str, str] = {}
    for name, layer in layers.items():
        prefixes = tuple(alias + "." for alias in aliases[id(layer)])
        for param in layer.parameters():
            outside = [n for n in registered.get(id(param), []) if not n.startswith(prefixes)]
            if outside:
                found[name] = _reason(f"{outside[0]}, the same Parameter registered under another module")
                break
    return found


def _used_in_forward(
    model: nn.Module, layers: dict[str, nn.Module], example_input: Tensor, aliases: dict[int, list[str]]
) -> dict[str, str]:
    owner_of = {id(p): name for name, layer in layers.items() for p in layer.parameters()}
    labels = {id(m): f"{aliases[id(m)][0] or type(model).__name__}.forward" for m in model.modules()}
    recorder = _UseRecorder(owner_of, layers, labels)
    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(recorder.push, prepend=True))
            handles.append(module.register_forward_hook(recorder.pop, always_call=True))
        with recorder:
            run_example(model, example_input, "find_weight_reuse: example_input")
    finally:
        for handle in handles:
            handle.remove()
    return recorder.found


def _used_in_trace(model: nn.Module, layers: dict[str, nn.Module], aliases: dict[int, list[str]]) -> dict[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.Tracer().trace(model)
    except Exception:  # control flow on values, unsupported calls: check 1 still holds
        return {}
    owner_of = {
        f"{alias}.{param_name}": name
        for name, layer in layers.items()
        for alias in aliases[id(layer)]
        for param_name, _ in layer.named_parameters()
    }
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "get_attr" or node.target not in owner_of:
            continue
        uses = [user for user in node.users if not _reads_metadata(user)]
        if uses:
            stack = uses[0].meta.get("nn_module_stack") or {}
            where = f"{next(reversed(stack))}.forward" if stack else f"{type(model).__name__}.forward"
            found.setdefault(owner_of[node.target], _reason(f"{_node_name(uses[0])} in {where}"))
    return found


_METADATA = frozenset({"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "size", "dim"})


def _reads_metadata(node: torch.fx.Node) -> bool:
    """``weight.shape``, ``weight.dtype``, ``weight.size()``: a look at the parameter, not a use of its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA
    return node.op == "call_method" and node.target in _METADATA


def _node_name(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else _function_name(node.target)


def find_weight_reuse(
    model: nn.Module, names: Sequence[str], example_input: Tensor | ModelCall | None = None
) -> dict[str, str]:
    """Which of the layers ``names`` (qualified names in ``model``) have parameters used outside the layer.

    Returns ``{name: reason}`` for those layers only, the reason reading ``"weight used outside the layer (by
    <where>)"``. Checks run in the order of the module docstring; with ``example_input`` (a batch the model takes)
    the forward pass runs once in eval mode under :func:`torch.no_grad` with every module's mode restored, so weights
    and BatchNorm statistics are untouched.

    Raises:
        ValueError: if a name is not a submodule of ``model``, or ``example_input`` does not run through it.
    """
    check_instance("model", model, nn.Module, owner="find_weight_reuse")
    layers: dict[str, nn.Module] = {}
    for name in names:
        try:
            layers[name] = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"find_weight_reuse: names contains {name!r}, which is no submodule of the model") from err
    if not layers:
        return {}
    aliases = module_names(model)
    found = _registered_elsewhere(model, layers, aliases)
    dynamic = (
        _used_in_forward(model, layers, example_input, aliases)
        if example_input is not None
        else _used_in_trace(model, layers, aliases)
    )
    return {name: found.get(name) or dynamic[name] for name in layers if name in found or name in dynamic}
