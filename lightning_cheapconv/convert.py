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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .inherit import fit_ghost_from_activations, fit_ghost_from_kernels
from .nn import GhostConv2d, StructuredConv2d, StructuredLinear
from .structure import StructureSpec, spec_from_ratios, structural_residual

__all__ = [
    "LayerPlan",
    "LayerChange",
    "ConversionResult",
    "select_layers",
    "replace_modules",
    "ghost_from_conv",
    "structured_from_dense",
    "structure_spec_for",
    "convert_to_ghost",
    "decompose_structured",
    "capture_inputs",
    "recalibrate_batchnorm",
]

Method = Literal["ghost", "structured"]
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


def _as_patterns(patterns: Patterns) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    return tuple(patterns)


def _matches(names: Sequence[str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module object (a shared module has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def _ghost_skip_reason(conv: nn.Conv2d, ratio: int, dw_size: int) -> str | None:
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
    m = -(-conv.out_channels // ratio)
    k_h, k_w = conv.kernel_size
    bias = conv.bias is not None
    return m * conv.in_channels * k_h * k_w + m * bias + m * (ratio - 1) * (dw_size * dw_size + bias)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def structure_spec_for(
    layer: nn.Module,
    channel_ratio: float = 1.0,
    kernel_reduction: int | None = 1,
    kernel_size: int | tuple[int, int] | None = None,
    name: str = "layer",
) -> StructureSpec:
    """The hidden sizes a Conv2d (per group) or Linear gets from the ratios (see :func:`spec_from_ratios`)."""
    if isinstance(layer, nn.Conv2d):
        shape = (layer.in_channels // layer.groups, *layer.kernel_size)
    elif isinstance(layer, nn.Linear):
        shape = (layer.in_features,)
    else:
        raise ValueError(f"{name}: expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    return spec_from_ratios(shape, channel_ratio, kernel_reduction, kernel_size, layer=name)


def _structured_skip_reason(layer: nn.Module, spec: StructureSpec) -> str | None:
    if isinstance(layer, nn.Conv2d):
        full = (layer.in_channels // layer.groups, *layer.kernel_size)
        if layer.kernel_size == (1, 1) and spec.channels == full[0]:
            return "1x1 conv: no spatial structure, and channel_ratio=1.0 leaves channels whole"
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
) -> list[LayerPlan]:
    """Plan which layers of ``model`` a method converts, and why each other candidate is skipped.

    Candidates are ``nn.Conv2d`` layers (and ``nn.Linear`` with ``linear=True``, structured only)
    in registration order. Defaults follow the papers: the first conv (the stem) and the last
    layer (the classifier) are kept (``skip_first``/``skip_last``); Ghost skips depthwise and
    grouped convs; structured skips 1x1 convs unless ``channel_ratio < 1``. ``include``/``exclude``
    are glob patterns on qualified names (``"layer1.*"``, ``"*.conv2"``); a shared module matches
    through any of its names and is planned once.
    """
    include_p, exclude_p = _as_patterns(include), _as_patterns(exclude)
    if method not in ("ghost", "structured"):
        raise ValueError(f"method={method!r}; valid methods are 'ghost' and 'structured'")
    if linear and method == "ghost":
        raise ValueError("linear=True applies to the structured method only")
    names = _module_names(model)
    kinds = (nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)
    seen: set[int] = set()
    layers: list[tuple[str, nn.Module]] = []
    # Layers inside cheap modules (a Ghost module's primary conv, say) are parts, not candidates.
    cheap = [
        (n, m) for n, m in model.named_modules() if isinstance(m, (GhostConv2d, StructuredConv2d, StructuredLinear))
    ]
    cheap_prefixes = tuple(n + "." for n, _ in cheap)
    for name, module in model.named_modules():
        if name.startswith(cheap_prefixes):
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in seen:
            seen.add(id(module))
            layers.append((name, module))
    first_conv = next((n for n, m in layers if isinstance(m, nn.Conv2d)), None)
    last_layer = layers[-1][0] if layers else None
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
        if type(module) not in (nn.Conv2d, nn.Linear):
            skip(f"subclass {kind} of nn.{kinds[0].__name__} may change forward(); only plain layers convert")
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
        if skip_last and name == last_layer:
            skip("last layer (classifier) is kept, as in the papers")
            continue
        if method == "ghost":
            reason = _ghost_skip_reason(module, ratio, dw_size)
            action_text = f"GhostConv2d(ratio={ratio}, dw_size={dw_size})"
        else:
            spec = structure_spec_for(module, channel_ratio, kernel_reduction, kernel_size, name)
            reason = _structured_skip_reason(module, spec)
            action_text = f"structured c={spec.channels}, n={spec.kernel_size}"
        if reason is not None:
            skip(reason)
            continue
        plan.append(LayerPlan(name, kind, "convert", action_text, aliases, order))
    return plan


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Swap submodules by qualified name (inside Sequential, ModuleList, ModuleDict or attributes).

    Every other name under which the same module object is reachable is redirected too, so a
    shared layer stays shared. Names are resolved before anything is swapped: an unknown name
    raises ``ValueError`` and leaves the model unchanged.
    """
    names = _module_names(model)
    targets: list[tuple[str, nn.Module]] = []
    for name, new in replacements.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"replace_modules: model has no submodule {name!r}") from err
        if "" in names[id(old)]:
            raise ValueError("replace_modules: cannot replace the root module itself")
        targets.extend((alias, new) for alias in names[id(old)])
    for alias, new in targets:
        model.set_submodule(alias, new)


def ghost_from_conv(
    conv: nn.Conv2d,
    ratio: int = 2,
    dw_size: int = 3,
    init: Literal["inherit", "random"] = "inherit",
    calibration_input: Tensor | None = None,
    name: str = "conv",
) -> tuple[GhostConv2d, float | None]:
    """Build the conv-only :class:`GhostConv2d` that replaces ``conv``; returns it and its fit error.

    ``init="inherit"`` maps the trained filters onto the Ghost module (DESIGN.md section 3):
    ``m`` filters become the primary conv unchanged, the others are fitted as depthwise ghosts,
    in kernel space or, given ``calibration_input`` (this layer's input), on real activations;
    the original output channel order is kept. ``init="random"`` starts from fresh weights.
    """
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name}: expected nn.Conv2d, got {type(conv).__name__}")
    reason = _ghost_skip_reason(conv, ratio, dw_size) if isinstance(ratio, int) and ratio >= 2 else None
    if reason is not None:
        raise ValueError(f"{name}: cannot convert to Ghost: {reason}")
    weight = conv.weight
    try:
        ghost = GhostConv2d(
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
    if init == "random":
        return ghost, None
    if init != "inherit":
        raise ValueError(f"{name}: init={init!r}; valid values are 'inherit' and 'random'")
    with torch.no_grad():
        if calibration_input is not None:
            fit = fit_ghost_from_activations(conv, calibration_input.to(weight.device), ratio, dw_size)
        else:
            fit = fit_ghost_from_kernels(conv, ratio, dw_size)
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


def structured_from_dense(
    layer: nn.Module, spec: StructureSpec, name: str = "layer"
) -> tuple[StructuredConv2d | StructuredLinear, float]:
    """Project and decompose a Conv2d/Linear; returns the new layer and the relative projection residual."""
    if isinstance(layer, nn.Conv2d):
        spec.validate((layer.in_channels // layer.groups, *layer.kernel_size), layer=name)
        new: StructuredConv2d | StructuredLinear = StructuredConv2d.from_dense(layer, spec.channels, spec.kernel_size)
    elif isinstance(layer, nn.Linear):
        spec.validate((layer.in_features,), layer=name)
        new = StructuredLinear.from_dense(layer, spec.channels)
    else:
        raise ValueError(f"{name}: expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    with torch.no_grad():
        residual = float(structural_residual(layer.weight.detach().double(), spec))
    return new, residual


def _macs_per_position(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return (
            module.out_channels * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        )
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, StructuredConv2d):
        return module.weight.numel()
    if isinstance(module, StructuredLinear):
        return module.weight.numel()
    if isinstance(module, GhostConv2d):
        return _macs_per_position(module.primary) + module.cheap.weight.numel()
    raise TypeError(type(module).__name__)


def capture_inputs(model: nn.Module, example_input: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Run ``model`` once in eval mode on ``example_input`` and return the input each named layer sees."""
    captured: dict[str, Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            captured.setdefault(name, args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    # Restore each module's own mode (a frozen BatchNorm in eval mode inside a training model stays so).
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for module, training in modes:
            module.training = training
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise ValueError(f"calibration: layers {missing} were not called in the forward pass")
    return captured


def recalibrate_batchnorm(model: nn.Module, inputs: Tensor, batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running statistics from ``inputs`` (a batch of *model* inputs).

    After a conversion the layers before each BatchNorm compute something slightly different, so
    the statistics it learned no longer standardize their outputs; this is what makes an inherited
    network usable before any fine-tuning. The statistics become the plain average over ``inputs``
    (in chunks of ``batch_size``); every other module runs in eval mode (no dropout) and each
    module's own mode and momentum are restored afterwards. Returns the number of BatchNorms updated.

    Example::

        >>> convert_to_ghost(model)
        >>> recalibrate_batchnorm(model, next(iter(train_loader))[0])
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    modes = [(module, module.training) for module in model.modules()]
    momenta = [(norm, norm.momentum) for norm in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the calibration chunks
            norm.train()
        with torch.no_grad():
            for chunk in inputs.split(batch_size):
                model(chunk)
    finally:
        for module, training in modes:
            module.training = training
        for norm, momentum in momenta:
            norm.momentum = momentum
    return len(norms)


def _convert(
    model: nn.Module,
    method: str,
    plan: list[LayerPlan],
    build: Callable[[str, nn.Module], tuple[nn.Module, float | None, str]],
) -> ConversionResult:
    params_before = _own_params(model)
    result = ConversionResult(method=method, plan=plan)
    new_modules: dict[str, nn.Module] = {}
    for entry in plan:
        if entry.action != "convert":
            continue
        old = model.get_submodule(entry.name)
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
    result.params_before, result.params_after = params_before, _own_params(model)
    return result


def _require_targets(plan: list[LayerPlan], method: str) -> None:
    if not any(p.action == "convert" for p in plan):
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in plan) or "the model has no Conv2d layers"
        raise ValueError(f"{method}: no layer matches the selection ({reasons})")


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
) -> ConversionResult:
    """Replace the selected convs of ``model`` by conv-only :class:`GhostConv2d` modules, in place.

    From Han et al., GhostNet (CVPR 2020). The host network's BatchNorm and activation stay where
    they are. With ``init="inherit"`` (default) the trained filters are mapped onto each Ghost
    module (kernel-space least squares, or on real activations when ``calibration`` — a batch of
    *model* inputs — is given). With ``calibration`` and ``recalibrate_bn`` the BatchNorm statistics
    are then re-estimated on it (:func:`recalibrate_batchnorm`): on a trained ResNet-20 (digits) that
    took the accuracy right after conversion from 16% to 52% (random init: 11%). Atomic: if any
    selected layer cannot be converted, the error names it and the model is unchanged.

    Example::

        >>> model = torchvision.models.resnet18()
        >>> result = convert_to_ghost(model, exclude="layer4.*", ratio=2)
        >>> result.params_ratio > 1
        True
    """
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 2:
        raise ValueError(f"convert_to_ghost: ratio={ratio!r} is out of range; valid range is an int >= 2")
    if not isinstance(dw_size, int) or dw_size < 1 or dw_size % 2 == 0:
        raise ValueError(f"convert_to_ghost: dw_size={dw_size!r} is out of range; valid values are odd ints >= 1")
    if init not in ("inherit", "random"):
        raise ValueError(f"convert_to_ghost: init={init!r}; valid values are 'inherit' and 'random'")
    if plan is None:
        plan = select_layers(model, "ghost", include, exclude, skip_first, skip_last, ratio=ratio, dw_size=dw_size)
    _require_targets(plan, "convert_to_ghost")
    targets = [p.name for p in plan if p.action == "convert"]
    inputs = capture_inputs(model, calibration, targets) if calibration is not None and init == "inherit" else {}

    def build(name: str, old: nn.Module) -> tuple[nn.Module, float | None, str]:
        new, error = ghost_from_conv(old, ratio, dw_size, init, inputs.get(name), name)
        return new, error, f"s={ratio}, d={dw_size}, init={init}"

    result = _convert(model, "ghost", plan, build)
    if calibration is not None and recalibrate_bn:
        recalibrate_batchnorm(model, calibration)
    return result


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
) -> ConversionResult:
    """Project the selected layers onto structured kernels and replace them by their decomposed form.

    From Bhalgat et al., NeurIPS 2020. Hidden sizes come from ``channel_ratio`` (``c = C·ratio``)
    and ``kernel_reduction`` (``n = k - reduction``) or ``kernel_size``, or per layer from
    ``specs`` (qualified name -> :class:`StructureSpec`). Each change reports the relative
    projection residual ``‖W - PW‖/‖W‖`` (how far the weights moved; 0 if already structured).
    Given ``calibration`` (a batch of model inputs), the BatchNorm statistics are re-estimated on it
    afterwards (:func:`recalibrate_batchnorm`). Atomic: on any invalid layer or spec the error
    names it and the model is unchanged.

    Example::

        >>> model = torchvision.models.resnet18()
        >>> result = decompose_structured(model, channel_ratio=0.5)
        >>> [c.error for c in result.changes][:2]     # projection residuals
    """
    specs = dict(specs or {})
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
        )
    _require_targets(plan, "decompose_structured")
    unknown = set(specs) - {p.name for p in plan}
    if unknown:
        raise ValueError(f"decompose_structured: specs name layers that are not candidates: {sorted(unknown)}")
    skipped = [f"{p.name}: {p.reason}" for p in plan if p.action != "convert" and p.name in specs]
    if skipped:  # a spec would be silently ignored
        raise ValueError(f"decompose_structured: specs name layers that the selection skips ({'; '.join(skipped)})")

    def build(name: str, old: nn.Module) -> tuple[nn.Module, float | None, str]:
        spec = specs.get(name) or structure_spec_for(old, channel_ratio, kernel_reduction, kernel_size, name)
        new, residual = structured_from_dense(old, spec, name)
        return new, residual, f"c={spec.channels}, n={spec.kernel_size}"

    result = _convert(model, "structured", plan, build)
    if calibration is not None:
        recalibrate_batchnorm(model, calibration)
    return result
