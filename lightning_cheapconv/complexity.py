"""Parameter and MAC counts per layer, for comparing a network before and after compression.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2): it sees convolutions
(grouped and depthwise included), matrix products and functional calls, whatever module makes
them. It does not count bias additions, BatchNorm, activations, pooling, element-wise adds or
the sum-pooling stage of structured layers; the latter is counted by the layers themselves
(``pooling_additions``) and reported in a separate ``adds`` column. Ratios are original /
compressed (2.0 = half).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.flop_counter import FlopCounterMode

from .calls import ModelCall
from .reuse import evaluating
from .validation import check_finite_number, check_instance, check_int, short_repr

__all__ = ["Complexity", "LayerComplexity", "compression_ratios", "count_complexity", "format_count"]

_SUFFIXES = ("", "K", "M", "G", "T", "P")


def format_count(n: float, digits: int = 3) -> str:
    """Format a count with a K/M/G/T suffix (powers of 1000) and ``digits`` significant digits.

    Example::

        >>> format_count(1234), format_count(11_689_512), format_count(1_814_073_344), format_count(512)
        ('1.23K', '11.7M', '1.81G', '512')

    Raises:
        ValueError: if ``n`` is not a real number or ``digits`` not an int >= 1 (``inf`` and ``nan`` are shown as such).
    """
    check_int("digits", digits, 1, owner="format_count")
    if isinstance(n, float) and not math.isfinite(n):
        return str(n)
    check_finite_number("n", n, owner="format_count")
    sign, value = ("-" if n < 0 else ""), abs(n)
    if value < 1000:
        return f"{sign}{int(value)}" if float(value).is_integer() else f"{sign}{value:.{digits}g}"
    exponent = min(int(math.log10(value) // 3), len(_SUFFIXES) - 1)
    scaled = value / 1000**exponent
    decimals = max(0, digits - 1 - int(math.floor(math.log10(scaled))))
    text = f"{scaled:.{decimals}f}"
    if float(text) >= 1000 and exponent < len(_SUFFIXES) - 1:  # 999.96K rounds to 1000K: write 1.00M
        exponent, scaled = exponent + 1, scaled / 1000
        text = f"{scaled:.{digits - 1}f}"
    return f"{sign}{text}{_SUFFIXES[exponent]}"


@dataclass(frozen=True)
class LayerComplexity:
    """Counts for one layer: its parameters, MACs and sum-pool additions over one forward pass.

    ``macs`` sums all calls of the layer (a module used twice counts twice); ``adds`` are the
    sum-pooling additions of structured layers, which FLOP counters do not see.

    Example::

        >>> row = count_complexity(nn.Sequential(nn.Conv2d(3, 8, 3)), (1, 3, 10, 10)).by_name()["0"]
        >>> row
        LayerComplexity(name='0', type='Conv2d', params=224, macs=13824, adds=0)
    """

    name: str
    type: str
    params: int
    macs: int
    adds: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The row as a dict of primitives."""
        return asdict(self)


@dataclass
class Complexity:
    """Counts for a whole model at one input shape, with a per-layer breakdown in ``rows``.

    ``params`` counts every unique parameter of the model (BatchNorm included); ``macs`` is the
    FLOP counter's total / 2 (bias and BatchNorm not included); ``adds`` totals the sum-pool
    additions of structured layers. Every parameter and MAC belongs to exactly one row, so the
    rows add up to the totals.

    Example::

        >>> c = count_complexity(torchvision.models.resnet18(), input_shape=(1, 3, 224, 224))
        >>> c.params, round(c.macs / 1e9, 3)
        (11689512, 1.814)
        >>> c.by_name()["layer1.0.conv1"].macs
        115605504
        >>> print(c)
        11.7M params, 1.81G MACs, 0 sum-pool adds at input 1x3x224x224
    """

    rows: list[LayerComplexity]
    params: int
    macs: int
    adds: int = 0
    input_shape: tuple[int, ...] | None = None

    @property
    def flops(self) -> int:
        """``2 · macs`` (the FLOP counter's own unit)."""
        return 2 * self.macs

    def by_name(self) -> dict[str, LayerComplexity]:
        """Rows by layer name (the module's qualified name; ``""`` is the model itself)."""
        return {row.name: row for row in self.rows}

    def __iter__(self) -> Iterator[LayerComplexity]:
        return iter(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """Totals and rows as primitives (for loggers and JSON)."""
        return {
            "params": self.params,
            "macs": self.macs,
            "adds": self.adds,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "rows": [row.to_dict() for row in self.rows],
        }

    def __str__(self) -> str:
        shape = "?" if self.input_shape is None else "x".join(str(d) for d in self.input_shape)
        return (
            f"{format_count(self.params)} params, {format_count(self.macs)} MACs, "
            f"{format_count(self.adds)} sum-pool adds at input {shape}"
        )


def compression_ratios(before: Complexity, after: Complexity) -> dict[str, float]:
    """Original / compressed ratios (2.0 = half) and the raw counts.

    Keys: ``params_ratio``, ``macs_ratio``, ``ops_ratio`` ((MACs + sum-pool adds) before / after,
    an add counted like a MAC, so conservative for structured layers), and ``params_before``,
    ``params_after``, ``macs_before``, ``macs_after``, ``adds_before``, ``adds_after``. A ratio
    over a zero count is ``inf`` (``nan`` when both are zero).

    Example::

        >>> r = compression_ratios(dense, ghost)   # CIFAR ResNet-56 -> Ghost, s=2 (REFERENCES.md)
        >>> round(r["params_ratio"], 2), round(r["macs_ratio"], 2)
        (1.95, 1.92)
    """
    check_instance("before", before, Complexity, owner="compression_ratios")
    check_instance("after", after, Complexity, owner="compression_ratios")
    return {
        "params_ratio": _ratio(before.params, after.params),
        "macs_ratio": _ratio(before.macs, after.macs),
        "ops_ratio": _ratio(before.macs + before.adds, after.macs + after.adds),
        "params_before": before.params,
        "params_after": after.params,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "adds_before": before.adds,
        "adds_after": after.adds,
    }


def _ratio(original: float, compressed: float) -> float:
    if compressed == 0:
        return math.nan if original == 0 else math.inf
    return original / compressed


def _is_folded(module: nn.Module, leaf_types: tuple[type, ...]) -> bool:
    return callable(getattr(type(module), "structure_record", None)) or isinstance(module, leaf_types)


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


@dataclass
class _Frame:
    module: nn.Module
    key: nn.Module | None  # the row this call's MACs go to; None inside a folded module
    start: int
    folding: bool = False
    children: int = 0


class _Attribution:
    """Forward hooks that split the counter's running total among rows by call nesting.

    A call's MACs are the counter's total after minus before; a row gets the MACs of its module's
    calls minus those of the hooked modules they call ("self" MACs), or everything inside for a
    folded module. Attribution is by module identity, so shared modules and unknown names are safe.
    """

    def __init__(self, counter: FlopCounterMode, row_of: dict[nn.Module, nn.Module], folded: set[nn.Module]):
        self.counter, self.row_of, self.folded = counter, row_of, folded
        self.stack: list[_Frame] = []
        self.fold: nn.Module | None = None
        self.flops: dict[nn.Module, int] = {}
        self.adds: dict[nn.Module, int] = {}

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.fold is not None:
            key, frame = self.fold, _Frame(module, None, 0)
        else:
            key = self.row_of[module]
            frame = _Frame(module, key, self.counter.get_total_flops(), folding=key in self.folded)
            if frame.folding:
                self.fold = key
        self.stack.append(frame)
        pooling_additions: Callable[[Sequence[int]], int] | None = getattr(module, "pooling_additions", None)
        if callable(pooling_additions):
            x = _first_tensor(args, kwargs)
            if x is not None:
                self.adds[key] = self.adds.get(key, 0) + int(pooling_additions(tuple(x.shape)))

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.stack or self.stack[-1].module is not module:
            return  # only when a forward raised before our pre-hook ran: the error propagates anyway
        frame = self.stack.pop()
        if frame.key is None:
            return
        inclusive = self.counter.get_total_flops() - frame.start
        if frame.folding:
            self.fold = None
        own = inclusive if frame.folding else inclusive - frame.children
        self.flops[frame.key] = self.flops.get(frame.key, 0) + own
        if self.stack:
            self.stack[-1].children += inclusive


def _walk(
    model: nn.Module, leaf_types: tuple[type, ...]
) -> tuple[list[tuple[str, nn.Module]], dict[nn.Module, nn.Module], set[nn.Module]]:
    """Row candidates in definition order (first name of shared modules), the row each module's MACs
    go to, and the folded modules."""
    candidates: list[tuple[str, nn.Module]] = []
    row_of: dict[nn.Module, nn.Module] = {}
    folded: set[nn.Module] = set()

    def visit(module: nn.Module, name: str) -> None:
        if module in row_of:
            return
        row_of[module] = module
        candidates.append((name, module))
        if _is_folded(module, leaf_types):
            folded.add(module)
            for inner in module.modules():
                row_of.setdefault(inner, module)
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return candidates, row_of, folded


def _example_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if not is_lazy(tensor) and tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in model.parameters():
        return tensor.device, torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


def _make_input(
    model: nn.Module, input_shape: Sequence[int] | None, example_input: Tensor | Sequence[Tensor] | ModelCall | None
) -> tuple[ModelCall, tuple[int, ...] | None]:
    if (input_shape is None) == (example_input is None):
        raise ValueError("count_complexity: pass exactly one of input_shape and example_input")
    device, dtype = _example_device_dtype(model)
    if example_input is not None:
        if not isinstance(example_input, (Tensor, Sequence, ModelCall)) or isinstance(example_input, str):
            raise ValueError(
                f"count_complexity: example_input must be a tensor, a sequence of positional inputs or a ModelCall, "
                f"got {type(example_input).__name__}"
            )
        if isinstance(example_input, ModelCall):
            call = example_input
        else:
            call = ModelCall((example_input,) if isinstance(example_input, Tensor) else tuple(example_input))
        moved = call.to(device, floating_dtype=dtype)
        first = next(moved.tensors(), None)
        return moved, None if first is None else tuple(first.shape)
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str) or not input_shape:
        raise ValueError(
            f"count_complexity: input_shape={short_repr(input_shape)} is not valid; valid values are non-empty "
            "sequences of ints >= 1, such as (1, 3, 224, 224)"
        )
    shape = tuple(check_int(f"input_shape[{i}]", d, 1, owner="count_complexity") for i, d in enumerate(input_shape))
    if device.type == "meta":
        return ModelCall((torch.empty(shape, device=device, dtype=dtype),)), shape
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    return ModelCall((torch.randn(shape, generator=generator, device=device, dtype=dtype),)), shape


def count_complexity(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    example_input: Tensor | Sequence[Tensor] | ModelCall | None = None,
    leaf_types: tuple[type, ...] | None = None,
) -> Complexity:
    """Count parameters, MACs and sum-pool additions of ``model``, per layer, over one forward pass.

    Runs one forward pass in eval mode under :func:`torch.no_grad` inside
    :class:`~torch.utils.flop_counter.FlopCounterMode` (so weights and BatchNorm running statistics
    are untouched), then restores every module's training flag. Pass ``input_shape`` (a random
    input is made on the device and dtype of the model's first parameter, without touching the
    global RNG) or ``example_input`` (a tensor, a sequence of positional inputs, or a recorded call
    :class:`~lightning_cheapconv.calls.ModelCall` with keyword arguments too; moved to the model's device,
    floating tensors cast to its dtype).

    MACs are FLOPs / 2 as the counter reports them: convolutions (grouped, depthwise, strided,
    dilated) and matrix products, functional calls included. **Bias additions and BatchNorm are
    not counted**, nor activations, pooling or element-wise ops. The sum-pooling of
    :class:`~lightning_cheapconv.nn.StructuredConv2d`/``StructuredLinear`` is counted from their
    ``pooling_additions(input_shape)`` into ``adds``.

    Rows: one per module that owns parameters or does MACs in its own ``forward`` (for plain
    networks: the leaf conv/linear/BN layers), except that cheap modules (classes with a
    ``structure_record`` method, e.g. ``GhostConv2d``, ``StructuredConv2d``) and instances of
    ``leaf_types`` are one row each with their children folded in. Each parameter and each MAC is
    counted in exactly one row (a shared module is one row, under its first name, with the MACs
    of all its calls), so rows sum to the totals.

    Example::

        >>> c = count_complexity(torchvision.models.resnet18(), input_shape=(1, 3, 224, 224))
        >>> c.params, c.macs
        (11689512, 1814073344)

    Raises:
        ValueError: for a ``model`` that is no ``nn.Module``, not exactly one of ``input_shape`` (a sequence of
            ints >= 1) and ``example_input``, or ``leaf_types`` that are not classes. Errors of the forward pass
            itself propagate unchanged, with every hook removed and every mode restored.
    """
    check_instance("model", model, nn.Module, owner="count_complexity")
    leaf_types = (leaf_types,) if isinstance(leaf_types, type) else tuple(leaf_types or ())
    if not all(isinstance(t, type) for t in leaf_types):
        raise ValueError(
            f"count_complexity: leaf_types={short_repr(leaf_types)} must be module classes (a tuple of types)"
        )
    inputs, shape = _make_input(model, input_shape, example_input)
    candidates, row_of, folded = _walk(model, leaf_types)

    counter = FlopCounterMode(display=False)
    attribution = _Attribution(counter, row_of, folded)
    handles = []
    try:
        for module in row_of:
            handles.append(module.register_forward_pre_hook(attribution.pre, with_kwargs=True))
            handles.append(module.register_forward_hook(attribution.post, with_kwargs=True, always_call=True))
        with evaluating(model), counter:
            inputs(model)
    finally:
        for handle in handles:
            handle.remove()

    seen: set[int] = set()
    rows = []
    for name, module in candidates:
        params = 0
        for p in module.parameters(recurse=module in folded):
            if id(p) not in seen:
                seen.add(id(p))
                params += 0 if is_lazy(p) else p.numel()
        macs, adds = attribution.flops.get(module, 0) // 2, attribution.adds.get(module, 0)
        if params or macs or adds:
            rows.append(LayerComplexity(name, type(module).__name__, params, macs, adds))
    total_params = sum(0 if is_lazy(p) else p.numel() for p in model.parameters())
    return Complexity(rows, total_params, counter.get_total_flops() // 2, sum(attribution.adds.values()), shape)
