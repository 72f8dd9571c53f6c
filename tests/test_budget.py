"""Compression to a budget (lightning_cheapconv/budget.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from lightning_cheapconv import budget as budget_module
from lightning_cheapconv import convert as convert_module
from lightning_cheapconv import get_model
from lightning_cheapconv.budget import (
    TOLERANCE,
    BudgetPlan,
    BudgetResult,
    Candidate,
    LayerBudget,
    _allocate,
    check_budget_reachable,
    compress_to_budget,
    plan_budget,
)
from lightning_cheapconv.calls import ModelCall
from lightning_cheapconv.checkpoint import restructure
from lightning_cheapconv.complexity import count_complexity
from lightning_cheapconv.deploy import Latency
from lightning_cheapconv.nn import GhostConv2d, StructuredConv2d
from lightning_cheapconv.structure import StructureSpec, project

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _snapshot(model: nn.Module) -> tuple[dict, list]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(name, type(m), m.training) for name, m in model.named_modules()]


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict, list]) -> None:
    state, modules = snapshot
    assert [(name, type(m), m.training) for name, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return get_model("resnet20", 10).eval()


@pytest.mark.parametrize(
    ("builder", "size", "key", "fraction"),
    [
        (lambda: get_model("resnet20", 10), 32, "macs", 0.5),
        (lambda: get_model("resnet20", 10), 32, "params", 0.4),
        (lambda: get_model("resnet56", 10), 32, "macs", 0.35),
        (lambda: get_model("resnet56", 10), 32, "params", 0.5),
        (lambda: torchvision.models.resnet18(), 64, "macs", 0.5),
        (lambda: torchvision.models.resnet18(), 64, "params", 0.6),
    ],
    ids=["resnet20-macs", "resnet20-params", "resnet56-macs", "resnet56-params", "resnet18-macs", "resnet18-params"],
)
def test_budget_met_when_counted_independently(builder, size: int, key: str, fraction: float) -> None:
    torch.manual_seed(0)
    model = builder().eval()
    example = _images(1, size)
    before = count_complexity(model, example_input=example)
    result = compress_to_budget(model, example, calibration=_images(4, size, seed=1), **{key: fraction})
    after = count_complexity(model, example_input=example)
    reached = getattr(after, key) / getattr(before, key)
    assert fraction - TOLERANCE <= reached <= fraction
    assert reached == pytest.approx(result.budget.fraction(key), abs=1e-12)  # the plan's counts are count_complexity's
    assert isinstance(result, BudgetResult) and result.converted
    assert result.params_after == after.params


def test_plan_is_deterministic_and_leaves_the_model_alone(resnet20: nn.Module) -> None:
    snapshot = _snapshot(resnet20)
    example, calibration = _images(1, 32), _images(4, 32, seed=1)
    first = plan_budget(resnet20, example, macs=0.5, calibration=calibration)
    second = plan_budget(copy.deepcopy(resnet20), example, macs=0.5, calibration=calibration)
    assert first.choices() == second.choices()
    assert [c.sensitivity for layer in first.layers for c in layer.candidates] == [
        c.sensitivity for layer in second.layers for c in layer.candidates
    ]
    _assert_unchanged(resnet20, snapshot)


def _structured_layer1(seed: int = 0) -> nn.Module:
    """ResNet-20 whose layer1 kernels are already structured (c = C, n = 2): free to decompose there."""
    torch.manual_seed(seed)
    model = get_model("resnet20", 10).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("layer1.") and isinstance(module, nn.Conv2d):
                module.weight.copy_(project(module.weight, StructureSpec(module.in_channels, (2, 2))))
    return model


def test_mixed_plan_restructures_into_a_fresh_model() -> None:
    model = _structured_layer1()
    example, calibration = _images(1, 32), _images(4, 32, seed=1)
    result = compress_to_budget(model, example, macs=0.5, calibration=calibration)
    kinds = {type(m) for m in model.modules()}
    assert GhostConv2d in kinds and StructuredConv2d in kinds and nn.Conv2d in kinds
    assert all(
        result.budget.choices()[f"layer1.{b}.conv{c}"].startswith("structured") for b in range(3) for c in (1, 2)
    )
    assert "Budget plan" in str(result) and "total macs" in str(result)
    assert "(1 not planned: conv1)" in " ".join(str(result).split())  # the stem (skip_first), named

    fresh = get_model("resnet20", 10).eval()
    rebuilt = restructure(fresh, model.state_dict())
    assert len(rebuilt) == len(result.changes)
    fresh.load_state_dict(model.state_dict())
    x = _images(2, 32, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_infeasible_budget_is_refused_with_the_model_unchanged(resnet20: nn.Module) -> None:
    model = copy.deepcopy(resnet20)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"macs=0\.05 cannot be met: the smallest reachable value is 0\.\d+"):
        compress_to_budget(model, _images(1, 32), macs=0.05, calibration=_images(2, 32))
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    "budgets",
    [{"macs": 0.05}, {"params": 0.01}, {"macs": 0.6}, {"macs": 0.3, "params": 0.9}],
    ids=["macs-unreachable", "params-unreachable", "macs-reachable", "both"],
)
def test_check_budget_reachable_agrees_with_plan_budget_without_scoring(
    resnet20: nn.Module, budgets: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = _images(1, 32)
    try:
        plan_budget(resnet20, example, **budgets)
        refusal = None
    except ValueError as err:
        refusal = str(err)
    model = copy.deepcopy(resnet20)
    snapshot = _snapshot(model)

    def scored(*args: object) -> None:
        raise AssertionError("a sensitivity was computed")

    monkeypatch.setattr(budget_module._Sensitivities, "__call__", scored)
    if refusal is None:
        check_budget_reachable(model, example, **budgets)
    else:
        with pytest.raises(ValueError, match="cannot be met") as raised:
            check_budget_reachable(model, example, **budgets)
        assert str(raised.value) == refusal
    _assert_unchanged(model, snapshot)


def test_failure_while_converting_leaves_the_model_unchanged(resnet20: nn.Module, monkeypatch) -> None:
    model = copy.deepcopy(resnet20)
    snapshot = _snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("recalibration failed")

    monkeypatch.setattr(convert_module, "_recalibrate", broken)  # the shared conversion step's re-estimation
    with pytest.raises(RuntimeError, match="recalibration failed"):
        compress_to_budget(model, _images(1, 32), macs=0.5, calibration=_images(2, 32))
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"macs": 0}, r"macs=0 is out of range; valid range is \(0, 1\]"),
        ({"macs": 1.5}, r"macs=1\.5 is out of range; valid range is \(0, 1\]"),
        ({"params": "half"}, r"params='half' is not a number"),
        ({"latency_ms": -1.0}, r"latency_ms=-1\.0 is out of range; valid range is > 0"),
        ({}, r"no budget given; pass at least one of macs"),
        ({"macs": 0.5, "methods": ()}, r"methods=\(\) is not valid"),
        ({"macs": 0.5, "methods": ("ghost", "pruning")}, r"methods=\('ghost', 'pruning'\) is not valid"),
        ({"macs": 0.5, "skip_first": "yes"}, r"skip_first='yes' is not a bool"),
        ({"macs": 0.5, "include": ""}, r"include='' is not valid"),
        ({"macs": 0.5, "calibration": torch.full((2, 3, 32, 32), float("nan"))}, r"calibration .* non-finite"),
        (
            {"macs": 0.5, "calibration": torch.randn(2, 5, 32, 32)},
            r"calibration with input shapes \[\(2, 5, 32, 32\)\]",
        ),
        ({"macs": 0.5, "include": "nothing.*"}, r"no layer can be planned"),
        ({"macs": 0.5, "channel_multiple": 0}, r"channel_multiple=0 is out of range; valid range is >= 1"),
        ({"macs": 0.5, "channel_multiple": 8.0}, r"channel_multiple=8\.0 is not an int"),
        ({"macs": 0.5, "channel_multiple": True}, r"channel_multiple=True is not an int"),
        (
            {"latency_ms": 5.0, "latency_runtime": "tensorrt"},
            r"latency_runtime='tensorrt' is not valid; valid values are 'pytorch' and 'onnxruntime'",
        ),
        ({"macs": 0.5, "latency_runtime": "onnxruntime"}, r"latency_runtime='onnxruntime' is where latency_ms is "),
    ],
)
def test_bad_arguments_raise_before_anything_changes(resnet20: nn.Module, kwargs: dict, match: str) -> None:
    model = copy.deepcopy(resnet20)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        compress_to_budget(model, _images(1, 32), **kwargs)
    _assert_unchanged(model, snapshot)


class _Narrow(nn.Module):
    """A stem, a 16 -> 16 and a 16 -> 48 3x3 conv, a classifier: the grid of each planned conv is known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.narrow = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.wide = nn.Conv2d(16, 48, 3, padding=1, bias=False)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.wide(self.narrow(self.stem(x)).relu()).relu().mean((2, 3)))


def _structured_labels(channels: list[int]) -> list[str]:
    """The grid's structured labels of a 3x3 conv with 16 input channels, in plan order: per c, n = 2 then 3 (not the
    full (16, 3))."""
    return [f"structured c={c} n={n}x{n}" for c in channels for n in (2, 3) if (c, n) != (16, 3)]


@pytest.mark.parametrize(
    ("multiple", "ghost_narrow", "ghost_wide", "hidden"),
    [
        # Ghost s in {2, 3, 4} keeps ceil(C_out / s) intrinsic maps: 16 -> 8, 6, 4; 48 -> 24, 16, 12. Structured c in
        # 16 * {1, 3/4, 1/2, 3/8, 1/4} = 16, 12, 8, 6, 4 (both layers have 16 input channels; c = C always allowed).
        (1, [2, 3, 4], [2, 3, 4], [16, 12, 8, 6, 4]),
        (4, [2, 4], [2, 3, 4], [16, 12, 8, 4]),
        (8, [2], [2, 3], [16, 8]),
        (16, [], [3], [16]),
    ],
)
def test_channel_multiple_keeps_the_candidates_whose_new_channel_counts_are_its_multiples(
    multiple: int, ghost_narrow: list[int], ghost_wide: list[int], hidden: list[int]
) -> None:
    """Ghost-only plans try every ratio; where a layer may also be structured, Ghost s = 2 only
    (MIXED_GHOST_RATIOS)."""
    torch.manual_seed(0)
    model = _Narrow()
    plan = plan_budget(model, _images(1, 8), macs=0.9, channel_multiple=multiple, calibration=_images(4, 8))
    candidates = {layer.name: [c.label for c in layer.candidates] for layer in plan.layers}
    assert candidates == {
        "narrow": ["dense", *(f"ghost s={s}" for s in ghost_narrow if s == 2), *_structured_labels(hidden)],
        "wide": ["dense", *(f"ghost s={s}" for s in ghost_wide if s == 2), *_structured_labels(hidden)],
    }
    ghost_only = plan_budget(
        model, _images(1, 8), macs=0.9, methods="ghost", channel_multiple=multiple, calibration=_images(4, 8)
    )
    assert {layer.name: [c.label for c in layer.candidates] for layer in ghost_only.layers} == {
        name: ["dense", *(f"ghost s={s}" for s in ratios)]
        for name, ratios in (("narrow", ghost_narrow), ("wide", ghost_wide))
    }
    assert plan.channel_multiple == multiple
    assert ("multiples of 16 (channel_multiple)" in " ".join(str(plan).split())) == (multiple == 16)  # caption wraps


def test_channel_multiple_raises_the_smallest_reachable_budget_and_says_why() -> None:
    torch.manual_seed(0)
    model = _Narrow()
    snapshot = _snapshot(model)
    # With channel_multiple=16: narrow (16 -> 16) at its cheapest is c=16 n=2x2, 16*16*4 MACs per position; wide
    # (16 -> 48) too, 48*16*4 (Ghost s=2's 24 intrinsic maps are not a multiple of 16; s=3 is not tried where the
    # layer may be structured); the stem (3 -> 16, 3*16*9) is not planned. 8x8 positions each, and the classifier's
    # 48*10.
    dense = 64 * (3 * 16 * 9 + 16 * 16 * 9 + 16 * 48 * 9) + 480
    cheapest = 64 * (3 * 16 * 9 + 16 * 16 * 4 + 48 * 16 * 4) + 480
    with pytest.raises(ValueError) as raised:
        compress_to_budget(model, _images(1, 8), macs=0.3, channel_multiple=16)
    assert f"the smallest reachable value is {cheapest / dense:.4f} of the original MACs" in str(raised.value)
    assert "whose new channel counts are multiples of channel_multiple=16" in str(raised.value)
    assert "every planned layer at its cheapest candidate" in str(raised.value)
    _assert_unchanged(model, snapshot)
    # Ghost only with 64: neither layer keeps a Ghost ratio (16 / s and 48 / s are never multiples of 64).
    with pytest.raises(ValueError) as raised:
        compress_to_budget(model, _images(1, 8), macs=0.3, methods="ghost", channel_multiple=64)
    assert (
        "the smallest reachable value is 1.0000 of the original MACs (no planned layer has a candidate other "
        "than dense whose new channel counts are multiples of channel_multiple=64)" in str(raised.value)
    )
    _assert_unchanged(model, snapshot)
    compress_to_budget(model, _images(1, 8), macs=0.3, channel_multiple=1, calibration=_images(4, 8))  # reachable


def test_bad_example_input_is_named(resnet20: nn.Module) -> None:
    with pytest.raises(ValueError, match="example_input must be a torch.Tensor batch of model inputs or a ModelCall"):
        compress_to_budget(resnet20, [1, 2, 3], macs=0.5)


def test_latency_budget_with_a_stubbed_timer(resnet20: nn.Module, monkeypatch) -> None:
    """Dense layers take 1 ms, Ghost 1/s ms, structured 0.8 ms, the whole model 20 ms: 18 planned layers leave 2 ms
    outside them; a 12 ms budget needs 8 ms saved."""
    calls: list[list[str]] = []

    def fake_timer(candidates, *args, **kwargs):
        calls.append(list(candidates))
        times = {}
        for label in candidates:
            if label == "model":
                times[label] = 20.0
            elif label.startswith("ghost"):
                times[label] = 1.0 / int(label.removeprefix("ghost s="))
            else:
                times[label] = 1.0 if label == "dense" else 0.8
        return {label: Latency((ms,)) for label, ms in times.items()}

    monkeypatch.setattr(budget_module, "time_interleaved", fake_timer)
    monkeypatch.setattr(budget_module, "_measure_latency", _layers_add_up)
    model = copy.deepcopy(resnet20)
    plan = plan_budget(model, _images(1, 32), latency_ms=12.0, calibration=_images(2, 32), methods="ghost")
    assert plan.before["latency_ms"] == 20.0 and plan.fixed["latency_ms"] == pytest.approx(2.0)
    assert 12.0 - 0.5 <= plan.total("latency_ms") <= 12.0  # granularity: the cheapest step saves 0.2 ms
    assert ["model"] in calls and all("dense" in labels for labels in calls if labels != ["model"])
    # Layers of equal configuration and input shape share one measurement.
    assert len(calls) < 1 + len(plan.layers)
    chosen = [layer.choice for layer in plan.layers]
    assert all(c.latency_ms is not None for c in chosen) and any(c.method != "dense" for c in chosen)

    both = plan_budget(model, _images(1, 32), latency_ms=12.0, macs=0.45, calibration=_images(2, 32), methods="ghost")
    assert both.total("latency_ms") <= 12.0 and both.fraction("macs") <= 0.45


def test_onnxruntime_latency_times_every_form_and_the_whole_model_there(monkeypatch) -> None:
    """With latency_runtime="onnxruntime" each candidate form of each distinct layer and the whole model are run
    through onnx_runner (stubbed: it records what it exports) and those runners are what is timed."""
    exported: list[tuple[str, tuple[int, ...]]] = []

    def fake_runner(module: nn.Module, x: torch.Tensor, device: object) -> object:
        exported.append((type(module).__name__, tuple(x.shape)))
        return lambda: ("ort", type(module).__name__)

    timed: list[set] = []

    def fake_timer(candidates, *args, **kwargs):
        timed.append({fn()[1] for fn in candidates.values()})  # every timed callable is an ONNX Runtime runner
        return {label: Latency((1.0 if label in ("dense", "model") else 0.5,)) for label in candidates}

    monkeypatch.setattr(budget_module, "onnx_runner", fake_runner)
    monkeypatch.setattr(budget_module, "time_interleaved", fake_timer)
    torch.manual_seed(0)
    model = _Narrow().train()
    snapshot = _snapshot(model)
    plan = plan_budget(
        model, _images(2, 8), latency_ms=2.5, latency_runtime="onnxruntime", methods="ghost", calibration=_images(2, 8)
    )
    # narrow: dense + Ghost s=2, 3, 4; wide: the same; then the whole model on the 2-image example, and the planned
    # copy of it (measured against it once: the stub's times add up).
    per_layer = ["Conv2d", "GhostConv2d", "GhostConv2d", "GhostConv2d"]
    assert exported == [*((n, (2, 16, 8, 8)) for n in per_layer * 2), *[("_Narrow", (2, 3, 8, 8))] * 2]
    assert timed == [{"Conv2d", "GhostConv2d"}] * 2 + [{"_Narrow"}] * 2
    assert plan.latency_runtime == "onnxruntime" and plan.total("latency_ms") <= 2.5
    assert "latency ms, ONNX Runtime" in str(plan)
    _assert_unchanged(model, snapshot)  # weights and every module's training flag


def test_onnxruntime_latency_plan_end_to_end() -> None:
    """The real exports and sessions: a plan whose latencies come from ONNX Runtime, the model untouched."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _Narrow().train()
    snapshot = _snapshot(model)
    plan = plan_budget(
        model,
        _images(2, 8),
        latency_ms=1e3,
        latency_runtime="onnxruntime",
        methods="ghost",
        include="wide",
        calibration=_images(2, 8),
    )
    assert [len(layer.candidates) for layer in plan.layers] == [4]
    assert all(c.latency_ms is not None and c.latency_ms > 0 for c in plan.layers[0].candidates)
    assert plan.before["latency_ms"] > 0 and plan.measured_latency_ms is not None  # the planned model, as a whole
    _assert_unchanged(model, snapshot)
    call = ModelCall((_images(2, 8), _images(2, 8)))
    with pytest.raises(ValueError, match="latency_runtime='onnxruntime' exports the whole model on its example input"):
        plan_budget(model, call, latency_ms=1.0, latency_runtime="onnxruntime")


def _layers_add_up(model: nn.Module, example: object, plan: BudgetPlan, runtime: str, dense: object) -> float:
    """A whole-model measurement that equals the plan's prediction (stands in for ``budget._measure_latency``)."""
    return plan.total("latency_ms")


def _stub_layer_ms(candidates, *args, **kwargs):
    """Dense layers 1 ms, Ghost 1/s ms, structured 0.8 ms, the whole dense model 20 ms."""
    ms = {"model": 20.0, "dense": 1.0}
    return {
        k: Latency((ms.get(k, 1.0 / int(k.removeprefix("ghost s=")) if k.startswith("ghost") else 0.8),))
        for k in candidates
    }


def _stub_latencies(monkeypatch: pytest.MonkeyPatch, whole_ms: Callable[[float], float]) -> list[float]:
    """Layers timed by :func:`_stub_layer_ms`; the planned model as a whole by ``whole_ms(the chosen layers' stub
    times summed)`` (stands in for ``budget._measure_latency``). Returns the whole-model measurements, in order."""
    seen: list[float] = []

    def whole(model, example, plan, runtime, dense):
        seen.append(whole_ms(sum(layer.choice.latency_ms for layer in plan.layers)))
        return seen[-1]

    monkeypatch.setattr(budget_module, "time_interleaved", _stub_layer_ms)
    monkeypatch.setattr(budget_module, "_measure_latency", whole)
    return seen


@pytest.mark.parametrize(
    ("measured", "rounds", "refused"),
    [
        (lambda layers: layers + 2.0 + 3.0, 2, None),  # 3 ms more than the layers add up to: allocated again
        (lambda layers: layers + 2.0, 1, None),  # they add up: measured once
        (lambda layers: 13.0, 4, "was not met as measured"),  # 13 ms whatever is planned
    ],
    ids=["constant-gap", "additive", "never-met"],
)
def test_latency_plan_measured_as_a_whole_and_allocated_again_while_over(
    resnet20: nn.Module, monkeypatch, measured, rounds: int, refused: str | None
) -> None:
    """The planned model's whole latency (stubbed: a function of the chosen layers' stub times, 2 ms outside them)
    decides: while over the 12 ms budget the gap joins the fixed part and the layers are allocated again, up to
    LATENCY_ROUNDS measurements; over by more than TOLERANCE after them, the last plan stands with a warning."""
    seen = _stub_latencies(monkeypatch, measured)
    model = copy.deepcopy(resnet20)
    snapshot = _snapshot(model)
    if refused is not None:
        with pytest.warns(UserWarning, match=rf"latency_ms=12 {refused}: the planned model ran in 13 ms as a whole"):
            plan = plan_budget(model, _images(1, 32), latency_ms=12.0, calibration=_images(2, 32), methods="ghost")
        _assert_unchanged(model, snapshot)
        assert len(seen) == budget_module.LATENCY_ROUNDS == rounds and plan.measured_latency_ms == 13.0
        assert plan.fixed["latency_ms"] > 2.0 + 1.0  # each round added its gap
        return
    plan = plan_budget(model, _images(1, 32), latency_ms=12.0, calibration=_images(2, 32), methods="ghost")
    assert len(seen) == rounds and plan.measured_latency_ms == seen[-1] <= 12.0
    assert plan.fixed["latency_ms"] == pytest.approx(2.0 + (3.0 if rounds == 2 else 0.0))
    assert plan.total("latency_ms") == pytest.approx(plan.measured_latency_ms)  # the prediction now includes the gap
    predicted, measured = plan.total("latency_ms"), plan.measured_latency_ms
    assert f"20 → {predicted:.3g} ms predicted, {measured:.3g} measured (budget 12 ms)" in str(plan)


@pytest.mark.parametrize(
    ("asked", "gap", "refused"), [(5.0, -2.0, None), (4.0, -2.0, "4\\.5"), (5.0, 1.0, "6\\.5")], ids=str
)
def test_latency_budget_the_layers_call_unreachable_is_measured_as_a_whole_first(
    resnet20: nn.Module, monkeypatch, asked: float, gap: float, refused: str | None
) -> None:
    """Stub layers (dense 1 ms, Ghost s=4 0.25 ms; 2 ms outside them) say at least 2 + 18 x 0.25 = 6.5 ms; the whole
    model runs ``gap`` ms off what its layers add up to. 2 ms faster (4.5 ms with every layer fastest): 5 ms is
    planned and met as measured, 4 ms refused naming the measured 4.5 ms. 1 ms slower: refused naming the layers'
    6.5 ms (a slow whole does not make other plans slower). The model unchanged."""
    seen = _stub_latencies(monkeypatch, lambda layers: 2.0 + gap + layers)
    model = copy.deepcopy(resnet20)
    snapshot = _snapshot(model)
    if refused is not None:
        with pytest.raises(ValueError, match=rf"latency_ms={asked:g} cannot be met: the smallest reachable value is "):
            compress_to_budget(model, _images(1, 32), latency_ms=asked, calibration=_images(2, 32), methods="ghost")
        _assert_unchanged(model, snapshot)
        assert seen == [6.5 + gap]  # the fastest plan, measured once
        with pytest.raises(ValueError, match=rf"the smallest reachable value is {refused} ms"):
            plan_budget(model, _images(1, 32), latency_ms=asked, calibration=_images(2, 32), methods="ghost")
        return
    plan = plan_budget(model, _images(1, 32), latency_ms=asked, calibration=_images(2, 32), methods="ghost")
    assert seen[0] == 4.5 and plan.fixed["latency_ms"] == pytest.approx(0.0)
    assert plan.measured_latency_ms == seen[-1] <= asked and len(seen) == 2


def test_allocation_fills_back_what_the_descent_overshot() -> None:
    """The descent takes A's half step first (cheaper per unit saved), then must take B's full step; the fill then
    takes A's step back: 0.5 of the MACs with sensitivity 0.3, where the descent alone stops at 0.25 with 0.4."""
    dense = Candidate("dense", macs=100, params=10)
    a = LayerBudget("a", "Conv2d", (dense, Candidate("ghost", ratio=2, macs=50, params=5, sensitivity=0.1)))
    b = LayerBudget("b", "Conv2d", (dense, Candidate("ghost", ratio=4, macs=0, params=3, sensitivity=0.3)))
    plan = BudgetPlan([a, b], {"macs": 0.5}, {"macs": 200, "params": 20}, {"macs": 0, "params": 0})
    _allocate(plan, "test")
    assert plan.choices() == {"a": "dense", "b": "ghost s=4"}
    assert plan.fraction("macs") == 0.5 and plan.sensitivity == pytest.approx(0.3)


def test_plan_text_keeps_long_layer_names_on_one_line() -> None:
    """``str(plan)`` (what the callbacks log) is the table at its full width: a long name is neither folded nor cut."""
    name = "encoder.stages." + ".".join(f"block{i}" for i in range(30)) + ".conv"  # 190 characters
    dense = Candidate("dense", macs=100, params=10)
    layer = LayerBudget(name, "Conv2d", (dense, Candidate("ghost", ratio=2, macs=50, params=5, sensitivity=0.1)), 1)
    text = str(BudgetPlan([layer], {"macs": 0.5}, {"macs": 100, "params": 10}, {"macs": 0, "params": 0}))
    (row,) = [line for line in text.splitlines() if name in line]
    assert "ghost s=2" in row and "100 → 50" in row


def _nd_net(dims: int, transposed: bool = False) -> nn.Module:
    """Plain convs of ``dims`` spatial dimensions; a same-size transposed conv in the middle when ``transposed``."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    middle = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims] if transposed else conv
    torch.manual_seed(0)
    return nn.Sequential(
        conv(3, 16, 3, padding=1),
        nn.ReLU(),
        conv(16, 24, 3, padding=1, bias=False),
        nn.ReLU(),
        middle(24, 24, 3, padding=1),
        nn.ReLU(),
        conv(24, 16, 3, padding=1),
        nn.ReLU(),
        conv(16, 4, 1),
    ).eval()


_ND_SPATIAL = {1: (40,), 2: (12, 12), 3: (6, 6, 6)}


@pytest.mark.parametrize("method", ["ghost", "structured"])
@pytest.mark.parametrize("dims", [1, 3])
def test_nd_convs_are_planned_and_counted_like_count_complexity(dims: int, method: str) -> None:
    """Conv1d/Conv3d become GhostConv1d/3d or StructuredConv1d/3d; the plan's MACs and params are those counted on
    the converted model, and it restructures into a fresh model."""
    model = _nd_net(dims)
    example = torch.randn(1, 3, *_ND_SPATIAL[dims], generator=torch.Generator().manual_seed(0))
    calibration = torch.randn(4, 3, *_ND_SPATIAL[dims], generator=torch.Generator().manual_seed(1))
    before = count_complexity(model, example_input=example)
    result = compress_to_budget(model, example, macs=0.6, methods=(method,), calibration=calibration)
    after = count_complexity(model, example_input=example)
    assert after.macs / before.macs == pytest.approx(result.budget.fraction("macs"), abs=1e-12)
    assert after.macs <= 0.6 * before.macs
    assert after.params / before.params == pytest.approx(result.budget.fraction("params"), abs=1e-12)
    kind = f"{'Ghost' if method == 'ghost' else 'Structured'}Conv{dims}d"
    assert result.converted and all(type(model.get_submodule(n)).__name__ == kind for n in result.converted)
    assert all(0 <= c.sensitivity < 1 for layer in result.budget.layers for c in layer.candidates)
    fresh = _nd_net(dims)
    restructure(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(calibration), model(calibration), rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2])
def test_transposed_convs_are_skipped_with_the_reason(dims: int) -> None:
    model = _nd_net(dims, transposed=True)
    middle = model[4]
    example = torch.randn(2, 3, *_ND_SPATIAL[dims])
    plan = plan_budget(model, example, macs=0.7)
    reasons = {entry.name: entry.reason for entry in plan.skipped}
    assert reasons["4"] == budget_module.TRANSPOSED_REASON and "4" not in plan.choices()
    assert set(plan.choices()) == {"2", "6"}
    compress_to_budget(model, example, macs=0.7)
    assert model[4] is middle
    with pytest.raises(ValueError, match=r"no layer can be planned .*4: transposed conv: not planned by budgets"):
        plan_budget(model, example, macs=0.7, include="4")
