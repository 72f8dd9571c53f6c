"""What the network costs with any set of its target layers in cheap form, from one counted forward."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..calls import ModelCall
from ..checkpoint import dense_layer_for
from ..complexity import Complexity, LayerComplexity, count_complexity
from ..convert import DENSE_TYPES

__all__ = ["CompressionTracker", "Cost"]


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    adds: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs, self.adds + other.adds)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.params - other.params, self.macs - other.macs, self.adds - other.adds)


def _dense_twin(layer: nn.Module) -> nn.Module:
    """A meta-device plain layer: a copy of ``layer``, or the layer that a cheap module replaced (from its record)."""
    if isinstance(layer, DENSE_TYPES):
        return copy.deepcopy(layer).to("meta")
    return dense_layer_for(layer.structure_record())


def _cost(complexity: Complexity) -> Cost:
    return Cost(complexity.params, complexity.macs, complexity.adds)


def _calls_cost(layer: nn.Module, shapes: list[tuple[int, ...]]) -> Cost:
    """A layer's cost over every call it got (a shared conv, e.g. a detector head run on each pyramid level):
    its parameters once, its MACs and additions per call."""
    costs = [_cost(count_complexity(layer, input_shape=shape)) for shape in shapes]
    return Cost(costs[0].params, sum(c.macs for c in costs), sum(c.adds for c in costs))


class CompressionTracker:
    """Counts the model once, then answers "what would it cost with exactly these layers cheap?".

    At construction a meta-device (no memory) dense and cheap form of every target layer are kept: a
    layer still dense is copied and its cheap twin built by ``make_cheap``; a layer already cheap (a
    second fit) is copied, and its dense twin built from its configuration. :meth:`measure` counts
    the live model on one example input and records the input shape of every call of each target
    layer; both twins are then counted at those shapes (a layer called twice costs its MACs twice,
    its parameters once). Costs are per example input (batch 1: per image).
    """

    def __init__(self, model: nn.Module, targets: Iterable[str], make_cheap: Callable[[str, nn.Module], nn.Module]):
        self.dense: dict[str, nn.Module] = {}
        self.cheap: dict[str, nn.Module] = {}
        for name in targets:
            live = model.get_submodule(name)
            self.dense[name] = _dense_twin(live)
            if isinstance(live, DENSE_TYPES):
                with torch.device("meta"):
                    self.cheap[name] = make_cheap(name, self.dense[name])
            else:
                self.cheap[name] = copy.deepcopy(live).to("meta")
        self.base: Cost | None = None
        self.base_cheap: frozenset[str] = frozenset()
        self.layer_costs: dict[str, tuple[Cost, Cost]] = {}
        self.before: Complexity | None = None
        self.after: Complexity | None = None

    @property
    def measured(self) -> bool:
        return self.base is not None

    def measure(self, model: nn.Module, example_input: Tensor | ModelCall, cheap_now: Iterable[str]) -> None:
        """Count ``model`` (whose layers in ``cheap_now`` are in cheap form) on ``example_input``."""
        shapes: dict[str, list[tuple[int, ...]]] = {}
        handles = []
        for name in self.dense:

            def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
                shapes.setdefault(name, []).append(tuple(args[0].shape))

            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        try:
            complexity = count_complexity(model, example_input=example_input)
        finally:
            for handle in handles:
                handle.remove()
        self.base = _cost(complexity)
        self.base_cheap = frozenset(cheap_now)
        for name, seen in shapes.items():
            self.layer_costs[name] = (_calls_cost(self.dense[name], seen), _calls_cost(self.cheap[name], seen))

    def original_complexity(self, current: Complexity, cheap_now: Iterable[str]) -> Complexity:
        """``current`` (a count of the live model) with its cheap target layers put back in dense form."""
        cheap_now = set(cheap_now)
        rows = []
        for row in current.rows:
            if row.name in cheap_now and row.name in self.layer_costs:
                dense = self.layer_costs[row.name][0]
                row = LayerComplexity(
                    row.name, type(self.dense[row.name]).__name__, dense.params, dense.macs, dense.adds
                )
            rows.append(row)
        total = self.cost(())
        shift = total - self.cost(cheap_now)
        return Complexity(
            rows=rows,
            params=current.params + shift.params,
            macs=current.macs + shift.macs,
            adds=current.adds + shift.adds,
            input_shape=current.input_shape,
        )

    def cost(self, cheap: Iterable[str]) -> Cost:
        """Whole-model cost with exactly the target layers in ``cheap`` in cheap form."""
        if self.base is None:
            raise RuntimeError("CompressionTracker.measure() has not run yet")
        total = self.base
        cheap = set(cheap)
        for name, (dense, cheap_cost) in self.layer_costs.items():
            if name in cheap and name not in self.base_cheap:
                total = total - dense + cheap_cost
            elif name not in cheap and name in self.base_cheap:
                total = total - cheap_cost + dense
        return total

    def metrics(self, cheap: Iterable[str]) -> dict[str, float]:
        """``compression/*`` figures: counts with ``cheap`` layers cheap, and ratios original / compressed."""
        original, now = self.cost(()), self.cost(cheap)
        return {
            "compression/params": float(now.params),
            "compression/macs": float(now.macs),
            "compression/params_ratio": original.params / max(now.params, 1),
            "compression/macs_ratio": original.macs / max(now.macs, 1),
        }
