"""Choosing layers and replacing them with cheap ones, on a plain ``nn.Module`` (no Trainer needed).

Example::

    >>> import torchvision
    >>> model = torchvision.models.resnet18()
    >>> result = convert_to_ghost(model, ratio=2, dw_size=3)
    >>> print(result)                      # what was converted, what was skipped and why
    >>> result = decompose_structured(torchvision.models.resnet18(), channel_ratio=0.5)
"""

from __future__ import annotations

import fnmatch
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from .calls import ModelCall, as_calls
from .heads import find_prediction_layers
from .inherit import check_ghost_sizes, fit_ghost_from_activations, fit_ghost_from_kernels
from .nn import (
    GhostConv1d,
    GhostConv2d,
    GhostConv3d,
    GhostConvTranspose1d,
    GhostConvTranspose2d,
    GhostConvTranspose3d,
    StructuredConv1d,
    StructuredConv2d,
    StructuredConv3d,
    StructuredConvTranspose1d,
    StructuredConvTranspose2d,
    StructuredConvTranspose3d,
    StructuredLinear,
)
from .nn.record import conv_config
from .nn.transposed import transpose_config
from .reuse import evaluating, find_weight_reuse, module_names, run_example
from .structure import StructureSpec, check_structure_ratios, spec_from_ratios, structural_residual
from .validation import (
    check_bool,
    check_choice,
    check_finite_tensor,
    check_instance,
    check_int,
    check_patterns,
    short_repr,
)

__all__ = [
    "LayerPlan",
    "LayerChange",
    "ConversionResult",
    "select_layers",
    "replace_modules",
    "ghost_from_conv",
    "structured_from_dense",
    "structure_spec_for",
    "structured_like",
    "fits_on_activations",
    "DENSE_TYPES",
    "GHOST_TYPES",
    "STRUCTURED_TYPES",
    "CHEAP_TYPES",
    "convert_to_ghost",
    "decompose_structured",
    "capture_inputs",
    "recalibrate_batchnorm",
]

Method = Literal["ghost", "structured"]
PREDICTION_KEPT = "prediction layer, kept"  # the plan's reason for a prediction layer
PREDICTIONS_UNKNOWN = "prediction layers not found"  # in the reason of a last layer kept instead


class PredictionLayersUnknownWarning(UserWarning):
    """:func:`select_layers` could not find the prediction layers (no example input, no fx trace) and keeps only the
    last layer."""


Patterns = str | Sequence[str] | None


@dataclass
class LayerPlan:
    """What will happen to one layer: ``action`` is ``"convert"`` or ``"skip"``, with the reason."""

    name: str
    type: str
    action: Literal["convert", "skip"]
    reason: str
    aliases: tuple[str, ...] = ()
    order: int = 0  # position among the model's layers (registration order), for schedules


@dataclass
class LayerChange:
    """One replaced layer: parameter counts, multiplications per output position, and the fit error
    (Ghost: relative output error of weight inheritance; structured: relative projection residual)."""

    name: str
    old_type: str
    new_type: str
    params_before: int
    params_after: int
    macs_per_position_before: int
    macs_per_position_after: int
    error: float | None
    detail: str
    aliases: tuple[str, ...] = ()


@dataclass
class ConversionResult:
    """The outcome of :func:`convert_to_ghost` or :func:`decompose_structured`.

    ``plan`` lists every candidate layer with the action taken and why; ``changes`` the replaced
    layers with their counts and errors. Ratios are original / compressed (2.0 = half).
    """

    method: str
    plan: list[LayerPlan] = field(default_factory=list)
    changes: list[LayerChange] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def converted(self) -> list[str]:
        return [c.name for c in self.changes]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [p for p in self.plan if p.action == "skip"]

    @property
    def params_ratio(self) -> float:
        """Whole-model parameters, original / converted."""
        return self.params_before / max(self.params_after, 1)

    @property
    def layer_macs_ratio(self) -> float:
        """Multiplications of the converted layers, original / converted (per output position, so
        independent of the input size; whole-model MACs come from :func:`count_complexity`)."""
        before = sum(c.macs_per_position_before for c in self.changes)
        after = sum(c.macs_per_position_after for c in self.changes)
        return before / max(after, 1)

    def __str__(self) -> str:
        lines = [
            f"{self.method}: converted {len(self.changes)} layer(s), skipped {len(self.skipped)}; "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.2f}x, original/converted)"
        ]
        for c in self.changes:
            err = "" if c.error is None else f", error {c.error:.3g}"
            lines.append(f"  {c.name}: {c.old_type} -> {c.new_type} ({c.detail}{err})")
        for p in self.skipped:
            lines.append(f"  {p.name}: skipped ({p.reason})")
        return "\n".join(lines)


# The dense convs that convert, and the cheap module each becomes (one spatial dimension fewer or more than 2-d;
# transposed convs: nn.ConvTranspose2d is no nn.Conv2d, both are torch's _ConvNd).
_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVS = (*_PLAIN_CONVS, *_TRANSPOSED)
_GHOSTS = {
    nn.Conv1d: GhostConv1d,
    nn.Conv2d: GhostConv2d,
    nn.Conv3d: GhostConv3d,
    nn.ConvTranspose1d: GhostConvTranspose1d,
    nn.ConvTranspose2d: GhostConvTranspose2d,
    nn.ConvTranspose3d: GhostConvTranspose3d,
}
_STRUCTURED = {
    nn.Conv1d: StructuredConv1d,
    nn.Conv2d: StructuredConv2d,
    nn.Conv3d: StructuredConv3d,
    nn.ConvTranspose1d: StructuredConvTranspose1d,
    nn.ConvTranspose2d: StructuredConvTranspose2d,
    nn.ConvTranspose3d: StructuredConvTranspose3d,
}
_CHEAP = (*_GHOSTS.values(), *_STRUCTURED.values(), StructuredLinear)

DENSE_TYPES: tuple[type[nn.Module], ...] = (*_CONVS, nn.Linear)
"""The layer types the conversions replace: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear``
(structured only)."""
GHOST_TYPES: tuple[type[nn.Module], ...] = tuple(_GHOSTS.values())
"""What :func:`convert_to_ghost` makes: ``GhostConv1d/2d/3d`` and ``GhostConvTranspose1d/2d/3d``."""
STRUCTURED_TYPES: tuple[type[nn.Module], ...] = (*_STRUCTURED.values(), StructuredLinear)
"""What :func:`decompose_structured` makes: ``StructuredConv1d/2d/3d``, ``StructuredConvTranspose1d/2d/3d`` and
``StructuredLinear``."""
CHEAP_TYPES: tuple[type[nn.Module], ...] = (*GHOST_TYPES, *STRUCTURED_TYPES)
"""Every cheap layer type a conversion makes (their parts are no candidates of :func:`select_layers`)."""


def _conv_base(conv: nn.Module) -> type[nn.Module]:
    """The plain conv class ``conv`` is (or derives from): ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``."""
    return next(base for base in _CONVS if isinstance(conv, base))


def _is_transposed(layer: nn.Module) -> bool:
    return isinstance(layer, _TRANSPOSED)


@functools.cache
def _base_attributes(base: type[nn.Module]) -> frozenset[str]:
    return frozenset(vars(base(1, 1, 1, device="meta")))


def _plain_subclass(module: nn.Module) -> bool:
    """A subclass of a conv that computes what its base computes and holds nothing more: it overrides neither
    ``forward`` nor ``_conv_forward``, and its instance has no attribute, parameter, buffer or child the base's has
    not (torchvision's ``Conv3DSimple`` in ``r3d_18``, which only adds a static method). It converts like the plain
    conv; ``nn.Linear`` subclasses never do."""
    if not isinstance(module, _CONVS):
        return False
    base = _conv_base(module)
    same = all(getattr(type(module), f) is getattr(base, f) for f in ("forward", "_conv_forward"))
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    return same and own <= {"weight", "bias"} and not module._modules and set(vars(module)) <= _base_attributes(base)


def fits_on_activations(layer: nn.Module) -> bool:
    """Whether :func:`ghost_from_conv` can fit ``layer``'s Ghost weights on its real input (a calibration batch):
    plain convs yes; transposed convs no, they inherit in kernel space (:mod:`lightning_cheapconv.nn.transposed`).

    Example::

        >>> fits_on_activations(nn.Conv1d(4, 8, 3)), fits_on_activations(nn.ConvTranspose2d(4, 8, 2))
        (True, False)
    """
    return isinstance(layer, _PLAIN_CONVS)


def _matches(names: Sequence[str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def _ghost_skip_reason(conv: nn.Conv2d, ratio: int, dw_size: int) -> str | None:
    if _is_transposed(conv) and conv.groups > 1:
        return f"grouped transposed conv (groups={conv.groups}); a Ghost primary transposed conv is dense"
    if _is_depthwise(conv):
        return "depthwise conv (already cheap)"
    if conv.groups > 1:
        return f"grouped conv (groups={conv.groups}); a Ghost primary conv is dense"
    if conv.out_channels < ratio:
        return f"out_channels={conv.out_channels} < ratio={ratio}"
    if _ghost_params(conv, ratio, dw_size) >= _own_params(conv):
        return "a Ghost module would not have fewer parameters"
    return None


def _ghost_params(conv: nn.Conv2d, ratio: int, dw_size: int) -> int:
    """Parameters of the Ghost module replacing ``conv`` (any dimension, transposed too): a primary conv of ``m``
    filters over all input channels, ``m·(ratio-1)`` depthwise kernels of ``dw_size`` per side."""
    m = -(-conv.out_channels // ratio)
    taps = 1
    for side in conv.kernel_size:
        taps *= side
    bias = conv.bias is not None
    return m * conv.in_channels * taps + m * bias + m * (ratio - 1) * (dw_size ** len(conv.kernel_size) + bias)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def structure_spec_for(
    layer: nn.Module,
    channel_ratio: float = 1.0,
    kernel_reduction: int | None = 1,
    kernel_size: int | tuple[int, int] | None = None,
    name: str = "layer",
) -> StructureSpec:
    """The hidden sizes a Conv2d (Conv1d, Conv3d, ConvTranspose1d/2d/3d; per group) or Linear gets from the ratios
    (see :func:`spec_from_ratios`).

    The structured block of a conv is one output channel's ``(C_in/groups, K...)``; of a transposed conv, one input
    channel's ``(C_out/groups, K...)`` (its weight is stored ``(C_in, C_out/groups, K...)``; see
    :mod:`lightning_cheapconv.nn.transposed`), so ``channel_ratio`` scales ``C_out/groups`` there.

    Raises:
        ValueError: naming ``name`` for a layer that is none of these, or the ratio out of range.

    Example::

        >>> structure_spec_for(nn.ConvTranspose2d(16, 8, 4, stride=2), channel_ratio=0.5)
        StructureSpec(channels=4, kernel_size=(3, 3))
    """
    shape = _structured_block(layer, name)
    return spec_from_ratios(shape, channel_ratio, kernel_reduction, kernel_size, layer=name)


def _structured_block(layer: nn.Module, name: str) -> tuple[int, ...]:
    """The shape of the block that a structure spec describes: ``(C_in/groups, K...)`` for a conv,
    ``(C_out/groups, K...)`` for a transposed conv, ``(in_features,)`` for a Linear."""
    if _is_transposed(layer):
        return (layer.out_channels // layer.groups, *layer.kernel_size)
    if isinstance(layer, _CONVS):
        return (layer.in_channels // layer.groups, *layer.kernel_size)
    if isinstance(layer, nn.Linear):
        return (layer.in_features,)
    raise ValueError(
        f"{name}: expected nn.Conv2d or nn.Linear (or nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d/2d/3d), "
        f"got {type(layer).__name__}"
    )


def structured_like(
    layer: nn.Module,
    spec: StructureSpec,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A freshly initialized structured layer of ``layer``'s configuration with hidden sizes ``spec`` (no weights
    read: ``layer`` may live on the meta device): ``StructuredConv{d}d``, ``StructuredConvTranspose{d}d`` or
    ``StructuredLinear``. :func:`structured_from_dense` makes the one with ``layer``'s projected weights.

    Raises:
        ValueError: for a layer of another type, or ``spec`` out of range for it.

    Example::

        >>> structured_like(nn.Conv1d(8, 8, 3), StructureSpec(4, (2,)))
        StructuredConv1d(8, 8, kernel_size=(3,), stride=(1,), hidden_channels=4, hidden_kernel_size=(2,))
    """
    factory = {"device": device, "dtype": dtype}
    hidden = {"hidden_channels": spec.channels, "hidden_kernel_size": spec.kernel_size}
    if _is_transposed(layer):
        return _STRUCTURED[_conv_base(layer)](**transpose_config(layer), **hidden, **factory)
    if isinstance(layer, _CONVS):
        return _STRUCTURED[_conv_base(layer)](**conv_config(layer), **hidden, **factory)
    if isinstance(layer, nn.Linear):
        return StructuredLinear(layer.in_features, layer.out_features, layer.bias is not None, spec.channels, **factory)
    raise ValueError(
        f"structured_like: expected nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or nn.Linear, got {type(layer).__name__}"
    )


def _structured_skip_reason(layer: nn.Module, spec: StructureSpec) -> str | None:
    if isinstance(layer, _CONVS):
        full = _structured_block(layer, "layer")
        if all(side == 1 for side in layer.kernel_size) and spec.channels == full[0]:
            ones = "x".join("1" * len(layer.kernel_size))
            return f"{ones} conv: no spatial structure, and channel_ratio=1.0 leaves channels whole"
    else:
        full = (layer.in_features, 1, 1)
    if (spec.channels, *spec.kernel_size) == full:
        return "the structure would not reduce this layer"
    return None


def select_layers(
    model: nn.Module,
    method: Method,
    include: Patterns = None,
    exclude: Patterns = None,
    skip_first: bool = True,
    skip_last: bool = True,
    linear: bool = False,
    ratio: int = 2,
    dw_size: int = 3,
    channel_ratio: float = 1.0,
    kernel_reduction: int | None = 1,
    kernel_size: int | tuple[int, int] | None = None,
    example_input: Tensor | ModelCall | None = None,
    skip_prediction: bool | None = None,
) -> list[LayerPlan]:
    """Plan which layers of ``model`` a method converts, and why each other candidate is skipped.

    Candidates are ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` layers (and ``nn.Linear`` with
    ``linear=True``, structured only) in registration order; the layers inside cheap modules (a Ghost module's
    primary conv, say) are parts of them, not candidates. Defaults follow the papers: the first conv (the stem) and
    the prediction layers are kept; Ghost skips depthwise and grouped convs (transposed ones too); structured skips
    1x1 convs unless ``channel_ratio < 1``. Every skipped candidate is listed with its reason.

    Prediction layers are every conv/linear layer whose output no other conv/linear layer reads (a
    classifier's last layer; each head's output convs in a detector or segmenter, e.g. Faster R-CNN's
    ``rpn.head.cls_logits`` and ``rpn.head.bbox_pred``): found from the data flow by
    :func:`~lightning_cheapconv.heads.find_prediction_layers`, on ``example_input`` when given, else in a
    ``torch.fx`` trace; kept with the reason "prediction layer, kept". ``skip_prediction`` (default
    ``None``: the value of ``skip_last``) switches that rule; ``skip_last`` keeps the last registered
    layer instead where prediction layers cannot be found (no example and no trace; the reason says so)
    or where ``skip_prediction=False``. So ``skip_last=False`` converts a simple classifier's last layer
    as before, and ``skip_prediction=False`` restores the last-layer-only rule. ``include``/``exclude``
    are glob patterns on qualified names (``"layer1.*"``, ``"*.conv2"``); a shared module matches
    through any of its names and is planned once. A layer whose parameters are used outside it
    (a tied decoder reading ``enc.weight``) is skipped with the reason "weight used outside the
    layer (by ...)": :func:`~lightning_cheapconv.reuse.find_weight_reuse`, which runs ``example_input``
    (a batch of model inputs) through the model once when given, and traces it with ``torch.fx`` otherwise.

    Raises:
        ValueError: naming the argument, its value and the valid range, for any invalid argument.
    """
    owner = "select_layers"
    check_instance("model", model, nn.Module, owner=owner)
    check_choice("method", method, ("ghost", "structured"), owner=owner)
    include_p = check_patterns("include", include, owner=owner)
    exclude_p = check_patterns("exclude", exclude, owner=owner)
    for flag, value in (("skip_first", skip_first), ("skip_last", skip_last), ("linear", linear)):
        check_bool(flag, value, owner=owner)
    _check_optional_flags(owner, skip_prediction=skip_prediction)
    ratio, dw_size = check_ghost_sizes(ratio, dw_size, owner)
    check_structure_ratios(channel_ratio, kernel_reduction, kernel_size, owner)
    if linear and method == "ghost":
        raise ValueError(
            f"{owner}: linear=True applies to the structured method only; valid with method='ghost': False"
        )
    names = module_names(model)
    kinds = (*_CONVS, nn.Linear) if linear else _CONVS
    seen: set[int] = set()
    layers: list[tuple[str, nn.Module]] = []
    # Layers inside cheap modules (a Ghost module's primary conv, say) are parts, not candidates.
    cheap = [(n, m) for n, m in model.named_modules() if isinstance(m, _CHEAP)]
    cheap_prefixes = tuple(n + "." for n, _ in cheap)
    for name, module in model.named_modules():
        if name.startswith(cheap_prefixes):
            continue
        if isinstance(module, (*_CONVS, nn.Linear)) and id(module) not in seen:
            seen.add(id(module))
            layers.append((name, module))
    first_conv = next((n for n, m in layers if isinstance(m, _CONVS)), None)
    last_layer = layers[-1][0] if layers else None
    keep_predictions = skip_last if skip_prediction is None else skip_prediction
    predictions = _prediction_layers(model, example_input) if keep_predictions and layers else None
    last_reason = "last layer (classifier) is kept, as in the papers"
    if keep_predictions and predictions is None:
        why = (
            "no example input (a LightningModule's example_input_array) and the model does not trace with torch.fx"
            if example_input is None
            else "the example's forward pass runs partly without autograd and the model does not trace with torch.fx"
        )
        last_reason += f" ({PREDICTIONS_UNKNOWN}: {why})"
        warnings.warn(
            f"select_layers: prediction layers were not found ({why}), so only the last layer, {last_layer!r}, is "
            "kept; a model with several heads (a detector, a segmenter) would have its other prediction convs "
            "converted. Pass example_input= (a batch, or a lightning_cheapconv.ModelCall for a forward that takes "
            "lists; for the callbacks, set the LightningModule's example_input_array), or exclude= them. (The "
            "callbacks look again on a recorded training batch before a conversion mid-fit.)",
            PredictionLayersUnknownWarning,
            stacklevel=2,
        )
    plan: list[LayerPlan] = [
        LayerPlan(n, type(m).__name__, "skip", f"already a {type(m).__name__}", tuple(names[id(m)]), -1)
        for n, m in cheap
        if not n.startswith(cheap_prefixes)
    ]
    for order, (name, module) in enumerate(layers):
        aliases = tuple(names[id(module)])
        kind = type(module).__name__

        def skip(reason: str, name=name, kind=kind, aliases=aliases, order=order) -> None:
            plan.append(LayerPlan(name, kind, "skip", reason, aliases, order))

        if not isinstance(module, kinds):
            continue
        if type(module) not in (*_CONVS, nn.Linear) and not _plain_subclass(module):
            base = next(t for t in kinds if isinstance(module, t)).__name__
            skip(f"subclass {kind} of nn.{base} may change forward(); only plain layers convert")
            continue
        if include_p is not None and not _matches(aliases, include_p):
            skip("not matched by include")
            continue
        if exclude_p is not None and _matches(aliases, exclude_p):
            skip("matched by exclude")
            continue
        if skip_first and name == first_conv:
            skip("first conv (stem) is kept, as in the papers")
            continue
        if predictions is not None and name in predictions:
            skip(PREDICTION_KEPT)
            continue
        if skip_last and predictions is None and name == last_layer:
            skip(last_reason)
            continue
        if method == "ghost":
            reason = _ghost_skip_reason(module, ratio, dw_size)
            action_text = f"{_GHOSTS[_conv_base(module)].__name__}(ratio={ratio}, dw_size={dw_size})"
        else:
            spec = structure_spec_for(module, channel_ratio, kernel_reduction, kernel_size, name)
            reason = _structured_skip_reason(module, spec)
            action_text = f"structured c={spec.channels}, n={spec.kernel_size}"
        if reason is not None:
            skip(reason)
            continue
        plan.append(LayerPlan(name, kind, "convert", action_text, aliases, order))
    reused = find_weight_reuse(model, [p.name for p in plan if p.action == "convert"], example_input)
    for entry in plan:
        if entry.name in reused:
            entry.action, entry.reason = "skip", reused[entry.name]
    return plan


def _prediction_layers(model: nn.Module, example_input: Tensor | ModelCall | None) -> set[str] | None:
    """Every qualified name of every prediction layer, or ``None`` when the data flow is unknown."""
    found = find_prediction_layers(model, example_input)
    if found is None:
        return None
    names = module_names(model)
    return {alias for name in found for alias in names[id(model.get_submodule(name))]}


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Swap submodules by qualified name (inside Sequential, ModuleList, ModuleDict or attributes).

    Every other name under which the same module object is reachable is redirected too, so a
    shared layer stays shared. Names are resolved before anything is swapped: an unknown name
    or a replacement that is not an ``nn.Module`` raises ``ValueError`` and leaves the model unchanged.
    """
    check_instance("model", model, nn.Module, owner="replace_modules")
    check_instance("replacements", replacements, dict, owner="replace_modules")
    names = module_names(model)
    targets: list[tuple[str, nn.Module]] = []
    for name, new in replacements.items():
        check_instance(f"replacements[{name!r}]", new, nn.Module, owner="replace_modules")
        try:
            old = model.get_submodule(name)
        except (AttributeError, TypeError) as err:
            raise ValueError(f"replace_modules: model has no submodule {name!r}") from err
        if "" in names[id(old)]:
            raise ValueError("replace_modules: cannot replace the root module itself")
        targets.extend((alias, new) for alias in names[id(old)])
    for alias, new in targets:
        model.set_submodule(alias, new)


def _inherit_requires_grad(old: nn.Module, new: nn.Module) -> None:
    """A frozen layer stays frozen: the new module's biases take ``requires_grad`` from the old bias (from the old
    weight when it had none), every other parameter from the old weight."""
    weight_flag = old.weight.requires_grad
    bias_flag = old.bias.requires_grad if old.bias is not None else weight_flag
    for name, param in new.named_parameters():
        param.requires_grad_(bias_flag if name.rpartition(".")[2] == "bias" else weight_flag)


def ghost_from_conv(
    conv: nn.Conv2d | nn.Conv1d | nn.Conv3d,
    ratio: int = 2,
    dw_size: int = 3,
    init: Literal["inherit", "random"] = "inherit",
    calibration_input: Tensor | None = None,
    name: str = "conv",
) -> tuple[GhostConv2d | GhostConv1d | GhostConv3d, float | None]:
    """Build the conv-only :class:`GhostConv2d` that replaces ``conv``; returns it and its fit error
    (:class:`GhostConv1d`/:class:`GhostConv3d` for an ``nn.Conv1d``/``nn.Conv3d``, ``GhostConvTranspose{d}d`` for an
    ``nn.ConvTranspose{d}d``).

    ``init="inherit"`` maps the trained filters onto the Ghost module (DESIGN.md section 3):
    ``m`` filters become the primary conv unchanged, the others are fitted as depthwise ghosts,
    in kernel space or, given ``calibration_input`` (this layer's input, ``(B, C_in, H, W)``), on real
    activations; the original output channel order is kept. A transposed conv inherits in kernel space only
    (:meth:`GhostConvTranspose2d.from_dense`; :func:`fits_on_activations` says which layers take
    ``calibration_input``), and its error is then ``None``. ``init="random"`` starts from fresh weights
    (then neither the weights nor ``calibration_input`` are read). The new parameters take
    ``requires_grad`` from ``conv``'s (a frozen conv gives a frozen Ghost module).

    Raises:
        ValueError: naming ``name`` for a conv that cannot become a Ghost module (depthwise, grouped, too few
            channels), NaN/inf weights or calibration input when inheriting, ``calibration_input`` for a transposed
            conv, or an argument out of range.

    Example::

        >>> ghost, error = ghost_from_conv(nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1))
        >>> type(ghost).__name__
        'GhostConvTranspose1d'
    """
    ratio, dw_size = check_ghost_sizes(ratio, dw_size, name)
    check_choice("init", init, ("inherit", "random"), owner=name)
    if not isinstance(conv, _CONVS):
        raise ValueError(
            f"{name}: expected nn.Conv2d (or nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d/2d/3d), got {type(conv).__name__}"
        )
    if calibration_input is not None and init == "random":
        raise ValueError(f"{name}: calibration_input is only read with init='inherit'; valid with 'random': None")
    if calibration_input is not None and not fits_on_activations(conv):
        raise ValueError(
            f"{name}: calibration_input is not read for a {type(conv).__name__} (transposed convs inherit in kernel "
            "space); valid: None"
        )
    reason = _ghost_skip_reason(conv, ratio, dw_size)
    if reason is not None:
        raise ValueError(f"{name}: cannot convert to Ghost: {reason}")
    if _is_transposed(conv):
        if init == "inherit":
            check_finite_tensor(f"{name}.weight", conv.weight)
        ghost = _GHOSTS[_conv_base(conv)].from_dense(conv, ratio, dw_size, init, name)
        return ghost, None
    weight = conv.weight
    try:
        ghost = _GHOSTS[_conv_base(conv)](
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=conv.bias is not None,
            ratio=ratio,
            dw_size=dw_size,
            padding_mode=conv.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    _inherit_requires_grad(conv, ghost)
    if init == "random":
        return ghost, None
    with torch.no_grad():
        if calibration_input is not None:
            check_instance(f"{name}: calibration_input", calibration_input, Tensor)
            fit = fit_ghost_from_activations(conv, calibration_input.to(weight.device), ratio, dw_size, name=name)
        else:
            fit = fit_ghost_from_kernels(conv, ratio, dw_size, name=name)
        m, slots = ghost.intrinsic_channels, ratio - 1
        ghost.primary.weight.copy_(weight[fit.intrinsics.to(weight.device)])
        cheap_weight = torch.zeros_like(ghost.cheap.weight)
        cheap_bias = torch.zeros(m * slots, dtype=torch.float32)
        index = torch.empty(conv.out_channels, dtype=torch.long)
        index[fit.intrinsics] = torch.arange(m)
        used = [0] * m
        for filt in sorted(fit.ghost_of):
            slot = fit.ghost_of[filt]
            channel = slot * slots + used[slot]
            used[slot] += 1
            cheap_weight[channel, 0] = fit.kernels[filt].to(cheap_weight)
            cheap_bias[channel] = fit.bias_shift.get(filt, 0.0)
            index[filt] = m + channel
        ghost.cheap.weight.copy_(cheap_weight)
        if conv.bias is not None:
            ghost.primary.bias.copy_(conv.bias[fit.intrinsics.to(weight.device)])
            ghost.cheap.bias.copy_(cheap_bias.to(ghost.cheap.bias))
        ghost.set_output_index(index)
    return ghost, fit.relative_error


def structured_from_dense(layer: nn.Module, spec: StructureSpec, name: str = "layer") -> tuple[nn.Module, float]:
    """Project and decompose a Conv2d/Linear (or Conv1d, Conv3d, ConvTranspose1d/2d/3d); returns the new layer and
    the relative projection residual (of each transposed conv's input-channel block, :func:`structure_spec_for`).

    The new parameters take ``requires_grad`` from ``layer``'s (a frozen layer stays frozen).

    Raises:
        ValueError: naming ``name`` for another layer type, NaN/inf weights, or a ``spec`` out of range.

    Example::

        >>> up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        >>> new, residual = structured_from_dense(up, structure_spec_for(up, channel_ratio=0.5))
        >>> type(new).__name__
        'StructuredConvTranspose2d'
    """
    check_instance(f"{name}: spec", spec, StructureSpec)
    spec.validate(_structured_block(layer, name), layer=name)
    check_finite_tensor(f"{name}.weight", layer.weight)
    if layer.bias is not None:
        check_finite_tensor(f"{name}.bias", layer.bias)
    if isinstance(layer, _CONVS):
        new: nn.Module = _STRUCTURED[_conv_base(layer)].from_dense(layer, spec.channels, spec.kernel_size)
    else:
        new = StructuredLinear.from_dense(layer, spec.channels)
    _inherit_requires_grad(layer, new)
    with torch.no_grad():
        residual = float(structural_residual(layer.weight.detach().double(), spec))
    return new, residual


def _macs_per_position(module: nn.Module) -> int:
    """Multiplications per output position of a conv (per *input* position of a transposed conv: its weight is read
    once per input position), without borders; a Ghost transposed conv's depthwise conv runs on the output, which
    has ``prod(stride)`` positions per input position."""
    if isinstance(module, _CONVS):
        return module.weight.numel()  # out · in/groups · kernel taps (transposed: in · out/groups · taps)
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, tuple(_STRUCTURED.values())):
        return module.weight.numel()
    if isinstance(module, StructuredLinear):
        return module.weight.numel()
    if isinstance(module, tuple(_GHOSTS.values())):
        upsampling = math.prod(module.primary.stride) if _is_transposed(module.primary) else 1
        return _macs_per_position(module.primary) + module.cheap.weight.numel() * upsampling
    raise TypeError(type(module).__name__)


def capture_inputs(
    model: nn.Module, example_input: Tensor | ModelCall | Sequence[ModelCall], names: Sequence[str]
) -> dict[str, Tensor]:
    """Run ``model`` in eval mode on ``example_input`` and return the input each named layer sees.

    ``example_input`` is a batch of model inputs, or recorded calls (:class:`~lightning_cheapconv.calls.ModelCall`,
    for models whose ``forward`` takes several or keyword arguments): each call runs once and each layer's inputs
    are concatenated along the batch. Every module's mode is restored and no weight or BatchNorm statistic changes.

    Raises:
        ValueError: if a name is no submodule, ``example_input`` (a batch of model inputs) does not run through the
            model (naming its shape), or a named layer is not called by the forward pass.
    """
    check_instance("model", model, nn.Module, owner="capture_inputs")
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"capture_inputs: names must be a sequence of layer names, got {type(names).__name__}")
    modules = {}
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except (AttributeError, TypeError) as err:
            raise ValueError(f"capture_inputs: names contains {name!r}, which is no submodule of the model") from err
    calls = as_calls(example_input)
    captured: dict[str, list[Tensor]] = {}
    handles = []
    call_index = 0

    def hook(_module: nn.Module, args: tuple, name: str) -> None:
        seen = captured.setdefault(name, [])
        if len(seen) == call_index:  # the layer's first call in this forward pass
            seen.append(args[0].detach())

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(functools.partial(hook, name=name)))
        for call_index, call in enumerate(calls):  # noqa: B007 - read by hook
            run_example(model, call, "capture_inputs: example_input")
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if len(captured.get(n, ())) < len(calls)]
    if missing:
        raise ValueError(f"calibration: layers {missing} were not called in the forward pass")
    return {name: torch.cat(seen) if len(seen) > 1 else seen[0] for name, seen in captured.items()}


def recalibrate_batchnorm(model: nn.Module, inputs: Tensor | Sequence[ModelCall], batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running statistics from ``inputs`` (a batch of *model* inputs, or recorded
    calls of the model, :class:`~lightning_cheapconv.calls.ModelCall`, each run as one chunk).

    After a conversion the layers before each BatchNorm compute something slightly different, so
    the statistics it learned no longer standardize their outputs; this is what makes an inherited
    network usable before any fine-tuning. The statistics become the plain average over ``inputs``
    (in chunks of ``batch_size``, an int >= 1); every other module runs in eval mode (no dropout) and each
    module's own mode and momentum are restored afterwards. Returns the number of BatchNorms updated.

    Raises:
        ValueError: for NaN/inf ``inputs``, a bad ``batch_size``, or a chunk that does not run through the model
            (naming its shape); the statistics are then left as they were.

    Example::

        >>> convert_to_ghost(model)
        >>> recalibrate_batchnorm(model, next(iter(train_loader))[0])
    """
    check_instance("model", model, nn.Module, owner="recalibrate_batchnorm")
    tensors = [inputs] if isinstance(inputs, Tensor) else [t for call in as_calls(inputs) for t in call.tensors()]
    for tensor in tensors:
        if tensor.is_floating_point():
            check_finite_tensor("inputs", tensor, owner="recalibrate_batchnorm")
    check_int("batch_size", batch_size, 1, owner="recalibrate_batchnorm")
    return _recalibrate(model, inputs, batch_size, "recalibrate_batchnorm: inputs")


def _recalibrate(model: nn.Module, inputs: Tensor | Sequence[ModelCall], batch_size: int, argument: str) -> int:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(norm, norm.momentum, [b.clone() for b in norm.buffers(recurse=False)]) for norm in norms]
    completed = False
    try:
        with evaluating(model):
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # cumulative average over the calibration chunks
                norm.train()
            chunks = as_calls(list(inputs.split(batch_size))) if isinstance(inputs, Tensor) else as_calls(inputs)
            for chunk in chunks:  # with the BatchNorms estimating statistics
                chunk.run(model, f"{argument}: a chunk")
        completed = True
    finally:
        for norm, momentum, buffers in saved:
            norm.momentum = momentum
            if not completed:
                for live, old in zip(norm.buffers(recurse=False), buffers, strict=True):
                    live.copy_(old)
    return len(norms)


_PROGRESS_DELAY = 1.0  # seconds a conversion runs before its progress bar appears
_clock = time.perf_counter  # tests stub it


def _progress_console() -> Console:
    return Console(stderr=True)


class _LayerProgress:
    """A transient progress bar on stderr naming the layer being converted.

    It appears once the conversion has run for ``_PROGRESS_DELAY`` seconds, on a terminal only (logs and pipes get
    nothing), and never for a model attached to a Lightning Trainer: inside a fit, Lightning's own progress bar owns
    the screen. ``show`` (the conversion functions' ``progress``): ``None`` decides so, ``False`` never shows it,
    ``True`` shows it on any terminal, attached or not.
    """

    def __init__(self, model: nn.Module, total: int, label: str, show: bool | None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.start = _clock()
        self.bar: Progress | None = None
        self.task = None
        attached = vars(model).get("_trainer") is not None
        self.console = _progress_console() if show or (show is None and not attached) else None
        if self.console is not None and not self.console.is_terminal:
            self.console = None

    def __enter__(self) -> _LayerProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def layer(self, name: str) -> None:
        """Layer ``name`` is converted next (the ones before it are done)."""
        if self.console is not None and self.bar is None and _clock() - self.start >= _PROGRESS_DELAY:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.bar.add_task(self.label, total=self.total)
            self.bar.start()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=f"{self.label}: {name}", refresh=True)
        self.done += 1


def _convert(
    model: nn.Module,
    method: str,
    plan: list[LayerPlan],
    build: Callable[[str, nn.Module], tuple[nn.Module, float | None, str]],
    recalibration: Tensor | None,
    owner: str,
    progress: bool | None = None,
) -> ConversionResult:
    """Build every replacement, then swap them in, then re-estimate the BatchNorm statistics on ``recalibration``
    (when given); if that fails, the old layers are swapped back, so the model is left as it was on every error.
    A progress bar names the layer being built when that takes a while (:class:`_LayerProgress`)."""
    params_before = _own_params(model)
    result = ConversionResult(method=method, plan=plan)
    new_modules: dict[str, nn.Module] = {}
    old_modules: dict[str, nn.Module] = {}
    todo = [entry for entry in plan if entry.action == "convert"]
    with _LayerProgress(model, len(todo), owner, progress) as bar:
        for entry in todo:
            bar.layer(entry.name)
            old = old_modules[entry.name] = model.get_submodule(entry.name)
            new, error, detail = build(entry.name, old)
            new.train(old.training)
            new_modules[entry.name] = new
            result.changes.append(
                LayerChange(
                    name=entry.name,
                    old_type=type(old).__name__,
                    new_type=type(new).__name__,
                    params_before=_own_params(old),
                    params_after=_own_params(new),
                    macs_per_position_before=_macs_per_position(old),
                    macs_per_position_after=_macs_per_position(new),
                    error=error,
                    detail=detail,
                    aliases=entry.aliases,
                )
            )
    # Everything was built and validated above; only now is the model touched.
    replace_modules(model, new_modules)
    try:
        if recalibration is not None:
            _recalibrate(model, recalibration, 64, f"{owner}: calibration")
    except BaseException:
        replace_modules(model, old_modules)
        raise
    result.params_before, result.params_after = params_before, _own_params(model)
    return result


def _check_plan(model: nn.Module, plan: object, owner: str) -> list[LayerPlan]:
    """A plan given by the caller: a list of :class:`LayerPlan` whose layers to convert exist in ``model``."""
    if not isinstance(plan, list) or not all(isinstance(p, LayerPlan) for p in plan):
        raise ValueError(f"{owner}: plan must be a list of LayerPlan (from select_layers), got {short_repr(plan)}")
    for entry in plan:
        if entry.action == "convert":
            try:
                model.get_submodule(entry.name)
            except (AttributeError, TypeError) as err:
                raise ValueError(f"{owner}: plan converts {entry.name!r}, which is no submodule of the model") from err
    return plan


def _check_calibration(model: nn.Module, calibration: Tensor | None, owner: str) -> None:
    """A calibration batch must be finite and run through the model, checked before anything changes."""
    if calibration is not None:
        check_finite_tensor("calibration", calibration, owner=owner)
        run_example(model, calibration, f"{owner}: calibration")


_NO_LAYERS = "the model has no conv layers (Conv1d/2d/3d, ConvTranspose1d/2d/3d)"


def _require_targets(
    plan: list[LayerPlan], owner: str, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None
) -> None:
    names = [alias for p in plan for alias in p.aliases]
    unmatched = [pattern for pattern in include or () if not _matches(names, (pattern,))]
    if unmatched:
        shown = ", ".join(p.name for p in plan[:8]) + (", ..." if len(plan) > 8 else "")
        raise ValueError(
            f"{owner}: include pattern(s) {unmatched} match no candidate layer; patterns are globs on qualified "
            f"layer names (candidates: {shown or 'none, ' + _NO_LAYERS})"
        )
    if not any(p.action == "convert" for p in plan):
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in plan) or _NO_LAYERS
        raise ValueError(
            f"{owner}: no layer matches the selection (include={include!r}, exclude={exclude!r}): {reasons}"
        )


def _check_optional_flags(owner: str, **flags: bool | None) -> None:
    for flag, value in flags.items():
        if value is not None:
            check_bool(flag, value, owner=owner)


def _selection_example(
    example_input: Tensor | ModelCall | None, calibration: Tensor | None
) -> Tensor | ModelCall | None:
    """What the layer selection runs: ``example_input``, else the first example of ``calibration`` (as the
    callbacks: one example)."""
    if example_input is not None:
        return example_input
    return None if calibration is None else calibration[:1]


def convert_to_ghost(
    model: nn.Module,
    include: Patterns = None,
    exclude: Patterns = None,
    ratio: int = 2,
    dw_size: int = 3,
    init: Literal["inherit", "random"] = "inherit",
    calibration: Tensor | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    plan: list[LayerPlan] | None = None,
    recalibrate_bn: bool = True,
    example_input: Tensor | ModelCall | None = None,
    skip_prediction: bool | None = None,
    progress: bool | None = None,
) -> ConversionResult:
    """Replace the selected convs of ``model`` by conv-only :class:`GhostConv2d` modules, in place.

    From Han et al., GhostNet (CVPR 2020). The host network's BatchNorm and activation stay where
    they are. ``nn.Conv1d``/``nn.Conv3d`` become :class:`GhostConv1d`/:class:`GhostConv3d` and transposed convs
    ``GhostConvTranspose{d}d`` (grouped transposed convs are skipped, with the reason). With ``init="inherit"``
    (default) the trained filters are mapped onto each Ghost module (kernel-space least squares, or on real
    activations when ``calibration`` — a batch of *model* inputs — is given; transposed convs are fitted in kernel
    space either way, and their change's detail says so). With ``calibration`` and ``recalibrate_bn`` the
    BatchNorm statistics are then re-estimated on it (:func:`recalibrate_batchnorm`): on a trained ResNet-20
    (digits) that took the accuracy right after conversion from 16% to 52% (random init: 11%). New parameters keep
    the ``requires_grad`` of the layer they replace. Layers whose weights are used outside them are
    skipped (see :func:`select_layers`), and so are the stem and the prediction layers (every head's output
    layers; ``skip_first``, ``skip_prediction``, ``skip_last`` as in :func:`select_layers`), found on
    ``example_input`` (a batch or a :class:`~lightning_cheapconv.calls.ModelCall`; default: the first example
    of ``calibration``) or in a ``torch.fx`` trace. A conversion that runs for more than a second shows a
    transient progress bar on stderr naming the layer (``progress``: ``None`` on a terminal and outside a
    Lightning Trainer, ``False`` never, ``True`` on any terminal).

    Atomic: on any error the model is left exactly as it was. Raises ``ValueError`` naming the argument
    (``ratio`` an int >= 2, ``dw_size`` an odd int >= 1, ``init`` ``"inherit"`` or ``"random"``, bools
    as bools, ``include`` patterns that match no layer), the ``calibration`` batch (NaN/inf values, or a
    shape the model cannot take), or the layer that cannot be converted (NaN/inf weights, say).

    Example::

        >>> model = torchvision.models.resnet18()
        >>> result = convert_to_ghost(model, exclude="layer4.*", ratio=2)
        >>> result.params_ratio > 1
        True
    """
    owner = "convert_to_ghost"
    check_instance("model", model, nn.Module, owner=owner)
    ratio, dw_size = check_ghost_sizes(ratio, dw_size, owner)
    check_choice("init", init, ("inherit", "random"), owner=owner)
    include_p = check_patterns("include", include, owner=owner)
    exclude_p = check_patterns("exclude", exclude, owner=owner)
    for flag, value in (("skip_first", skip_first), ("skip_last", skip_last), ("recalibrate_bn", recalibrate_bn)):
        check_bool(flag, value, owner=owner)
    _check_optional_flags(owner, skip_prediction=skip_prediction, progress=progress)
    _check_calibration(model, calibration, owner)
    if plan is None:
        plan = select_layers(
            model,
            "ghost",
            include,
            exclude,
            skip_first,
            skip_last,
            ratio=ratio,
            dw_size=dw_size,
            example_input=_selection_example(example_input, calibration),
            skip_prediction=skip_prediction,
        )
    _require_targets(_check_plan(model, plan, owner), owner, include_p, exclude_p)
    targets = [p.name for p in plan if p.action == "convert"]
    fitted = [name for name in targets if fits_on_activations(model.get_submodule(name))]
    inputs = capture_inputs(model, calibration, fitted) if calibration is not None and init == "inherit" else {}

    def build(name: str, old: nn.Module) -> tuple[nn.Module, float | None, str]:
        new, error = ghost_from_conv(old, ratio, dw_size, init, inputs.get(name), name)
        detail = f"s={ratio}, d={dw_size}, init={init}"
        if init == "inherit" and not fits_on_activations(old):
            detail += ", kernel-space fit" + (
                ": transposed convs are not fitted on the calibration batch" if calibration is not None else ""
            )
        return new, error, detail

    return _convert(model, "ghost", plan, build, calibration if recalibrate_bn else None, owner, progress)


def decompose_structured(
    model: nn.Module,
    channel_ratio: float = 1.0,
    kernel_reduction: int | None = 1,
    kernel_size: int | tuple[int, int] | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    specs: dict[str, StructureSpec] | None = None,
    linear: bool = False,
    skip_first: bool = True,
    skip_last: bool = True,
    plan: list[LayerPlan] | None = None,
    calibration: Tensor | None = None,
    example_input: Tensor | ModelCall | None = None,
    skip_prediction: bool | None = None,
    progress: bool | None = None,
) -> ConversionResult:
    """Project the selected layers onto structured kernels and replace them by their decomposed form.

    From Bhalgat et al., NeurIPS 2020. Every conv type converts: ``nn.Conv1d/2d/3d`` into
    ``StructuredConv{d}d``, ``nn.ConvTranspose{d}d`` into ``StructuredConvTranspose{d}d`` (its structure is on each
    input channel's ``(C_out/groups, K...)`` block, so ``c`` counts output channels per group there: see
    :func:`structure_spec_for`). Hidden sizes come from ``channel_ratio`` (``c = C·ratio``)
    and ``kernel_reduction`` (``n = k - reduction``) or ``kernel_size``, or per layer from
    ``specs`` (qualified name -> :class:`StructureSpec`). Each change reports the relative
    projection residual ``‖W - PW‖/‖W‖`` (how far the weights moved; 0 if already structured).
    Given ``calibration`` (a batch of model inputs), the BatchNorm statistics are re-estimated on it
    afterwards (:func:`recalibrate_batchnorm`). New parameters keep the ``requires_grad`` of the layer
    they replace. Layers whose weights are used outside them are skipped (see :func:`select_layers`), and so
    are the stem and the prediction layers, found on ``example_input`` (default: the first example of
    ``calibration``) or in a ``torch.fx`` trace; ``skip_first``, ``skip_prediction``, ``skip_last`` and
    ``progress`` as in :func:`convert_to_ghost`.

    Atomic: on any error the model is left exactly as it was. Raises ``ValueError`` naming the argument
    (``channel_ratio`` in (0, 1], ``kernel_reduction`` an int >= 0, ``kernel_size`` an int or pair >= 1,
    bools as bools, ``include`` patterns that match no layer, ``specs`` for layers that are no targets),
    the ``calibration`` batch (NaN/inf values, or a shape the model cannot take), or the layer that cannot
    be converted (a spec out of range, NaN/inf weights).

    Example::

        >>> model = torchvision.models.resnet18()
        >>> result = decompose_structured(model, channel_ratio=0.5)
        >>> [c.error for c in result.changes][:2]     # projection residuals
    """
    owner = "decompose_structured"
    check_instance("model", model, nn.Module, owner=owner)
    check_structure_ratios(channel_ratio, kernel_reduction, kernel_size, owner)
    include_p = check_patterns("include", include, owner=owner)
    exclude_p = check_patterns("exclude", exclude, owner=owner)
    for flag, value in (("linear", linear), ("skip_first", skip_first), ("skip_last", skip_last)):
        check_bool(flag, value, owner=owner)
    _check_optional_flags(owner, skip_prediction=skip_prediction, progress=progress)
    if specs is not None and not (
        isinstance(specs, dict) and all(isinstance(k, str) and isinstance(v, StructureSpec) for k, v in specs.items())
    ):
        raise ValueError(f"{owner}: specs must be a dict of layer name -> StructureSpec, got {short_repr(specs)}")
    specs = dict(specs or {})
    _check_calibration(model, calibration, owner)
    if plan is None:
        plan = select_layers(
            model,
            "structured",
            include,
            exclude,
            skip_first,
            skip_last,
            linear=linear,
            channel_ratio=channel_ratio,
            kernel_reduction=kernel_reduction,
            kernel_size=kernel_size,
            example_input=_selection_example(example_input, calibration),
            skip_prediction=skip_prediction,
        )
    _require_targets(_check_plan(model, plan, owner), owner, include_p, exclude_p)
    unknown = set(specs) - {p.name for p in plan}
    if unknown:
        raise ValueError(f"{owner}: specs name layers that are not candidates: {sorted(unknown)}")
    skipped = [f"{p.name}: {p.reason}" for p in plan if p.action != "convert" and p.name in specs]
    if skipped:  # a spec would be silently ignored
        raise ValueError(f"{owner}: specs name layers that the selection skips ({'; '.join(skipped)})")

    def build(name: str, old: nn.Module) -> tuple[nn.Module, float | None, str]:
        spec = specs.get(name) or structure_spec_for(old, channel_ratio, kernel_reduction, kernel_size, name)
        new, residual = structured_from_dense(old, spec, name)
        return new, residual, f"c={spec.channels}, n={spec.kernel_size}"

    return _convert(model, "structured", plan, build, calibration, owner, progress)
