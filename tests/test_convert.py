"""Choosing layers and replacing them (lightning_cheapconv/convert.py)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from torch import nn

from lightning_cheapconv.checkpoint import restructure
from lightning_cheapconv.convert import (
    ConversionResult,
    capture_inputs,
    convert_to_ghost,
    decompose_structured,
    ghost_from_conv,
    recalibrate_batchnorm,
    replace_modules,
    select_layers,
    structure_spec_for,
    structured_from_dense,
)
from lightning_cheapconv.models import resnet56
from lightning_cheapconv.nn import GhostConv2d, StructuredConv2d, StructuredLinear
from lightning_cheapconv.structure import StructureSpec, structural_residual

pytestmark = pytest.mark.usefixtures("one_thread")


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _snapshot(model: nn.Module) -> tuple[dict, list, list]:
    """Everything a failed conversion must leave untouched: state, module types and names, modes, trainability."""
    state = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in model.state_dict().items()}
    modules = [(name, type(m), m.training) for name, m in model.named_modules(remove_duplicate=False)]
    params = [(name, id(p), p.requires_grad) for name, p in model.named_parameters()]
    return state, modules, params


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict, list, list]) -> None:
    state, modules, params = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        if torch.is_tensor(value):  # exact, NaN equal to NaN (a refused layer may hold NaN)
            assert now[key].shape == value.shape and torch.allclose(now[key], value, 0, 0, equal_nan=True), key
        else:
            assert now[key] == value, key
    assert [(name, type(m), m.training) for name, m in model.named_modules(remove_duplicate=False)] == modules
    assert [(name, id(p), p.requires_grad) for name, p in model.named_parameters()] == params


def _perturb(model: nn.Module) -> None:
    """Move every float tensor of ``model`` so that equal outputs later prove the state dict was loaded."""
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.25)


# ----------------------------------------------------------------------------- torchvision zoo

_ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), 32),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None, num_classes=10), 32),
    "vgg16": (lambda: _small_head_vgg16(), 32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10), 32),
    "shufflenet_v2_x1_0": (lambda: torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=10), 32),
    "googlenet": (
        lambda: torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=False, init_weights=False),
        32,
    ),
    # Asymmetric 1x7 / 7x1 and 1x3 / 3x1 kernels; 75x75 is the smallest input it accepts.
    "inception_v3": (
        lambda: torchvision.models.inception_v3(weights=None, num_classes=10, aux_logits=False, init_weights=False),
        75,
    ),
}
# Weight inheritance is exercised on two real models (3x3 and 1x1 convs); the others start random,
# which keeps the file fast (inheritance exactness and quality have their own tests in test_inherit.py).
_INHERIT = {"googlenet", "shufflenet_v2_x1_0"}


def _small_head_vgg16() -> nn.Module:
    """torchvision's VGG-16 with all 13 convs as they are; at 32x32 the features end at 1x1, so the
    7x7 average pool and the 25088-wide first FC (100M of its 134M parameters) are shrunk to 1x1 / 512
    (as in CIFAR VGG) to keep building and copying it cheap. The classifier is never converted."""
    model = torchvision.models.vgg16(weights=None, num_classes=10, init_weights=False)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier[0] = nn.Linear(512, 4096)
    return model


@functools.lru_cache(maxsize=1)
def _template(name: str) -> tuple[nn.Module, torch.Tensor]:
    builder, size = _ZOO[name]
    torch.manual_seed(0)
    model = builder().eval()
    return model, torch.randn(1, 3, size, size)


def _convert(model: nn.Module, method: str, init: str = "inherit") -> ConversionResult:
    if method == "ghost":
        return convert_to_ghost(model, init=init)
    return decompose_structured(model, channel_ratio=0.5)


@pytest.mark.parametrize("name,method", [(name, method) for name in _ZOO for method in ("ghost", "structured")])
def test_torchvision_models_convert_run_and_round_trip(name, method):
    template, x = _template(name)
    model = copy.deepcopy(template)
    with torch.no_grad():
        reference = template(x)
    params_before = _num_params(model)

    result = _convert(model, method, "inherit" if name in _INHERIT else "random")

    new_type = GhostConv2d if method == "ghost" else StructuredConv2d
    assert result.method == method and len(result.changes) > 0
    for change in result.changes:
        assert isinstance(model.get_submodule(change.name), new_type)
        assert change.params_after < change.params_before
    # Every candidate was converted or skipped with a reason; the plain convs left are the skipped ones.
    assert all(p.reason for p in result.plan)
    assert set(result.converted) == {p.name for p in result.plan} - {p.name for p in result.skipped}
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, (GhostConv2d, StructuredConv2d)))
    plain = {n for n, m in model.named_modules() if type(m) is nn.Conv2d and not n.startswith(inside)}
    assert plain == {p.name for p in result.skipped}
    assert result.params_before == params_before
    assert result.params_after == _num_params(model) < params_before
    assert result.params_ratio > 1.0 and result.layer_macs_ratio > 1.0

    with torch.no_grad():
        out = model(x)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()

    # The converted state dict restructures a fresh, unconverted model and loads strictly.
    fresh = copy.deepcopy(template)
    _perturb(fresh)
    state = model.state_dict()
    rebuilt = restructure(fresh, state)
    assert {r.name for r in rebuilt} == set(result.converted)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_converted_resnet18_exports(method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    _convert(model, method, init="random")
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-5)
        other = torch.randn(2, 3, 32, 32)  # not a constant-folded trace of one input
        torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- CIFAR ResNet-56 counts


@pytest.mark.parametrize(
    "method,kwargs,expected",
    [
        ("ghost", {"ratio": 2, "dw_size": 3, "init": "random"}, 438_154),
        ("structured", {"channel_ratio": 1.0}, 381_978),
        ("structured", {"channel_ratio": 0.5}, 193_562),
    ],
)
def test_resnet56_parameter_counts_match_references(method, kwargs, expected):
    model = resnet56()
    assert _num_params(model) == 853_018
    result = convert_to_ghost(model, **kwargs) if method == "ghost" else decompose_structured(model, **kwargs)
    assert _num_params(model) == result.params_after == expected
    assert result.params_before == 853_018
    convs = [n for n, m in resnet56().named_modules() if isinstance(m, nn.Conv2d)]
    assert result.converted == convs[1:]  # every conv but the first
    assert [p.name for p in result.skipped] == convs[:1]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ----------------------------------------------------------------------------- small models


class _Small(nn.Module):
    """stem 3->16, conv1 16->32 (3x3), conv2 32->32 (1x1), head Linear(32, 10)."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(32, 32, 1, bias=bias)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def test_conversion_result_fields_and_str_ghost():
    torch.manual_seed(0)
    model = _Small()
    total = _num_params(model)
    result = convert_to_ghost(model, ratio=2, dw_size=3, init="random")

    assert [(p.name, p.action) for p in result.plan] == [("stem", "skip"), ("conv1", "convert"), ("conv2", "convert")]
    assert result.plan[0].reason == "first conv (stem) is kept, as in the papers"
    assert [p.order for p in result.plan] == [0, 1, 2]
    assert result.plan[1].reason == "GhostConv2d(ratio=2, dw_size=3)"
    assert result.converted == ["conv1", "conv2"]
    assert [p.name for p in result.skipped] == ["stem"]

    # Hand counts: m = 16 intrinsic maps; primary 16·C·k², cheap 16·3².
    conv1, conv2 = result.changes
    assert (conv1.params_before, conv1.params_after) == (32 * 16 * 9, 16 * 16 * 9 + 16 * 9)
    assert (conv2.params_before, conv2.params_after) == (32 * 32, 16 * 32 + 16 * 9)
    assert (conv1.macs_per_position_before, conv1.macs_per_position_after) == (4608, 2448)
    assert (conv2.macs_per_position_before, conv2.macs_per_position_after) == (1024, 656)
    assert result.layer_macs_ratio == pytest.approx((4608 + 1024) / (2448 + 656))
    saved = (4608 - 2448) + (1024 - 656)
    assert (result.params_before, result.params_after) == (total, total - saved)
    assert result.params_ratio == pytest.approx(total / (total - saved))
    assert all(c.error is None for c in result.changes)  # random init: nothing was fitted
    assert (conv1.old_type, conv1.new_type, conv1.detail) == ("Conv2d", "GhostConv2d", "s=2, d=3, init=random")

    text = str(result)
    lines = text.splitlines()
    assert lines[0] == (
        f"ghost: converted 2 layer(s), skipped 1; params {total:,} -> {total - saved:,} "
        f"({total / (total - saved):.2f}x, original/converted)"
    )
    assert "  conv1: Conv2d -> GhostConv2d (s=2, d=3, init=random)" in lines
    assert "  stem: skipped (first conv (stem) is kept, as in the papers)" in lines


def test_conversion_result_fields_structured_and_inherit_errors():
    torch.manual_seed(0)
    model = _Small()
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv1", "conv2")}
    result = decompose_structured(model, channel_ratio=0.5)
    assert result.converted == ["conv1", "conv2"]  # the 1x1 conv converts at channel_ratio < 1
    conv1, conv2 = result.changes
    assert conv1.params_after == 32 * 8 * 2 * 2 and conv2.params_after == 32 * 16
    assert conv1.detail == "c=8, n=(2, 2)" and conv2.detail == "c=16, n=(1, 1)"
    assert result.layer_macs_ratio == pytest.approx((4608 + 1024) / (1024 + 512))
    for change in result.changes:
        spec = StructureSpec(*((8, (2, 2)) if change.name == "conv1" else (16, (1, 1))))
        expected = float(structural_residual(originals[change.name].double(), spec))
        assert change.error == pytest.approx(expected, rel=1e-6)
        assert 0.0 < change.error < 1.0
    assert "error" in str(result)

    small = _Small()
    weights = {n: small.get_submodule(n).weight.detach().clone() for n in ("conv1", "conv2")}
    ghost = convert_to_ghost(small, init="inherit")
    for change in ghost.changes:
        # Intrinsic filters are copied exactly, and a least-squares ghost is never worse than a zero kernel, so
        # the error is at most the ghosts' share of the weight norm (about sqrt(1/2) here). Random filters hardly
        # fit each other: 9 taps explain ~7% of a 144-dim conv1 ghost, the 1x1 conv2's single tap ~13% (the best
        # of 16 partners), so the error stays above 0.85x that bound (measured 0.92-0.96x over 10 seeds).
        module, weight = small.get_submodule(change.name), weights[change.name]
        ghosts = module.output_index >= module.intrinsic_channels
        bound = float((weight[ghosts].pow(2).sum() / weight.pow(2).sum()).sqrt())
        assert 0.85 * bound < change.error <= bound + 1e-6, (change.name, change.error, bound)


def test_default_skips():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.pw = nn.Conv2d(16, 32, 1)
            self.narrow = nn.Conv2d(32, 1, 3, padding=1)  # out_channels < ratio
            self.tiny = nn.Conv2d(1, 4, 1)  # a Ghost module would be bigger
            self.sub = _MyConv(4, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 10, 3)  # fully convolutional: the last conv is the classifier

    ghost = {p.name: p for p in select_layers(Net(), "ghost")}
    assert ghost["stem"].reason.startswith("first conv")
    assert ghost["dw"].action == "skip" and "depthwise" in ghost["dw"].reason
    assert ghost["grouped"].action == "skip" and "groups=4" in ghost["grouped"].reason
    assert ghost["pw"].action == "convert"
    assert ghost["narrow"].action == "skip" and "out_channels=1 < ratio=2" in ghost["narrow"].reason
    assert ghost["tiny"].action == "skip" and "fewer parameters" in ghost["tiny"].reason
    assert ghost["sub"].action == "skip" and "subclass _MyConv" in ghost["sub"].reason
    assert ghost["head"].action == "skip" and ghost["head"].reason.startswith("last layer")

    full = {p.name: p for p in select_layers(Net(), "structured", channel_ratio=1.0)}
    assert full["dw"].action == "convert"  # depthwise is the C=1 case: spatial pooling only
    assert full["grouped"].action == "convert"
    assert full["pw"].action == "skip" and full["pw"].reason.startswith("1x1 conv")
    assert full["tiny"].action == "skip" and full["tiny"].reason.startswith("1x1 conv")
    half = {p.name: p for p in select_layers(Net(), "structured", channel_ratio=0.5)}
    assert half["pw"].action == "convert" and half["pw"].reason == "structured c=8, n=(1, 1)"
    assert half["tiny"].action == "skip"  # C=1: nothing to pool
    assert half["head"].action == "skip" and half["sub"].action == "skip"

    kept = {p.name: p.action for p in select_layers(Net(), "ghost", skip_first=False, skip_last=False)}
    assert kept["stem"] == "convert" and kept["head"] == "convert"


class _MyConv(nn.Conv2d):
    """A subclass with its own forward: converting it could lose what that forward does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_linear_layers_structured_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    result = decompose_structured(model, channel_ratio=0.5, linear=True)
    assert result.converted == ["2"]
    assert isinstance(model[2], StructuredLinear) and model[2].hidden_features == 64
    assert [(p.name, p.reason) for p in result.skipped] == [
        ("0", "first conv (stem) is kept, as in the papers"),
        ("4", "prediction layer, kept"),  # found in a torch.fx trace
    ]
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 10)
    # Without linear=True a Linear is no candidate at all.
    plan = select_layers(model, "structured", skip_first=False)
    assert [(p.name, p.action) for p in plan if p.type in ("Conv2d", "Linear")] == [("0", "convert")]
    with pytest.raises(ValueError, match="structured method only"):
        select_layers(model, "ghost", linear=True)
    with pytest.raises(ValueError, match="method='pruning' is not valid; valid values are 'ghost' and 'structured'"):
        select_layers(model, "pruning")


@functools.lru_cache(maxsize=1)
def _resnet18() -> nn.Module:
    return torchvision.models.resnet18()


def _resnet18_plan(**kwargs) -> dict[str, str]:
    return {p.name: p.reason for p in select_layers(_resnet18(), "ghost", **kwargs)}


def test_include_exclude_globs():
    names = [n for n, m in _resnet18().named_modules() if isinstance(m, nn.Conv2d)]
    plan = select_layers(_resnet18(), "ghost", include="layer1.*")
    assert [p.name for p in plan] == names  # every candidate is planned, in registration order
    converted = [p.name for p in plan if p.action == "convert"]
    assert converted == [n for n in names if n.startswith("layer1.")] and len(converted) == 4
    assert {p.reason for p in plan if p.action == "skip"} == {"not matched by include"}

    plan = select_layers(_resnet18(), "ghost", include=["layer1.*", "*.downsample.0"])
    converted = {p.name for p in plan if p.action == "convert"}
    assert converted == {n for n in names if n.startswith("layer1.") or n.endswith("downsample.0")}

    reasons = _resnet18_plan(exclude=("*.downsample.*", "layer4.*"))
    for name in names[1:]:
        if "downsample" in name or name.startswith("layer4."):
            assert reasons[name] == "matched by exclude"
        else:
            assert reasons[name] == "GhostConv2d(ratio=2, dw_size=3)"
    # Include and exclude together: exclude wins.
    reasons = _resnet18_plan(include="layer2.*", exclude="*.conv2")
    assert [n for n, r in reasons.items() if r.startswith("Ghost")] == [
        "layer2.0.conv1",
        "layer2.0.downsample.0",
        "layer2.1.conv1",
    ]
    # The stem rule still applies to an included stem.
    assert _resnet18_plan(include="conv1")["conv1"].startswith("first conv")
    assert _resnet18_plan(include="conv1", skip_first=False)["conv1"].startswith("Ghost")


class _Nested(nn.Module):
    """Sequential inside ModuleList inside ModuleDict, and plain attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleDict(
            {
                "a": nn.ModuleList([nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()), nn.Conv2d(16, 16, 1)]),
                "b": nn.ModuleList([nn.Sequential(nn.Identity(), nn.Conv2d(16, 16, 3, stride=2, padding=1))]),
            }
        )
        self.extra = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in (*self.stages["a"], *self.stages["b"]):
            x = torch.relu(block(x))
        return self.head(self.extra(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_nested_containers(method):
    torch.manual_seed(0)
    model = _Nested().eval()
    x = torch.randn(2, 3, 8, 8)
    result = convert_to_ghost(model) if method == "ghost" else decompose_structured(model, channel_ratio=0.5)
    expected = ["stages.a.0.0", "stages.a.1", "stages.b.0.1", "extra"]
    assert result.converted == expected
    new_type = GhostConv2d if method == "ghost" else StructuredConv2d
    assert isinstance(model.stages["a"][0][0], new_type) and isinstance(model.stages["a"][1], new_type)
    assert isinstance(model.stages["b"][0][1], new_type) and isinstance(model.extra, new_type)
    assert isinstance(model.stages["a"][0][1], nn.ReLU) and isinstance(model.stages["b"][0][0], nn.Identity)
    assert type(model.stem) is nn.Conv2d
    out = model(x)
    fresh = _Nested().eval()
    restructure(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), out)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block1 = nn.Conv2d(16, 16, 3, padding=1)
        self.block2 = nn.Sequential(self.block1, nn.ReLU())  # the same conv under a second name
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.block1(torch.relu(self.stem(x))))
        return self.head(self.block2(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_shared_module_converted_once(method):
    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(2, 3, 8, 8)
    result = (
        convert_to_ghost(model, init="random") if method == "ghost" else decompose_structured(model, channel_ratio=0.5)
    )
    assert result.converted == ["block1"]
    assert result.changes[0].aliases == ("block1", "block2.0")
    assert result.plan[1].aliases == ("block1", "block2.0")
    assert model.block1 is model.block2[0]
    assert isinstance(model.block1, (GhostConv2d, StructuredConv2d))
    assert result.params_after == _num_params(model)  # counted once
    # An include pattern that matches only the second name selects the shared layer too.
    plan = select_layers(_Shared(), "ghost", include="block2.*")
    assert [(p.name, p.action) for p in plan if p.action == "convert"] == [("block1", "convert")]

    state = model.state_dict()
    assert "block1._extra_state" in state and "block2.0._extra_state" in state
    fresh = _Shared()
    assert [r.name for r in restructure(fresh, state)] == ["block1"]
    assert fresh.block1 is fresh.block2[0] and type(fresh.block1) is type(model.block1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), model(x))


def test_replace_modules():
    model = _Shared()
    new = nn.Conv2d(16, 16, 3, padding=1)
    replace_modules(model, {"block2.0": new})
    assert model.block1 is new and model.block2[0] is new  # every alias follows
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        replace_modules(model, {"block1": nn.Identity(), "nope": nn.Identity()})
    _assert_unchanged(model, snapshot)
    with pytest.raises(ValueError, match="root module"):
        replace_modules(model, {"block1": nn.Identity(), "": nn.Identity()})
    _assert_unchanged(model, snapshot)


def test_converted_modules_keep_mode_dtype_and_device():
    model = _Small(bias=True).double().train()
    model.conv2.eval()
    convert_to_ghost(model, calibration=torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert model.conv1.training and not model.conv2.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.eval()
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64

    model = _Small(bias=True).double()
    decompose_structured(model, channel_ratio=0.5)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_capture_inputs():
    torch.manual_seed(0)
    model = _Small().train()
    x = torch.randn(4, 3, 8, 8)
    running = model.bn.running_mean.clone()
    inputs = capture_inputs(model, x, ["stem", "conv2", "head"])
    assert model.training and model.bn.training  # mode restored
    assert torch.equal(model.bn.running_mean, running)  # ran in eval mode
    assert torch.equal(inputs["stem"], x)
    assert inputs["conv2"].shape == (4, 32, 8, 8) and inputs["head"].shape == (4, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.head(inputs["head"]), model(x))
    assert not model._forward_pre_hooks and not model.conv2._forward_pre_hooks  # hooks removed

    class Skips(_Small):
        def forward(self, x):
            return self.head(self.stem(x).mean((2, 3)).repeat(1, 2))

    with pytest.raises(ValueError, match=r"\['conv1'\] were not called"):
        capture_inputs(Skips(), x, ["stem", "conv1"])


def test_structure_spec_for_and_structured_from_dense():
    conv = nn.Conv2d(16, 8, 3, groups=2)
    assert structure_spec_for(conv, channel_ratio=0.5) == StructureSpec(4, (2, 2))
    assert structure_spec_for(nn.Linear(10, 3), channel_ratio=0.5) == StructureSpec(5, (1, 1))
    with pytest.raises(ValueError, match="mylayer: expected nn.Conv2d or nn.Linear"):
        structure_spec_for(nn.ReLU(), name="mylayer")
    layer, residual = structured_from_dense(conv, StructureSpec(4, (2, 2)))
    assert isinstance(layer, StructuredConv2d) and 0 < residual < 1
    with pytest.raises(ValueError, match="expected nn.Conv2d or nn.Linear"):
        structured_from_dense(nn.ReLU(), StructureSpec(1))
    with pytest.raises(ValueError, match="expected nn.Conv2d"):
        ghost_from_conv(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="c1: cannot convert to Ghost: depthwise"):
        ghost_from_conv(nn.Conv2d(8, 8, 3, groups=8), name="c1")


# ----------------------------------------------------------------------------- errors and atomicity


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1}, "ratio=1 is out of range"),
        ({"ratio": 2.5}, "ratio=2.5 is not an int"),
        ({"ratio": True}, "ratio=True is not an int"),
        ({"dw_size": 2}, "dw_size=2 is out of range"),
        ({"dw_size": 0}, "dw_size=0 is out of range"),
        ({"init": "kaiming"}, "init='kaiming'"),
        ({"include": "nothing.*"}, r"include pattern\(s\) \['nothing\.\*'\] match no candidate layer"),
        ({"include": ["conv1", "typo*"]}, r"include pattern\(s\) \['typo\*'\] match no candidate layer"),
        (
            {"exclude": "*"},
            r"no layer matches the selection \(include=None, exclude=\('\*',\)\): stem: matched by exclude; "
            "conv1: matched by exclude",
        ),
        ({"skip_first": "yes"}, "convert_to_ghost: skip_first='yes' is not a bool; valid values are True and False"),
        ({"skip_last": 0}, "skip_last=0 is not a bool"),
        ({"recalibrate_bn": None}, "recalibrate_bn=None is not a bool"),
        ({"include": 5}, r"include=5 is not valid; valid values are None, a glob pattern"),
        ({"exclude": ["a", 1]}, r"exclude=\['a', 1\] is not valid"),
        ({"include": []}, r"include=\[\] is not valid"),
        ({"init": None}, "init=None is not valid; valid values are 'inherit' and 'random'"),
        ({"ratio": 2.0}, r"ratio=2.0 is not an int; valid range is >= 2 \(an int\)"),
        ({"dw_size": "3"}, r"dw_size='3' is not an int; valid range is >= 1 \(an odd int\)"),
        ({"calibration": [1.0, 2.0]}, "calibration must be a torch.Tensor, got list"),
        ({"plan": "all"}, "plan must be a list of LayerPlan"),
    ],
)
def test_convert_to_ghost_errors_name_the_argument_and_leave_model_unchanged(kwargs, match):
    model = _Small()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        convert_to_ghost(model, **kwargs)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channel_ratio": 0.0}, r"channel_ratio=0.0 is out of range; valid range is \(0, 1\]"),
        ({"channel_ratio": 1.5}, "channel_ratio=1.5 is out of range"),
        ({"channel_ratio": -0.5}, "channel_ratio=-0.5 is out of range"),
        ({"kernel_size": 0}, "kernel_size=0 is out of range"),
        ({"kernel_reduction": -1}, "kernel_reduction=-1 is out of range"),
        ({"include": "head", "linear": False}, r"include pattern\(s\) \['head'\] match no candidate layer"),
        ({"include": "stem"}, "no layer matches the selection .*stem: first conv"),
        ({"specs": {"nope": StructureSpec(4, (2, 2))}}, r"not candidates: \['nope'\]"),
        ({"specs": {"stem": StructureSpec(2, (2, 2))}}, "stem"),  # skipped, so not a candidate
        ({"specs": {"conv1": StructureSpec(17, (2, 2))}}, r"conv1: structured channels \(c\)=17 is out of range"),
        (
            {"kernel_size": 2.0},
            r"kernel_size=2.0 is not an int or a pair of ints; each side must be >= 1 \(an int, or a pair of ints\)",
        ),
        ({"kernel_size": (2, 2, 2)}, r"kernel_size=\(2, 2, 2\) is out of range"),
        ({"kernel_reduction": 1.5}, r"kernel_reduction=1.5 is not an int; valid range is >= 0 \(an int\)"),
        ({"channel_ratio": True}, "channel_ratio=True is not a number"),
        ({"channel_ratio": float("nan")}, "channel_ratio=nan is out of range"),
        ({"linear": "no"}, "linear='no' is not a bool"),
        ({"skip_first": 1}, "skip_first=1 is not a bool"),
        ({"specs": {"conv1": (4, 2)}}, "specs must be a dict of layer name -> StructureSpec"),
        ({"calibration": torch.randn(2, 3, 8, 8).tolist()}, "calibration must be a torch.Tensor"),
    ],
)
def test_decompose_structured_errors_name_the_argument_and_leave_model_unchanged(kwargs, match):
    model = _Small()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        decompose_structured(model, **kwargs)
    _assert_unchanged(model, snapshot)


def _three_targets() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 3),
    )


def test_structured_failure_in_a_middle_layer_is_atomic():
    model = _three_targets().train()
    snapshot = _snapshot(model)
    specs = {"1": StructureSpec(4, (2, 2)), "2": StructureSpec(16, (4, 2)), "4": StructureSpec(8, (2, 2))}
    with pytest.raises(ValueError, match=r"2: structured kernel height \(n_h\)=4 is out of range"):
        decompose_structured(model, specs=specs)
    _assert_unchanged(model, snapshot)
    # The same call with a valid middle spec converts all three.
    specs["2"] = StructureSpec(16, (2, 2))
    assert decompose_structured(model, specs=specs).converted == ["1", "2", "3", "4"]  # 3: depthwise, C=1
    assert model[2].hidden_channels == 16 and model[1].hidden_channels == 4


def test_ghost_failure_in_a_middle_layer_is_atomic():
    model = _three_targets().eval()
    plan = select_layers(model, "ghost")
    assert [p.name for p in plan if p.action == "convert"] == ["1", "2", "4"]
    for entry in plan:  # force the depthwise conv (layer 3) into the plan: its build fails
        if entry.name == "3":
            entry.action = "convert"
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="3: cannot convert to Ghost: depthwise"):
        convert_to_ghost(model, plan=plan)
    _assert_unchanged(model, snapshot)

    # A calibration batch that never reaches a selected layer fails before anything changes.
    class Partial(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))

    partial = Partial(*_three_targets())
    snapshot = _snapshot(partial)
    with pytest.raises(ValueError, match="were not called"):
        convert_to_ghost(partial, calibration=torch.randn(1, 3, 4, 4))
    _assert_unchanged(partial, snapshot)


def test_recalibrate_batchnorm_sets_plain_batch_statistics_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 1)
    )
    model.train()
    model[1].momentum = 0.3
    frozen = nn.BatchNorm2d(4).eval()  # a frozen BN inside a training model stays frozen
    model.append(frozen)
    inputs = torch.randn(40, 3, 6, 6)
    assert recalibrate_batchnorm(model, inputs, batch_size=40) == 2  # one chunk: the exact batch statistics
    with torch.no_grad():
        features = model[0](inputs)
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, features.var((0, 2, 3)), rtol=1e-4, atol=1e-6)
    recalibrate_batchnorm(model, inputs, batch_size=20)  # equal chunks: the mean of chunk means
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.3 and model.training and model[3].training and not frozen.training


def test_calibration_recalibrates_batchnorm_after_ghost_conversion():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1),
    )  # fmt: skip
    model.eval()
    inputs = torch.randn(32, 3, 8, 8)
    convert_to_ghost(model, calibration=inputs, skip_last=True)
    with torch.no_grad():
        features = model[3](model[2](model[1](model[0](inputs))))
    # While re-estimating, BN 1 normalized with the biased batch variance; in eval mode it uses the stored
    # unbiased one (a factor n/(n-1), n = 2048 here), so the features differ by ~5e-4 relative.
    torch.testing.assert_close(model[4].running_mean, features.mean((0, 2, 3)), rtol=2e-3, atol=1e-4)
    untouched = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    convert_to_ghost(untouched, calibration=inputs, recalibrate_bn=False, skip_first=False)
    assert torch.equal(untouched[3].running_mean, torch.zeros(8))


# ----------------------------------------------------------------------------- non-finite weights, bad calibration


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["weight", "bias"])
@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_non_finite_weights_are_refused_naming_the_layer(method, tensor, value):
    model = _Small(bias=True)
    with torch.no_grad():
        getattr(model.conv2, tensor).view(-1)[3] = value
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=rf"conv2\.{tensor} \(shape .*\) has 1 non-finite value\(s\) \(NaN or inf\)"):
        convert_to_ghost(model) if method == "ghost" else decompose_structured(model, channel_ratio=0.5)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_non_finite_calibration_is_refused(method):
    model = _Small()
    calibration = torch.randn(2, 3, 8, 8)
    calibration[1, 0, 2, 2] = float("nan")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"calibration \(shape \(2, 3, 8, 8\)\) has 1 non-finite value"):
        convert_to_ghost(model, calibration=calibration) if method == "ghost" else decompose_structured(
            model, calibration=calibration
        )
    _assert_unchanged(model, snapshot)


def test_non_finite_layer_input_from_a_finite_calibration_names_the_layer():
    model = _Small()
    with torch.no_grad():
        model.stem.weight[0, 0, 0, 0] = float("inf")  # the stem is kept, but conv1 sees its inf outputs
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"conv1: inputs \(shape \(2, 16, 8, 8\)\) has .* non-finite"):
        convert_to_ghost(model, calibration=torch.randn(2, 3, 8, 8), skip_last=False)
    _assert_unchanged(model, snapshot)


def _calls(model: nn.Module, calibration: torch.Tensor) -> dict:
    return {
        "ghost inherit": lambda: convert_to_ghost(model, calibration=calibration),
        "ghost random": lambda: convert_to_ghost(model, init="random", calibration=calibration),
        "structured": lambda: decompose_structured(model, channel_ratio=0.5, calibration=calibration),
    }


@pytest.mark.parametrize("call", ["ghost inherit", "ghost random", "structured"])
def test_calibration_the_model_cannot_take_is_refused_before_any_change(call):
    torch.manual_seed(0)
    model = _Small().train()
    model.conv1.requires_grad_(False)
    model.bn.running_mean.add_(1.0)
    snapshot = _snapshot(model)
    wrong = torch.randn(2, 5, 8, 8)  # 5 channels, the stem takes 3
    with pytest.raises(
        ValueError, match=r"calibration with input shapes \[\(2, 5, 8, 8\)\] does not run through _Small: Runtime"
    ):
        _calls(model, wrong)[call]()
    _assert_unchanged(model, snapshot)


class _PooledHead(nn.Module):
    """Runs in eval mode on one image, but BatchNorm1d cannot estimate statistics from one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.norm(self.conv(self.stem(x)).mean((2, 3))))


@pytest.mark.parametrize("call", ["ghost inherit", "ghost random", "structured"])
def test_a_failing_batchnorm_recalibration_undoes_the_conversion(call):
    torch.manual_seed(0)
    model = _PooledHead().eval()
    model.norm.running_var.mul_(3.0)
    snapshot = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"calibration: a chunk with input shapes \[\(1, 3, 8, 8\)\] does not run through"
    ):
        _calls(model, torch.randn(1, 3, 8, 8))[call]()
    _assert_unchanged(model, snapshot)
    assert type(model.conv) is nn.Conv2d


def test_recalibrate_batchnorm_leaves_statistics_alone_on_error():
    model = _PooledHead().train()
    model.norm.running_mean.add_(0.5)
    snapshot = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"recalibrate_batchnorm: inputs: a chunk with input shapes \[\(1, 3, 8, 8\)\]"
    ):
        recalibrate_batchnorm(model, torch.randn(3, 3, 8, 8), batch_size=2)  # the second chunk has one image
    _assert_unchanged(model, snapshot)


# ----------------------------------------------------------------------------- frozen layers stay frozen


def _trainability(module: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("method", ["ghost", "structured"])
@pytest.mark.parametrize("bias", [False, True])
def test_replaced_parameters_inherit_requires_grad(method, bias):
    model = _Small(bias=bias)
    model.conv1.requires_grad_(False)
    if bias:
        model.conv2.weight.requires_grad_(False)  # a frozen weight with a trainable bias
    convert_to_ghost(model) if method == "ghost" else decompose_structured(model, channel_ratio=0.5)
    assert set(_trainability(model.conv1).values()) == {False}
    conv2 = _trainability(model.conv2)
    assert conv2 == {name: name.endswith("bias") or not bias for name in conv2}
    assert any(name.endswith("bias") for name in conv2) == bias
    assert set(_trainability(model.head).values()) == {True}  # untouched layers keep theirs


@pytest.mark.parametrize("frozen", [False, True])
def test_building_blocks_inherit_requires_grad(frozen):
    conv = nn.Conv2d(8, 16, 3, bias=True).requires_grad_(not frozen)
    for init in ("inherit", "random"):
        ghost, _ = ghost_from_conv(conv, init=init)
        assert set(_trainability(ghost).values()) == {not frozen}
    layer, _ = structured_from_dense(conv, StructureSpec(4, (2, 2)))
    assert set(_trainability(layer).values()) == {not frozen}
    linear = nn.Linear(8, 4, bias=False).requires_grad_(not frozen)
    assert set(_trainability(structured_from_dense(linear, StructureSpec(4))[0]).values()) == {not frozen}


# ----------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: select_layers(m, "ghost", skip_first="yes"), "select_layers: skip_first='yes' is not a bool"),
        (lambda m: select_layers(m, "ghost", ratio=1), "select_layers: ratio=1 is out of range"),
        (
            lambda m: select_layers(m, "structured", kernel_size=2.0),
            "select_layers: kernel_size=2.0 is not an int or a pair of ints",
        ),
        (lambda m: select_layers(m, "structured", channel_ratio=2), r"channel_ratio=2 .*valid range is \(0, 1\]"),
        (lambda m: select_layers(m, "ghost", include=3), "select_layers: include=3 is not valid"),
        (lambda m: select_layers(nn.Linear(2, 2).weight, "ghost"), "select_layers: model must be a Module"),
        (
            lambda m: select_layers(m, "ghost", example_input=torch.randn(1, 4, 8, 8)),
            r"input shapes \[\(1, 4, 8, 8\)\]",
        ),
        (
            lambda m: structure_spec_for(m.conv1, kernel_size=2.0, name="conv1"),
            "conv1: kernel_size=2.0 is not an int or a pair of ints",
        ),
        (lambda m: structure_spec_for(m.conv1, channel_ratio=0, name="conv1"), r"conv1: channel_ratio=0 is out"),
        (lambda m: capture_inputs(m, torch.randn(1, 3, 8, 8), "conv1"), "names must be a sequence of layer names"),
        (lambda m: capture_inputs(m, torch.randn(1, 3, 8, 8), ["nope"]), "names contains 'nope', which is no"),
        (
            lambda m: capture_inputs(m, torch.randn(1, 2, 8, 8), ["conv1"]),
            r"example_input with input shapes \[\(1, 2, 8, 8\)\]",
        ),
        (lambda m: recalibrate_batchnorm(m, torch.randn(2, 3, 8, 8), batch_size=0), "batch_size=0 is out of range"),
        (lambda m: recalibrate_batchnorm(m, torch.randn(2, 3, 8, 8), batch_size=True), "batch_size=True is not an int"),
        (lambda m: recalibrate_batchnorm(m, torch.full((2, 3, 8, 8), float("inf"))), r"inputs \(shape .*non-finite"),
        (lambda m: ghost_from_conv(m.conv1, ratio=2.0, name="conv1"), "conv1: ratio=2.0 is not an int"),
        (lambda m: ghost_from_conv(m.conv1, init="zeros", name="conv1"), "conv1: init='zeros' is not valid"),
        (
            lambda m: ghost_from_conv(m.conv1, init="random", calibration_input=torch.randn(1, 16, 8, 8)),
            "calibration_input is only read with init='inherit'",
        ),
        (lambda m: ghost_from_conv(m.conv1, calibration_input=torch.randn(1, 3, 8, 8)), r"shape \(1, 3, 8, 8\)"),
        (lambda m: structured_from_dense(m.conv1, (8, 2), "conv1"), "conv1: spec must be a StructureSpec, got tuple"),
        (lambda m: replace_modules(m, {"conv1": "identity"}), r"replacements\['conv1'\] must be a Module, got str"),
        (lambda m: replace_modules(m, [("conv1", nn.Identity())]), "replacements must be a dict, got list"),
    ],
)
def test_public_functions_refuse_bad_arguments_and_leave_the_model_alone(call, match):
    model = _Small().train()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    _assert_unchanged(model, snapshot)
