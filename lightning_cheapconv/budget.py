"""Compression to a budget: a per-layer plan across methods (keep dense, Ghost, structured) that meets a MACs,
parameter and/or latency budget with the least total sensitivity, applied atomically.

Planned layers are the plain convs ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (:data:`PLANNED_TYPES`) that
:func:`~lightning_cheapconv.convert.select_layers` selects for a method; transposed convs, which the conversions also
take, stay as they are and are listed in :attr:`BudgetPlan.skipped` with :data:`TRANSPOSED_REASON`. For every planned
conv the candidates are: keep it dense; a conv-only Ghost module (Han et al., CVPR 2020; ``GhostConv{1,2,3}d``) with
``s`` in :data:`GHOST_RATIOS` (:data:`MIXED_GHOST_RATIOS` where the layer may also be structured: larger ``s``
fine-tuned far worse than its output error promised) and ``d = 3`` per side; a structured convolution (Bhalgat et
al., NeurIPS 2020; ``StructuredConv{1,2,3}d``) with hidden sizes ``c`` in ``C·`` :data:`CHANNEL_RATIOS` and ``n`` in
``{k - 1, k}`` per side (the full ``(C, k)`` excluded). With ``channel_multiple`` the grid keeps only the channel
counts a runtime runs fast: structured ``c`` and Ghost intrinsic maps ``ceil(C_out / s)`` multiples of it (``c = C``
always allowed). Each candidate has

- a **cost**: MACs and parameters counted with the formulas of :func:`~lightning_cheapconv.complexity.count_complexity`
  (MACs per output position times the positions the dense layer computes for one example: the first item of the
  example's batch), so the converted model meets the budget when counted independently; with ``latency_ms``, its
  latency on the example's device and batch, timed alone on a random input of the shape the layer sees
  (:func:`~lightning_cheapconv.deploy.time_interleaved`), in PyTorch eager or, with
  ``latency_runtime="onnxruntime"``, exported to ONNX and run in ONNX Runtime (the planned model is then timed as a
  whole, and allocated again while over the budget: :func:`compress_to_budget`);
- a **sensitivity**: the squared relative output error ``‖y' - y‖² / ‖y‖²`` of the layer on the calibration batch,
  after weight inheritance (Ghost, fitted on the layer's real activations) or projection (structured): the per-layer
  reconstruction error that channel pruning minimizes (He et al., ICCV 2017, "Channel Pruning for Accelerating Very
  Deep Neural Networks"). The squared errors of the layers are added (the output noise energy of independent
  perturbations). It costs one forward pass; AIMET's greedy per-layer compression-ratio selection instead evaluates the
  whole network once per layer and ratio, and the rise in the loss would likewise cost a forward pass per layer and
  candidate (and labels). Which of the two predicts accuracy better is measured by ``benchmarks/sensitivity.py``
  (BENCHMARKS.md, section 6b: the Spearman correlation of each with the accuracy drop over random and greedy plans).

Allocation is a multiple-choice knapsack solved greedily by sensitivity per unit of cost saved (marginal analysis, as
in the LP relaxation of the multiple-choice knapsack, Sinha & Zoltners 1979): from the all-dense plan, repeatedly
take the step (one layer to a cheaper candidate) with the least rise in sensitivity per unit of the budget excess it
removes, until every budget is met; then fill: repeatedly take back the step that lowers the sensitivity most per
unit of budget it uses while every budget stays met. Deterministic (fixed-seed sampling, ties broken by layer order).

Example::

    >>> model = get_model("resnet20", 10)
    >>> result = compress_to_budget(model, torch.randn(1, 3, 32, 32), macs=0.5, calibration=images)
    >>> print(result)                            # the per-layer plan as a table
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn

from .calls import ModelCall, as_calls
from .complexity import count_complexity, format_count
from .convert import (
    ConversionResult,
    LayerPlan,
    _convert,
    ghost_from_conv,
    select_layers,
    structure_spec_for,
    structured_from_dense,
)
from .deploy import time_interleaved
from .deploy.onnx_runtime import onnx_runner, require_onnxruntime
from .inherit import ghost_output_errors
from .report import plain_text
from .reuse import copy_without_hooks, evaluating
from .structure import StructureSpec, project
from .validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_finite_tensor,
    check_instance,
    check_int,
    check_patterns,
    short_repr,
)

__all__ = [
    "BudgetPlan",
    "BudgetResult",
    "Candidate",
    "LayerBudget",
    "apply_budget_plan",
    "compress_to_budget",
    "plan_budget",
]

GHOST_RATIOS: tuple[int, ...] = (2, 3, 4)
"""Ghost ratios ``s`` tried per layer that only Ghost may convert (``d =`` :data:`GHOST_DW_SIZE`)."""
MIXED_GHOST_RATIOS: tuple[int, ...] = (2,)
"""Ghost ratios ``s`` tried per layer that a structured convolution may also convert. Ghost modules with ``s >= 3``
fine-tuned far below what their output errors promised: on the digits benchmark (ResNet-20, 8 seeds, the protocol of
BENCHMARKS.md table 3b) mixed plans at 0.25 of the MACs chose Ghost ``s = 4`` for up to 10 of 18 layers and ended
1.14 points below the same plans with ``s = 2`` only (96.64 against 97.78%, better or equal on 7 of 8 seeds); with
it the mixed plans of table 3b meet channel pruning at every budget. Ghost-only plans keep :data:`GHOST_RATIOS`
(below about half the MACs they need ``s >= 3``)."""
GHOST_DW_SIZE = 3
CHANNEL_RATIOS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.375, 0.25)
"""Structured hidden channels tried per layer: ``c = round(C · ratio)`` (at least 1)."""
KERNEL_REDUCTIONS: tuple[int, ...] = (1, 0)
"""Structured hidden kernel sizes tried per layer: ``n = k - reduction`` (at least 1)."""
TOLERANCE = 0.02
"""How far below a MACs/params budget the plan may land: ``[fraction - 0.02, fraction]`` of the original (where the
candidates' granularity allows; the plan never lands above)."""
SENSITIVITY_POSITIONS = 1024
"""Output positions per layer (first images of the calibration batch) that sensitivities and Ghost fits use."""
GHOST_SENSITIVITY_POSITIONS = 256
"""Positions (drawn with a fixed seed) of the Ghost least-squares fits that score each ratio."""
NCHWC_CHANNEL_MULTIPLE = 16
"""The ``channel_multiple`` that suits ONNX Runtime on x86 CPUs with AVX-512: its ``NchwcTransformer`` runs a conv in
the blocked NCHWc layout only when its input channels are a multiple of the block size (``MlasNchwcGetBlockSize()``:
16 with AVX-512, 8 with AVX2) and grouped convs only when their output channels are too. Measured: BENCHMARKS.md,
table 3b."""
METHODS = ("ghost", "structured")
BUDGETS = ("macs", "params", "latency_ms")
LATENCY_RUNTIMES = ("pytorch", "onnxruntime")
"""Where a ``latency_ms`` budget is measured: PyTorch eager, or ONNX Runtime on each form's
``torch.onnx.export(dynamo=True)`` graph (:func:`~lightning_cheapconv.deploy.onnx_runner`)."""
LATENCY_ROUNDS = 4
"""Whole-model measurements of a latency plan: while the planned model, timed as a whole against the dense one, is
over the budget, the gap is added to the latency outside the planned layers and the layers are allocated again."""
PLANNED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layer types a budget plans: plain convs (and their plain subclasses, as :func:`select_layers` admits them).
Transposed convs, which the conversions also take, are skipped with :data:`TRANSPOSED_REASON`."""
TRANSPOSED_REASON = (
    "transposed conv: not planned by budgets (their costs are per input position and their Ghost weights inherit in "
    "kernel space only); convert it with convert_to_ghost or decompose_structured"
)
_PlainConv = nn.Conv1d | nn.Conv2d | nn.Conv3d


@dataclass(frozen=True)
class Candidate:
    """One option for one layer: its method and hyper-parameters, costs and sensitivity.

    ``macs`` (per example: a forward pass of the first item of the example's batch) and ``params`` are counted as
    :func:`count_complexity` counts them; ``latency_ms`` is the layer's median time on the whole example (``None``
    unless a latency budget was asked); ``sensitivity`` the squared relative output error on the calibration batch
    (0 for dense).

    Example::

        >>> Candidate("ghost", ratio=2, macs=1000, params=300, sensitivity=0.01).label
        'ghost s=2'
    """

    method: str  # "dense", "ghost" or "structured"
    ratio: int | None = None
    channels: int | None = None
    kernel_size: tuple[int, ...] | None = None
    macs: int = 0
    params: int = 0
    sensitivity: float = 0.0
    latency_ms: float | None = None

    @property
    def label(self) -> str:
        """``dense``, ``ghost s=<s>`` or ``structured c=<c> n=<n_h>x<n_w>`` (one side per dimension: ``n=<n>`` in 1-d,
        ``n=<n_d>x<n_h>x<n_w>`` in 3-d)."""
        if self.method == "ghost":
            return f"ghost s={self.ratio}"
        if self.method == "structured":
            return f"structured c={self.channels} n={'x'.join(map(str, self.kernel_size))}"
        return "dense"

    def cost(self, key: str) -> float:
        return float(getattr(self, key))


@dataclass
class LayerBudget:
    """One planned layer: its candidates (dense first) and the index of the one chosen."""

    name: str
    type: str
    candidates: tuple[Candidate, ...]
    chosen: int = 0
    aliases: tuple[str, ...] = ()

    @property
    def choice(self) -> Candidate:
        return self.candidates[self.chosen]


@dataclass
class BudgetPlan:
    """A per-layer plan: what each selected layer becomes, and the totals it predicts.

    ``budgets`` are the limits asked (``macs``/``params`` as fractions of the original, ``latency_ms`` in ms);
    ``before`` the original totals (MACs per example, parameters, latency in ms when measured);
    ``fixed`` the part of each total outside the planned layers. ``skipped`` lists the layers not planned, with why.
    ``channel_multiple``: the multiple the candidates' new channel counts were restricted to (1: none);
    ``latency_runtime``: where the latencies were measured (:data:`LATENCY_RUNTIMES`); ``measured_latency_ms``: the
    planned model's latency timed as a whole (against the dense model, in the units of ``before``), with a
    ``latency_ms`` budget.

    Example::

        >>> plan = plan_budget(model, example, macs=0.5, calibration=images)
        >>> plan.fraction("macs") <= 0.5
        True
    """

    layers: list[LayerBudget]
    budgets: dict[str, float]
    before: dict[str, float]
    fixed: dict[str, float]
    skipped: list[LayerPlan] = field(default_factory=list)
    channel_multiple: int = 1
    latency_runtime: str = "pytorch"
    measured_latency_ms: float | None = None

    def total(self, key: str) -> float:
        """The predicted whole-model total of ``key`` (``macs``, ``params`` or ``latency_ms``)."""
        return self.fixed[key] + sum(layer.choice.cost(key) for layer in self.layers)

    def fraction(self, key: str) -> float:
        """The predicted total of ``key`` over the original's."""
        return self.total(key) / self.before[key] if self.before[key] else math.nan

    @property
    def sensitivity(self) -> float:
        """The plan's total sensitivity (sum of the chosen candidates' squared relative output errors)."""
        return sum(layer.choice.sensitivity for layer in self.layers)

    def choices(self) -> dict[str, str]:
        """Layer name -> chosen candidate label."""
        return {layer.name: layer.choice.label for layer in self.layers}

    def table(self) -> Table:
        """The plan as a rich table: one row per planned layer, then the totals against the budgets."""
        timed = "latency_ms" in self.before
        table = Table(title="Budget plan", caption=self._caption(), caption_justify="left")
        table.add_column("layer", overflow="fold")
        table.add_column("choice")
        latency = "latency ms" + (", ONNX Runtime" if self.latency_runtime == "onnxruntime" else "")
        for header in ("MACs", "params", *((latency,) if timed else ()), "rel. error"):
            table.add_column(header, justify="right")
        for layer in self.layers:
            choice, dense = layer.choice, layer.candidates[0]
            cells = [
                layer.name,
                choice.label,
                f"{format_count(dense.macs)} → {format_count(choice.macs)}",
                f"{format_count(dense.params)} → {format_count(choice.params)}",
            ]
            if timed:
                cells.append(f"{dense.latency_ms:.3g} → {choice.latency_ms:.3g}")
            cells.append(f"{math.sqrt(choice.sensitivity):.3g}")
            table.add_row(*cells, style="dim" if choice.method == "dense" else None)
        table.add_section()
        columns = [key for key in BUDGETS if key in self.before]  # the totals, each under its own column
        for key in columns:
            asked = self.budgets.get(key)
            limit = "" if asked is None else (f" (budget {asked:.4g} ms)" if key == "latency_ms" else f" ({asked:g})")
            if key == "latency_ms":
                measured = "" if self.measured_latency_ms is None else f", {self.measured_latency_ms:.3g} measured"
                value = f"{self.before[key]:.3g} → {self.total(key):.3g} ms predicted{measured}{limit}"
            else:
                value = (
                    f"{format_count(self.before[key])} → {format_count(self.total(key))}: "
                    f"{self.fraction(key):.3f}{limit}"
                )
            cells = [f"total {key}", "", *("" for _ in columns), ""]
            cells[2 + columns.index(key)] = value
            table.add_row(*cells, style="bold")
        return table

    def _caption(self) -> str:
        kinds = {m: sum(layer.choice.method == m for layer in self.layers) for m in ("dense", "ghost", "structured")}
        skipped = ", ".join(p.name for p in self.skipped[:3]) + (", …" if len(self.skipped) > 3 else "")
        skipped = f"{len(self.skipped)} not planned" + (f": {skipped}" if skipped else "")
        multiple = self.channel_multiple
        grid = f" New channel counts are multiples of {multiple} (channel_multiple)." if multiple != 1 else ""
        return (
            f"{kinds['ghost']} Ghost, {kinds['structured']} structured, {kinds['dense']} dense of {len(self.layers)} "
            f"planned layers ({skipped}). MACs = FLOPs / 2 per example, as count_complexity, "
            "the report and compression/macs count them; "
            f"fractions of the original (0.5 = half); rel. error = ‖y' - y‖ / ‖y‖ of the layer on the calibration "
            f"batch; total sensitivity (sum of squared errors) {self.sensitivity:.4g}.{grid}"
        )

    def __str__(self) -> str:
        return plain_text(self.table())

    def __rich__(self) -> Table:
        return self.table()


@dataclass
class BudgetResult(ConversionResult):
    """The outcome of :func:`compress_to_budget`: a :class:`ConversionResult` (``method="budget"``; ``changes``
    list the converted layers, Ghost and structured mixed) with the plan it applied in ``budget``.
    ``print(result)`` shows the per-layer plan as a table.

    Example::

        >>> result = compress_to_budget(model, example, macs=0.5)
        >>> result.budget.choices()["layer1.0.conv1"]
        'ghost s=2'
    """

    budget: BudgetPlan | None = None

    def __str__(self) -> str:
        return str(self.budget) if self.budget is not None else super().__str__()

    def __rich__(self) -> Table | str:
        return self.budget.table() if self.budget is not None else super().__str__()


@dataclass(frozen=True)
class _PlanSettings:
    """The planning arguments of :func:`plan_budget` other than the model, its example and the budgets, as given
    (checked by :func:`_check_arguments`)."""

    methods: object = METHODS
    calibration: object = None
    include: object = None
    exclude: object = None
    skip_first: object = True
    skip_last: object = True
    channel_multiple: object = 1
    latency_runtime: object = "pytorch"


def _check_arguments(
    owner: str, model: object, example_input: object, budgets: dict[str, object], settings: _PlanSettings
) -> tuple[dict[str, float], tuple[str, ...]]:
    check_instance("model", model, nn.Module, owner=owner)
    if not isinstance(example_input, (Tensor, ModelCall)):
        raise ValueError(
            f"{owner}: example_input must be a torch.Tensor batch of model inputs or a ModelCall, "
            f"got {type(example_input).__name__}"
        )
    asked: dict[str, float] = {}
    for key in ("macs", "params"):
        if budgets[key] is not None:
            asked[key] = check_finite_number(key, budgets[key], 0, 1, exclusive_minimum=True, owner=owner)
    if budgets["latency_ms"] is not None:
        asked["latency_ms"] = check_finite_number(
            "latency_ms", budgets["latency_ms"], 0, exclusive_minimum=True, owner=owner
        )
    if not asked:
        raise ValueError(
            f"{owner}: no budget given; pass at least one of macs (a fraction in (0, 1]), params (a fraction in "
            "(0, 1]) and latency_ms (> 0)"
        )
    chosen = check_methods(settings.methods, owner)
    if settings.calibration is not None:
        check_finite_tensor("calibration", settings.calibration, owner=owner)
    check_patterns("include", settings.include, owner=owner)
    check_patterns("exclude", settings.exclude, owner=owner)
    for flag, value in (("skip_first", settings.skip_first), ("skip_last", settings.skip_last)):
        check_bool(flag, value, owner=owner)
    check_int("channel_multiple", settings.channel_multiple, 1, owner=owner)
    check_choice("latency_runtime", settings.latency_runtime, LATENCY_RUNTIMES, owner=owner)
    if settings.latency_runtime != "pytorch":
        if "latency_ms" not in asked:
            raise ValueError(
                f"{owner}: latency_runtime={settings.latency_runtime!r} is where latency_ms is measured, and no "
                "latency_ms was given; pass latency_ms (> 0) or leave latency_runtime='pytorch'"
            )
        require_onnxruntime("latency_runtime='onnxruntime'")
        _single_tensor(owner, example_input)
    return asked, tuple(chosen)


def _single_tensor(owner: str, example_input: Tensor | ModelCall) -> Tensor:
    """The one input tensor of ``example_input`` (what an ONNX export of the whole model takes).

    Raises:
        ValueError: ``example_input`` is a call with other arguments than one tensor.
    """
    if isinstance(example_input, Tensor):
        return example_input
    if len(example_input.args) == 1 and not example_input.kwargs and isinstance(example_input.args[0], Tensor):
        return example_input.args[0]
    raise ValueError(
        f"{owner}: latency_runtime='onnxruntime' exports the whole model on its example input, which must be one "
        f"tensor; got a call with {len(example_input.args)} positional and {len(example_input.kwargs)} keyword "
        "argument(s)"
    )


def check_methods(methods: object, owner: str, error: type[Exception] = ValueError) -> tuple[str, ...]:
    """``methods`` as a tuple: one of :data:`METHODS` or a non-empty sequence of distinct ones.

    Raises:
        ValueError (or ``error``): naming ``methods``, its value and the valid values.
    """
    chosen = (methods,) if isinstance(methods, str) else methods
    if (
        not isinstance(chosen, Sequence)
        or not chosen
        or not all(isinstance(m, str) and m in METHODS for m in chosen)
        or len(set(chosen)) != len(chosen)
    ):
        raise error(
            f"{owner}: methods={short_repr(methods)} is not valid; valid values are non-empty sequences of distinct "
            f"methods from {METHODS}"
        )
    return tuple(chosen)


def _structured_specs(conv: _PlainConv, name: str, channel_multiple: int) -> list[StructureSpec]:
    """The structured grid of ``conv``: ``c`` from :data:`CHANNEL_RATIOS` (a multiple of ``channel_multiple`` unless
    ``c = C``), ``n`` from :data:`KERNEL_REDUCTIONS`, without the full ``(C, k)`` (no reduction) and without
    repeats."""
    channels = conv.in_channels // conv.groups
    specs: list[StructureSpec] = []
    for channel_ratio in CHANNEL_RATIOS:
        for reduction in KERNEL_REDUCTIONS:
            spec = structure_spec_for(conv, channel_ratio, reduction, name=name)
            runs_fast = spec.channels == channels or spec.channels % channel_multiple == 0
            if (spec.channels, *spec.kernel_size) != (channels, *conv.kernel_size) and runs_fast and spec not in specs:
                specs.append(spec)
    return specs


def _ghost_ratios(conv: _PlainConv, channel_multiple: int, mixed: bool) -> list[int]:
    """The Ghost ratios of ``conv``'s grid: ``s`` from :data:`GHOST_RATIOS` (:data:`MIXED_GHOST_RATIOS` where the
    layer may also be structured: ``mixed``) with fewer parameters than the dense layer and ``ceil(C_out / s)``
    intrinsic maps a multiple of ``channel_multiple``."""
    dense_params = _own_params(conv)
    return [
        s
        for s in (MIXED_GHOST_RATIOS if mixed else GHOST_RATIOS)
        if conv.out_channels >= s
        and _ghost_costs(conv, s)[1] < dense_params
        and -(-conv.out_channels // s) % channel_multiple == 0
    ]


def _ghost_costs(conv: _PlainConv, ratio: int) -> tuple[int, int]:
    """Ghost MACs per output position and parameters (the counts of a conv-only :class:`GhostConv2d`; ``d`` or ``d³``
    depthwise taps for a :class:`GhostConv1d`/:class:`GhostConv3d`)."""
    m = -(-conv.out_channels // ratio)
    taps = math.prod(conv.kernel_size)
    bias = conv.bias is not None
    cheap = GHOST_DW_SIZE ** len(conv.kernel_size)
    per_position = m * conv.in_channels * taps + m * (ratio - 1) * cheap
    params = m * conv.in_channels * taps + m * bias + m * (ratio - 1) * (cheap + bias)
    return per_position, params


def _dense_per_position(conv: _PlainConv) -> int:
    return conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _first(batch: Tensor | ModelCall | None) -> Tensor | ModelCall | None:
    if batch is None:
        return None
    return batch[:1] if isinstance(batch, Tensor) else batch.first(1)


class _Sensitivities:
    """Forward hooks that score every candidate of every planned layer on the layer's first call, and keep the first
    images of its input for the Ghost fits of the conversion.

    Both scores use the first images of the batch that give :data:`SENSITIVITY_POSITIONS` output positions.
    Structured: ``‖conv(x, W - PW)‖² / ‖y‖²``, all specs of the layer in one conv. Ghost:
    :func:`~lightning_cheapconv.inherit.ghost_output_errors`, the error of weight inheritance on activations (the
    same least-squares pair fits as the conversion's, on :data:`GHOST_SENSITIVITY_POSITIONS` positions drawn with a
    fixed seed, computed once per layer; intrinsics and ghosts assigned for each ratio).
    """

    def __init__(self, specs: dict[str, list[StructureSpec]], ratios: dict[str, list[int]]) -> None:
        self.specs, self.ratios = specs, ratios
        self.structured: dict[str, dict[StructureSpec, float]] = {}
        self.ghost: dict[str, dict[int, float]] = {}
        self.inputs: dict[str, Tensor] = {}

    def __call__(self, module: _PlainConv, args: tuple, output: Tensor, name: str) -> None:
        if name in self.structured:
            return  # a layer called twice is scored on its first call
        x = args[0]
        positions = max(1, math.prod(output.shape[2:]))
        count = min(x.shape[0], max(1, math.ceil(SENSITIVITY_POSITIONS / positions)))
        x, y = x[:count].float(), output[:count].float()
        self.structured[name] = _structured_errors(module, x, y, self.specs[name])
        self.ghost[name] = ghost_output_errors(
            y, self.ratios[name], GHOST_DW_SIZE, module.bias is not None, GHOST_SENSITIVITY_POSITIONS, name
        )
        if self.ratios[name]:
            self.inputs[name] = args[0][:count].detach()

    def zero(self, names: Iterable[str]) -> None:
        """Score every candidate of ``names`` 0 without a forward pass (only the costs are wanted)."""
        for name in names:
            self.structured[name] = dict.fromkeys(self.specs[name], 0.0)
            self.ghost[name] = dict.fromkeys(self.ratios[name], 0.0)


def _structured_errors(
    conv: _PlainConv, x: Tensor, y: Tensor, specs: list[StructureSpec]
) -> dict[StructureSpec, float]:
    if not specs:
        return {}
    energy = float(y.pow(2).sum().clamp_min(1e-30))
    weight = conv.weight.detach().float()
    residuals = [weight - project(weight, spec) for spec in specs]
    if conv.groups == 1:  # one conv for all specs: their residual kernels stacked along the output channels
        errors = conv._conv_forward(x, torch.cat(residuals), None).pow(2).sum([0, *range(2, y.dim())])
        errors = errors.view(len(specs), -1).sum(1).tolist()
    else:
        errors = [float(conv._conv_forward(x, r, None).pow(2).sum()) for r in residuals]
    return {spec: error / energy for spec, error in zip(specs, errors, strict=True)}


def _selection(
    model: nn.Module,
    methods: tuple[str, ...],
    include: Any,
    exclude: Any,
    skip_first: bool,
    skip_last: bool,
    example: Tensor | ModelCall,
) -> tuple[dict[str, set[str]], list[LayerPlan], dict[str, LayerPlan]]:
    """Which methods may convert each layer (:func:`select_layers` of each method, with the settings that admit the
    most candidates), the layers no method converts (with their reasons), and each planned layer's entry."""
    allowed: dict[str, set[str]] = {}
    entries: dict[str, list[LayerPlan]] = {}
    for method in methods:
        settings = {"ratio": min(GHOST_RATIOS)} if method == "ghost" else {"channel_ratio": min(CHANNEL_RATIOS)}
        plan = select_layers(
            model, method, include, exclude, skip_first, skip_last, example_input=_first(example), **settings
        )
        for entry in plan:
            entries.setdefault(entry.name, []).append(entry)
            if entry.action == "convert":
                allowed.setdefault(entry.name, set()).add(method)
    skipped = []
    for name, plans in entries.items():
        if name not in allowed:
            reasons = "; ".join(dict.fromkeys(p.reason for p in plans))
            skipped.append(LayerPlan(name, plans[0].type, "skip", reasons, plans[0].aliases, plans[0].order))
    first = {name: plans[0] for name, plans in entries.items() if name in allowed}
    return allowed, skipped, first


def _layer_shapes(model: nn.Module, example: Tensor | ModelCall, layers: dict[str, nn.Module]) -> dict[str, tuple]:
    """The input shape each layer sees on its first call in one forward pass of ``example``."""
    shapes: dict[str, tuple] = {}
    handles = []

    def hook(_module: nn.Module, args: tuple, name: str) -> None:
        shapes.setdefault(name, tuple(args[0].shape))

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name)))
        with evaluating(model):
            as_calls(example)[0].run(model, "example_input")
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _form(conv: _PlainConv, candidate: Candidate, name: str) -> nn.Module:
    """``conv`` in the form of ``candidate``, for timing: Ghost modules with random weights, structured layers
    projected; ``conv`` itself for the dense candidate."""
    if candidate.method == "dense":
        return conv
    if candidate.method == "ghost":
        return ghost_from_conv(conv, candidate.ratio, GHOST_DW_SIZE, "random", name=name)[0]
    return structured_from_dense(conv, StructureSpec(candidate.channels, candidate.kernel_size), name)[0]


def _runner(module: nn.Module, example: Tensor | ModelCall, runtime: str, device: torch.device) -> Callable[[], Any]:
    """A callable that runs ``module`` on ``example`` in ``runtime``: eager (call it in eval mode), or the session of
    its ONNX export (made in eval mode; ``module``'s own modes are kept)."""
    if runtime == "onnxruntime":
        with evaluating(module):
            return onnx_runner(module, _single_tensor("", example), device)
    return partial(as_calls(example)[0], module)


def _latencies(
    model: nn.Module,
    example: Tensor | ModelCall,
    layers: dict[str, _PlainConv],
    options: dict[str, list[Candidate]],
    runtime: str,
) -> tuple[float, dict[str, list[float]], Callable[[], Any]]:
    """The whole model's median latency on ``example`` and each candidate's on a random input of the layer's input
    shape (same device and dtype), timed against the layer's other candidates with :func:`time_interleaved`, in
    ``runtime`` (:data:`LATENCY_RUNTIMES`; ONNX Runtime runs each form's exported graph, checked against eager);
    and the runner of the whole model (for :func:`_measure_latency`). Layers of equal configuration and input shape
    share one measurement."""
    device = _device(example)
    shapes = _layer_shapes(model, example, layers)
    cache: dict[tuple, list[float]] = {}
    result: dict[str, list[float]] = {}
    generator = torch.Generator(device=device).manual_seed(0)
    for name, conv in layers.items():
        key = (repr(conv), conv.weight.dtype, shapes[name], tuple(c.label for c in options[name]))
        if key not in cache:
            x = torch.randn(shapes[name], generator=generator, device=device).to(conv.weight.dtype)
            forms = {candidate.label: _form(conv, candidate, name) for candidate in options[name]}
            with evaluating(conv):
                timed = time_interleaved({k: _runner(m, x, runtime, device) for k, m in forms.items()}, device=device)
            cache[key] = [timed[c.label].median_ms for c in options[name]]
        result[name] = cache[key]
    run = _runner(model, example, runtime, device)
    with evaluating(model):
        whole = time_interleaved({"model": run}, device=device)["model"].median_ms
    return whole, result, run


def _device(example: Tensor | ModelCall) -> torch.device:
    return next((t.device for t in as_calls(example)[0].tensors()), torch.device("cpu"))


def _measure_latency(
    model: nn.Module, example: Tensor | ModelCall, plan: BudgetPlan, runtime: str, dense: Callable[[], Any]
) -> float:
    """The planned model's latency as a whole: a copy of ``model`` with each planned layer in its chosen form, timed
    against the dense model (``dense``, its runner) interleaved, as a fraction of the dense time times
    ``plan.before["latency_ms"]`` (the units of the plan, free of drift between the two measurements)."""
    planned = copy_without_hooks(model).eval()
    for layer in plan.layers:
        if layer.choice.method != "dense":
            form = _form(planned.get_submodule(layer.name), layer.choice, layer.name)
            for name in (layer.name, *layer.aliases):
                planned.set_submodule(name, form)
    device = _device(example)
    run = _runner(planned, example, runtime, device)
    with evaluating(model):
        timed = time_interleaved({"model": dense, "planned": run}, device=device)
    return plan.before["latency_ms"] * timed["planned"].median_ms / timed["model"].median_ms


def _measure_fastest_when_unreachable(
    model: nn.Module, example: Tensor | ModelCall, plan: BudgetPlan, runtime: str, dense: Callable[[], Any]
) -> None:
    """When the layers' own times say the latency budget cannot be met, time the model with every planned layer at
    its fastest candidate as a whole before refusing; if it runs faster than they add up to (each layer timed alone
    carries its own call overhead), the difference leaves the latency outside them (in place), so the allocation
    may meet the budget, or the refusal names the measured value. A whole slower than its layers' sum changes
    nothing: that plan's layout changes between layers need not hold for other plans (BENCHMARKS.md table 6c).
    The choices are reset to dense afterwards (the allocation starts there)."""
    limit = _limits(plan)["latency_ms"]
    for layer in plan.layers:
        layer.chosen = min(range(len(layer.candidates)), key=lambda i: layer.candidates[i].cost("latency_ms"))
    predicted = plan.total("latency_ms")
    if predicted > limit:
        plan.fixed["latency_ms"] += min(0.0, _measure_latency(model, example, plan, runtime, dense) - predicted)
    for layer in plan.layers:
        layer.chosen = 0


def _meet_measured_latency(
    model: nn.Module,
    example: Tensor | ModelCall,
    plan: BudgetPlan,
    runtime: str,
    dense: Callable[[], Any],
    owner: str,
) -> None:
    """Time the planned model as a whole (per-layer latencies need not add up: layout changes between layers,
    fusions); while it is over the latency budget, add the gap to the latency outside the planned layers and
    allocate again, up to :data:`LATENCY_ROUNDS` measurements. In place: ``plan.measured_latency_ms`` is the last.
    The last plan stands; a warning names it when its measurement is still over the budget by more than
    :data:`TOLERANCE` of it (timings of a busy machine vary by several percent, and the gap between per-layer and
    whole-model time changes with the plan).

    Raises:
        ValueError: the re-allocation cannot meet the budget with the measured gap (the smallest reachable value).
    """
    limit = _limits(plan)["latency_ms"]
    for measurement in range(1, LATENCY_ROUNDS + 1):
        plan.measured_latency_ms = _measure_latency(model, example, plan, runtime, dense)
        if plan.measured_latency_ms <= limit or measurement == LATENCY_ROUNDS:
            break
        plan.fixed["latency_ms"] += plan.measured_latency_ms - plan.total("latency_ms")
        _allocate(plan, owner)
    if plan.measured_latency_ms > limit * (1 + TOLERANCE):
        warnings.warn(
            f"{owner}: latency_ms={plan.budgets['latency_ms']:g} was not met as measured: the planned model ran in "
            f"{plan.measured_latency_ms:.4g} ms as a whole ({plan.total('latency_ms'):.4g} ms predicted from its "
            f"layers) after {LATENCY_ROUNDS} measurements in {runtime}; the plan stands (its table shows both). "
            "Ask a smaller latency_ms for a margin, or time on an idle machine",
            stacklevel=3,
        )


def plan_budget(
    model: nn.Module,
    example_input: Tensor | ModelCall,
    *,
    macs: float | None = None,
    params: float | None = None,
    latency_ms: float | None = None,
    methods: Sequence[str] = METHODS,
    calibration: Tensor | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    channel_multiple: int = 1,
    latency_runtime: str = "pytorch",
) -> BudgetPlan:
    """Plan per-layer methods and hyper-parameters that meet every budget given with the least total sensitivity;
    the model is not changed (see :func:`compress_to_budget`, which plans and applies, for the arguments and the
    method).

    Raises:
        ValueError: naming the argument, its value and the valid range for any invalid argument; or, for a budget
            that cannot be met even with every planned layer at its cheapest candidate, the smallest reachable value;
            no layer to plan (every selected layer's reason listed).

    Example::

        >>> plan = plan_budget(model, torch.randn(1, 3, 32, 32), macs=0.5, calibration=images)
        >>> print(plan)
    """
    settings = _PlanSettings(
        methods, calibration, include, exclude, skip_first, skip_last, channel_multiple, latency_runtime
    )
    budgets = {"macs": macs, "params": params, "latency_ms": latency_ms}
    return _plan("plan_budget", model, example_input, budgets, settings)[0]


def check_budget_reachable(
    model: nn.Module,
    example_input: Tensor | ModelCall,
    *,
    macs: float | None = None,
    params: float | None = None,
    methods: Sequence[str] = METHODS,
    include: str | Sequence[str] | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    channel_multiple: int = 1,
) -> None:
    """Raise what :func:`plan_budget` would raise for these MACs/params budgets (an invalid argument, a budget no
    plan can meet, budgets that cannot be met together), from the costs alone: no calibration pass and no
    sensitivities, so it costs one counting pass of ``example_input``. The callbacks refuse an unreachable budget
    with it before their first stage. Messages name ``plan_budget``, as the plan's would. The model is not changed.

    Example::

        >>> check_budget_reachable(model, torch.randn(1, 3, 32, 32), macs=0.01)
        Traceback (most recent call last):
        ValueError: plan_budget: macs=0.01 cannot be met: the smallest reachable value is ...
    """
    settings = _PlanSettings(
        methods, include=include, skip_first=skip_first, skip_last=skip_last, channel_multiple=channel_multiple
    )
    _plan("plan_budget", model, example_input, {"macs": macs, "params": params, "latency_ms": None}, settings, False)


def _plan(
    owner: str,
    model: nn.Module,
    example_input: Tensor | ModelCall,
    budgets: dict[str, object],
    settings: _PlanSettings,
    score: bool = True,
) -> tuple[BudgetPlan, dict[str, Tensor]]:
    """The plan of :func:`plan_budget` and the first images of each Ghost-planned layer's input (for the fits of
    :func:`apply_budget_plan`). ``score=False`` skips the calibration pass: every candidate's sensitivity is 0, so
    the plan meets the budgets (or the same errors are raised) but its choices carry no information."""
    asked, methods = _check_arguments(owner, model, example_input, budgets, settings)
    before_counts = count_complexity(model, example_input=_first(example_input))  # per example: MACs scale with it
    allowed, skipped, entries = _selection(
        model, methods, settings.include, settings.exclude, settings.skip_first, settings.skip_last, example_input
    )
    rows = before_counts.by_name()
    layers: dict[str, _PlainConv] = {}
    for name in list(allowed):
        row = rows.get(name)
        reason = None
        if not isinstance(model.get_submodule(name), PLANNED_TYPES):
            reason = TRANSPOSED_REASON
        elif row is None or row.macs == 0:
            reason = "not called by example_input"
        if reason is not None:
            entry = entries[name]
            skipped.append(LayerPlan(name, entry.type, "skip", reason, entry.aliases, entry.order))
            del allowed[name]
            continue
        layers[name] = model.get_submodule(name)
    if not layers:
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in skipped) or "the model has no conv layers (Conv1d/2d/3d)"
        raise ValueError(
            f"{owner}: no layer can be planned (include={settings.include!r}, exclude={settings.exclude!r}, "
            f"methods={methods!r}): {reasons}"
        )
    specs = {
        n: _structured_specs(c, n, settings.channel_multiple) if "structured" in allowed[n] else []
        for n, c in layers.items()
    }
    ratios = {
        n: _ghost_ratios(c, settings.channel_multiple, "structured" in allowed[n]) if "ghost" in allowed[n] else []
        for n, c in layers.items()
    }
    scorer = _Sensitivities(specs, ratios)
    if score:
        handles = []
        try:
            for name, conv in layers.items():
                handles.append(conv.register_forward_hook(lambda m, a, o, name=name: scorer(m, a, o, name)))
            batch = example_input if settings.calibration is None else settings.calibration
            with evaluating(model):
                as_calls(batch)[0].run(model, "example_input" if settings.calibration is None else "calibration")
        finally:
            for handle in handles:
                handle.remove()
    else:
        scorer.zero(layers)

    options: dict[str, list[Candidate]] = {}
    for name, conv in layers.items():
        row = rows[name]
        positions = row.macs // _dense_per_position(conv)  # output positions x calls, per example
        candidates = [Candidate("dense", macs=row.macs, params=_own_params(conv))]
        for ratio in ratios[name]:
            per_position, ghost_params = _ghost_costs(conv, ratio)
            candidates.append(
                Candidate(
                    "ghost",
                    ratio=ratio,
                    macs=positions * per_position,
                    params=ghost_params,
                    sensitivity=scorer.ghost[name][ratio],
                )
            )
        for spec in specs[name]:
            per_position = conv.out_channels * spec.channels * math.prod(spec.kernel_size)
            candidates.append(
                Candidate(
                    "structured",
                    channels=spec.channels,
                    kernel_size=spec.kernel_size,
                    macs=positions * per_position,
                    params=per_position + (conv.out_channels if conv.bias is not None else 0),
                    sensitivity=scorer.structured[name][spec],
                )
            )
        options[name] = candidates

    before: dict[str, float] = {"macs": before_counts.macs, "params": before_counts.params}
    if "latency_ms" in asked:
        whole, times, dense_run = _latencies(model, example_input, layers, options, settings.latency_runtime)
        before["latency_ms"] = whole
        for name in layers:
            options[name] = [replace(c, latency_ms=t) for c, t in zip(options[name], times[name], strict=True)]
    planned = [
        LayerBudget(name, type(conv).__name__, tuple(options[name]), 0, entries[name].aliases)
        for name, conv in layers.items()
    ]
    fixed = {key: before[key] - sum(layer.candidates[0].cost(key) for layer in planned) for key in before}
    plan = BudgetPlan(planned, asked, before, fixed, skipped, settings.channel_multiple, settings.latency_runtime)
    if "latency_ms" in asked:
        _measure_fastest_when_unreachable(model, example_input, plan, settings.latency_runtime, dense_run)
    _allocate(plan, owner)
    if "latency_ms" in asked:
        _meet_measured_latency(model, example_input, plan, settings.latency_runtime, dense_run, owner)
    return plan, scorer.inputs


def _limits(plan: BudgetPlan) -> dict[str, float]:
    return {key: value * plan.before[key] if key != "latency_ms" else value for key, value in plan.budgets.items()}


_NAMES = {"macs": "MACs", "params": "parameters"}


def _describe(key: str, value: float, before: float) -> str:
    return f"{value:.4g} ms" if key == "latency_ms" else f"{value / before:.4f} of the original {_NAMES[key]}"


def _allocate(plan: BudgetPlan, owner: str) -> None:
    """Choose one candidate per layer (in place): the greedy descent until every budget is met, then the fill.

    Raises:
        ValueError: for a budget that cannot be met even with every layer at its cheapest candidate (naming the
            smallest reachable value), or budgets that cannot be met together.
    """
    limits = _limits(plan)
    for key, limit in limits.items():
        lowest = plan.fixed[key] + sum(min(c.cost(key) for c in layer.candidates) for layer in plan.layers)
        if lowest > limit:
            reachable = _describe(key, lowest, plan.before[key])
            floor = lowest if key == "latency_ms" else lowest / plan.before[key]
            multiple = (
                f" whose new channel counts are multiples of channel_multiple={plan.channel_multiple}"
                if plan.channel_multiple != 1
                else ""
            )
            why = (
                f"no planned layer has a candidate other than dense{multiple}"
                if all(len(layer.candidates) == 1 for layer in plan.layers)
                else f"every planned layer at its cheapest candidate{multiple}"
            )
            raise ValueError(
                f"{owner}: {key}={plan.budgets[key]:g} cannot be met: the smallest reachable value is {reachable} "
                f"({why}); valid range is {floor:.4g} <= {key}" + ("" if key == "latency_ms" else " <= 1")
            )
    totals = {key: plan.total(key) for key in limits}
    # Descent: the step with the least rise in sensitivity per unit of the excess it removes.
    while True:
        excess = {key: totals[key] - limits[key] for key in limits if totals[key] > limits[key]}
        if not excess:
            break
        best: tuple[float, int, int] | None = None
        for index, layer in enumerate(plan.layers):
            now = layer.choice
            for option, candidate in enumerate(layer.candidates):
                if option == layer.chosen:
                    continue
                gains = {key: now.cost(key) - candidate.cost(key) for key in limits}
                if any(totals[key] - gains[key] > limits[key] for key in limits if key not in excess):
                    continue  # would break a budget that is met
                progress = sum(max(-1.0, min(gains[key], excess[key]) / excess[key]) for key in excess)
                if progress <= 0:
                    continue
                score = (candidate.sensitivity - now.sensitivity) / progress
                if best is None or score < best[0]:
                    best = (score, index, option)
        if best is None:
            reached = "; ".join(f"{k} {_describe(k, totals[k], plan.before[k])}" for k in limits)
            raise ValueError(
                f"{owner}: the budgets {plan.budgets} cannot be met together (reached {reached}); each alone can: "
                "relax one of them"
            )
        _step(plan, totals, best[1], best[2])
    # Fill: take back the step that lowers the sensitivity most per unit of budget it uses, all budgets kept.
    while True:
        best = None
        for index, layer in enumerate(plan.layers):
            now = layer.choice
            for option, candidate in enumerate(layer.candidates):
                gain = now.sensitivity - candidate.sensitivity
                if option == layer.chosen or gain <= 0:
                    continue
                rises = {key: candidate.cost(key) - now.cost(key) for key in limits}
                if any(totals[key] + rises[key] > limits[key] for key in limits):
                    continue
                use = sum(max(0.0, rises[key]) / max(limits[key], 1e-30) for key in limits)
                score = gain / max(use, 1e-12)
                if best is None or score > best[0]:
                    best = (score, index, option)
        if best is None:
            break
        _step(plan, totals, best[1], best[2])


def _step(plan: BudgetPlan, totals: dict[str, float], index: int, option: int) -> None:
    layer = plan.layers[index]
    for key in totals:
        totals[key] += layer.candidates[option].cost(key) - layer.choice.cost(key)
    layer.chosen = option


def apply_budget_plan(
    model: nn.Module,
    plan: BudgetPlan,
    calibration: Tensor | None = None,
    inputs: dict[str, Tensor] | None = None,
    owner: str = "apply_budget_plan",
) -> BudgetResult:
    """Convert ``model`` as ``plan`` says, atomically: every new layer is built first (Ghost weights inherited,
    fitted on ``inputs[name]``, the layer's input, when given and in kernel space otherwise; structured layers
    projected), then swapped in, then the BatchNorm statistics re-estimated on ``calibration`` (a batch of model
    inputs) when given; on any error the model is left as it was.

    Raises:
        ValueError: naming the layer that cannot be converted (NaN/inf weights, say) or a ``calibration`` batch that
            does not run through the model; the model is then unchanged.

    Example::

        >>> plan = plan_budget(model, example, macs=0.5)
        >>> result = apply_budget_plan(model, plan)
    """
    check_instance("model", model, nn.Module, owner=owner)
    check_instance("plan", plan, BudgetPlan, owner=owner)
    inputs = inputs or {}
    chosen = {layer.name: layer.choice for layer in plan.layers}
    entries = [
        LayerPlan(layer.name, layer.type, "convert", layer.choice.label, layer.aliases)
        if layer.choice.method != "dense"
        else LayerPlan(layer.name, layer.type, "skip", "kept dense by the budget plan", layer.aliases)
        for layer in plan.layers
    ]

    def build(name: str, old: nn.Module) -> tuple[nn.Module, float | None, str]:
        choice = chosen[name]
        if choice.method == "ghost":
            new, error = ghost_from_conv(old, choice.ratio, GHOST_DW_SIZE, "inherit", inputs.get(name), name)
            return new, error, f"s={choice.ratio}, d={GHOST_DW_SIZE}, init=inherit"
        spec = StructureSpec(choice.channels, choice.kernel_size)
        new, error = structured_from_dense(old, spec, name)
        return new, error, f"c={spec.channels}, n={spec.kernel_size}"

    # Build every layer, then swap them in, then re-estimate the BatchNorm statistics; on any error the model is left
    # as it was (convert's shared conversion step).
    result = _convert(model, "budget", [*entries, *plan.skipped], build, calibration, owner, progress=False)
    return BudgetResult(**{f.name: getattr(result, f.name) for f in fields(ConversionResult)}, budget=plan)


def compress_to_budget(
    model: nn.Module,
    example_input: Tensor | ModelCall,
    *,
    macs: float | None = None,
    params: float | None = None,
    latency_ms: float | None = None,
    methods: Sequence[str] = METHODS,
    calibration: Tensor | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    channel_multiple: int = 1,
    latency_runtime: str = "pytorch",
) -> BudgetResult:
    """Convert each selected plain conv (``nn.Conv1d/2d/3d``) of ``model`` to the Ghost, structured or dense form that,
    all layers together, meets every budget given with the least total sensitivity; in place, atomically. Transposed
    convs are not planned: they stay as they are, listed in the plan's ``skipped`` with :data:`TRANSPOSED_REASON`.

    Budgets (at least one; all given are met): ``macs`` and ``params``, the fraction of the original model's MACs
    (over the forward pass of ``example_input``) and parameters to keep, in ``(0, 1]`` (0.5 = half); the plan lands
    in ``[fraction - 0.02, fraction]`` where the candidates allow, never above (with several budgets, the binding
    one lands in that band and the others below their limits). ``latency_ms``, the whole model's
    latency in ms on ``example_input`` (its device and batch): the dense model's median time, minus each planned
    layer's, plus its chosen candidate's (each timed alone on a random input of the layer's input shape, with
    :func:`~lightning_cheapconv.deploy.time_interleaved`), measured in ``latency_runtime``: ``"pytorch"`` (eager) or
    ``"onnxruntime"`` (every form and the whole model exported with ``torch.onnx.export(dynamo=True)`` and run in ONNX
    Runtime, as ``optimize_for_inference(runtime="onnxruntime")`` runs them; ``example_input`` must then be one
    tensor; needs the ``export`` extra; about a second per exported candidate form on a CPU). Per-layer times need
    not add up (layout changes between layers, fusions), so the planned model is then timed as a whole against the
    dense one (random weights in the chosen forms): while it is over the budget, the gap joins the latency outside
    the planned layers and the layers are allocated again, up to :data:`LATENCY_ROUNDS` measurements; a plan still
    over by more than :data:`TOLERANCE` of the budget stands with a warning. ``BudgetPlan.measured_latency_ms`` is
    the last measurement. A budget the layers' times call unreachable is refused only after the model with every
    planned layer at its fastest candidate was timed as a whole too (faster than its layers add up to, it lowers
    the smallest reachable value).

    Candidates per layer, selection (``include``/``exclude`` globs, ``skip_first``/``skip_last``, layers whose
    weights are used elsewhere) as :func:`~lightning_cheapconv.convert.select_layers` does it for each of
    ``methods`` (``"ghost"``, ``"structured"``); costs, sensitivities and the allocation: see the module docstring.
    ``channel_multiple`` (an int >= 1; 1 = the whole grid) keeps only candidates whose new channel counts are
    multiples of it: a structured layer's hidden channels ``c`` (``c = C`` always allowed) and a Ghost module's
    intrinsic maps. Runtimes with blocked layouts run other counts slowly: for ONNX Runtime on an x86 CPU use its
    NCHWc block, :data:`NCHWC_CHANNEL_MULTIPLE` (16) with AVX-512 or 8 with AVX2 (BENCHMARKS.md, table 3b).
    Sensitivities and Ghost weight inheritance use ``calibration`` (a batch of model inputs; ``example_input`` when
    ``None``) in one forward pass, on the first images of each layer's input that give
    :data:`SENSITIVITY_POSITIONS` output positions; with ``calibration`` the BatchNorm statistics are then
    re-estimated on it (:func:`~lightning_cheapconv.convert.recalibrate_batchnorm`). Converted layers are
    :class:`~lightning_cheapconv.nn.GhostConv2d` and :class:`~lightning_cheapconv.nn.StructuredConv2d` modules (their
    1-d and 3-d forms for ``nn.Conv1d``/``nn.Conv3d``)
    carrying their own hyper-parameters in their structure records, so
    :func:`~lightning_cheapconv.checkpoint.restructure` rebuilds the mixed model from its state dict.

    Atomic: every argument, the plan and every new layer are checked or built before anything changes; on any error
    the model is left exactly as it was.

    Raises:
        ValueError: naming the argument, its value and the valid range (``macs``/``params`` in ``(0, 1]``,
            ``latency_ms`` > 0, at least one budget, ``methods`` a non-empty sequence of ``"ghost"``/``"structured"``,
            ``channel_multiple`` an int >= 1, ``latency_runtime`` one of :data:`LATENCY_RUNTIMES` (and
            ``"onnxruntime"`` only with ``latency_ms`` and a one-tensor ``example_input``), bools as bools, glob
            patterns, a finite ``calibration`` batch that runs through the model); no layer to plan (each selected
            layer's reason listed: a transposed conv's is :data:`TRANSPOSED_REASON`); a budget that cannot be met
            even with every layer at its cheapest candidate, naming the smallest reachable value.
        ImportError: ``latency_runtime="onnxruntime"`` without onnx, onnxscript and onnxruntime installed.

    Example::

        >>> model = get_model("resnet20", 10)
        >>> result = compress_to_budget(model, torch.randn(1, 3, 32, 32), macs=0.5, calibration=images)
        >>> count_complexity(model, (1, 3, 32, 32)).macs <= 0.5 * 40_551_040   # half the original MACs
        True
        >>> print(result)                           # the per-layer plan as a table
    """
    owner = "compress_to_budget"
    settings = _PlanSettings(
        methods, calibration, include, exclude, skip_first, skip_last, channel_multiple, latency_runtime
    )
    budgets = {"macs": macs, "params": params, "latency_ms": latency_ms}
    plan, inputs = _plan(owner, model, example_input, budgets, settings)
    return apply_budget_plan(model, plan, calibration, inputs, owner)
