"""Prediction layers: the conv/linear layers whose outputs no other conv/linear layer reads.

Both papers keep a network's prediction layers dense. A classifier has one, its last layer; detection and segmentation
models have several: SSDLite's classification and regression output convs of every feature level, Faster R-CNN's
``rpn.head.cls_logits``/``rpn.head.bbox_pred`` next to ``roi_heads.box_predictor.*``, FCN's ``classifier.4`` and
``aux_classifier.4``. A layer is a prediction layer when its output is a model output or feeds only post-processing
that no conv/linear layer reads. They are found from the data flow:

1. with an example input (a batch, or a recorded :class:`~lightning_cheapconv.calls.ModelCall`), by one forward pass
   in eval mode with autograd on (on a copy of the input that requires grad; weights, modes and BatchNorm statistics
   are untouched, no ``.grad`` is written). Forward hooks note where each layer's output sits in the autograd graph,
   and one :func:`torch.autograd.grad` from everything the layers read tells which outputs are read. Data flow means
   gradient flow: what reaches a layer only through detached values, indices or coordinates (box decoding, top-k, NMS,
   the boxes ``roi_align`` samples at) is post-processing. So the RPN's prediction convs, whose proposals are detached,
   and Mask R-CNN's box regression, whose boxes only place the mask head's RoIs, are prediction layers. A layer the
   pass does not call is not one. When some layer's input does not require grad (part of the forward runs under
   ``no_grad``), the flow is unknown and rule 2 is tried;
2. without an example (or when rule 1 cannot see the flow), in a :func:`torch.fx` trace of the model (uses
   through ``.shape``/``.size()`` reads and ``.detach()`` do not count);
3. a model that rule 2 cannot trace and that comes without an example: unknown (``None``), and
   :func:`~lightning_cheapconv.convert.select_layers` falls back to keeping the last layer.

Layers are ``nn.Conv1d/2d/3d``, the transposed convs, ``nn.Linear`` and the cheap modules that replace them
(:data:`LAYER_TYPES`); the convs inside a cheap module are parts of it, not layers.

Example::

    >>> model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    >>> find_prediction_layers(model, example_input=torch.rand(1, 3, 64, 64))
    ['rpn.head.cls_logits', 'rpn.head.bbox_pred', 'roi_heads.box_predictor.cls_score', \
     'roi_heads.box_predictor.bbox_pred']
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .calls import ModelCall, as_calls, tensors_in
from .nn import DepthwiseSeparableConv2d, FoldedBatchNorm
from .nn.record import StructureRecordMixin
from .reuse import _reads_metadata, evaluating, module_names
from .validation import check_instance

__all__ = ["LAYER_TYPES", "find_prediction_layers"]

LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    StructureRecordMixin,  # every cheap module (Ghost, structured, fused; any dimension, transposed too)
    DepthwiseSeparableConv2d,
)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost layers of ``model`` by (first) qualified name, in registration order."""
    found: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LAYER_TYPES) and not isinstance(module, FoldedBatchNorm):  # an identity
            found[name] = module
            inside += (name + ".",)
    return found


class _Flow:
    """Forward hooks that note what each layer call reads and the autograd edge of each layer output; one backward
    pass from everything the layers read then tells which outputs are read."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.name_of = {id(module): name for name, module in layers.items()}
        self.read: list[Tensor] = []  # per layer call, the sum of each floating input that requires grad
        self.outputs: list[tuple[str, GradientEdge]] = []  # per layer call, its output's place in the graph
        self.called: set[str] = set()
        self.lost = False  # a layer read a floating tensor that does not require grad: its sources are unknown

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for tensor in tensors_in((args, kwargs)):
            if tensor.is_floating_point():
                if tensor.requires_grad:
                    self.read.append(tensor.sum())  # the value now, whatever in-place ops do to it later
                else:
                    self.lost = True

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = self.name_of[id(module)]
        self.called.add(name)
        self.outputs.extend((name, get_gradient_edge(t)) for t in tensors_in(output) if t.grad_fn is not None)

    def feeding(self) -> set[str]:
        """Layers whose output a layer reads: those whose output gets a gradient from what the layers read. A
        gradient that autograd leaves undefined (a box's coordinates read by ``roi_align``) is no read."""
        if not self.read or not self.outputs:
            return set()
        edges = [edge for _, edge in self.outputs]
        ones = [torch.ones_like(total) for total in self.read]
        grads = torch.autograd.grad(self.read, edges, grad_outputs=ones, allow_unused=True)
        return {name for (name, _), grad in zip(self.outputs, grads, strict=True) if grad is not None}


def _on_example(model: nn.Module, layers: dict[str, nn.Module], example_input: Tensor | ModelCall) -> list[str] | None:
    call = as_calls(example_input)[0]
    call = call._map(lambda t: t.detach().requires_grad_() if t.is_floating_point() else t)
    flow = _Flow(layers)
    handles = []
    try:
        for module in layers.values():
            handles.append(module.register_forward_pre_hook(flow.before, with_kwargs=True))
            handles.append(module.register_forward_hook(flow.after, with_kwargs=True))
        with evaluating(model), torch.enable_grad():
            call.run(model, "find_prediction_layers: example_input")
            feeding = None if flow.lost else flow.feeding()
    finally:
        for handle in handles:
            handle.remove()
    if feeding is None:
        return None
    return [name for name in layers if name in flow.called and name not in feeding]


class _LayerTracer(torch.fx.Tracer):
    """Cheap modules are single nodes, like the torch layers they replace."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYER_TYPES) or super().is_leaf_module(m, module_qualified_name)


def _carries_values(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    """Whether ``user`` passes on values of ``node`` (not a look at its shape, not a detached copy)."""
    if _reads_metadata(user):
        return False
    return not (user.op == "call_method" and user.target == "detach") and user.target is not torch.detach


def _on_trace(model: nn.Module, layers: dict[str, nn.Module]) -> list[str] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LayerTracer().trace(model)
    except Exception:  # control flow on values, unsupported calls: unknown
        return None
    aliases = module_names(model)
    layer_of = {alias: name for name, module in layers.items() for alias in aliases[id(module)]}
    called_modules = [node for node in graph.nodes if node.op == "call_module" and node.target in layer_of]
    calls = {node: layer_of[node.target] for node in called_modules}
    reaches: dict[torch.fx.Node, bool] = {}  # whether a layer reads the node's values, directly or further on
    for node in reversed(graph.nodes):
        reaches[node] = any(user in calls or reaches[user] for user in node.users if _carries_values(node, user))
    feeding = {name for node, name in calls.items() if reaches[node]}
    called = set(calls.values())
    return [name for name in layers if name in called and name not in feeding]


def find_prediction_layers(model: nn.Module, example_input: Tensor | ModelCall | None = None) -> list[str] | None:
    """The qualified names of ``model``'s prediction layers, in registration order, or ``None`` when unknown.

    A prediction layer is a layer (:data:`LAYER_TYPES`) that the forward pass calls and whose output no other layer
    reads through differentiable values (see the module docstring for the rules and the order they are tried in).
    With ``example_input`` (a batch of model inputs, or a recorded call) the forward pass runs once in eval mode; every
    module's mode, the weights and the BatchNorm statistics are left as they were.

    Raises:
        ValueError: if ``example_input`` does not run through the model (naming the input shapes).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> find_prediction_layers(model)   # from a torch.fx trace; with example_input=, from a forward pass
        ['3']
    """
    check_instance("model", model, nn.Module, owner="find_prediction_layers")
    if example_input is not None and not isinstance(example_input, (Tensor, ModelCall)):
        raise ValueError(
            "find_prediction_layers: example_input must be a torch.Tensor batch of model inputs or a ModelCall, "
            f"got {type(example_input).__name__}"
        )
    layers = _layers(model)
    found = _on_example(model, layers, example_input) if example_input is not None else None
    return found if found is not None else _on_trace(model, layers)
