"""Parameter/MAC counting (lightning_cheapconv.complexity) and the compression report."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_cheapconv.complexity import (
    Complexity,
    LayerComplexity,
    compression_ratios,
    count_complexity,
    format_count,
)
from lightning_cheapconv.models.cifar_resnet import resnet56
from lightning_cheapconv.nn import (
    DepthwiseSeparableConv2d,
    GhostConv2d,
    SqueezeExcite,
    StructuredConv2d,
    StructuredLinear,
)
from lightning_cheapconv.report import compression_report


def conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    """Hand formula: every output element takes (C_in / groups) · k_h · k_w multiply-adds."""
    k_h, k_w = conv.kernel_size
    return out.numel() * (conv.in_channels // conv.groups) * k_h * k_w


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- plain layers


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), (2, 3, 9, 9)),
        (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4), (1, 8, 7, 7)),  # grouped
        (dict(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6), (1, 6, 10, 10)),  # depthwise
        (dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=6), (1, 6, 8, 8)),  # depth multiplier
        (dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1), (3, 4, 11, 11)),  # strided
        (dict(in_channels=4, out_channels=5, kernel_size=3, dilation=2, padding=2), (1, 4, 12, 12)),  # dilated
        (dict(in_channels=3, out_channels=4, kernel_size=(1, 5), stride=(2, 1), padding=(0, 2)), (1, 3, 9, 13)),
        (dict(in_channels=5, out_channels=7, kernel_size=(3, 2), bias=False), (2, 5, 6, 10)),  # non-square
    ],
)
def test_conv2d_macs_match_hand_formula(kwargs: dict, shape: tuple[int, ...]) -> None:
    conv = nn.Conv2d(**kwargs)
    model = nn.Sequential(conv)
    out = conv(torch.randn(shape))
    c = count_complexity(model, shape)
    row = c.by_name()["0"]
    assert (row.type, row.params, row.macs, row.adds) == ("Conv2d", n_params(conv), conv_macs(conv, out), 0)
    assert c.macs == row.macs  # the bias is not counted
    assert c.params == n_params(conv)
    assert c.input_shape == shape


def test_linear_macs_are_batch_in_out() -> None:
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 7, bias=False))
    c = count_complexity(model, (4, 20))
    assert c.by_name()["0"].macs == 4 * 20 * 30
    assert c.by_name()["2"].macs == 4 * 30 * 7
    assert c.by_name()["0"].params == 20 * 30 + 30
    assert "1" not in c.by_name()  # ReLU: no parameters, no MACs
    # Leading dimensions multiply like the batch.
    assert count_complexity(nn.Linear(8, 3), (2, 5, 8)).macs == 2 * 5 * 8 * 3


def test_batchnorm_has_params_but_no_macs() -> None:
    c = count_complexity(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)), (1, 3, 5, 5))
    assert c.by_name()["1"] == LayerComplexity("1", "BatchNorm2d", 8, 0, 0)
    assert c.params == 12 + 8
    assert c.macs == 25 * 4 * 3


# ---------------------------------------------------------------------------------------------- cheap modules


@pytest.mark.parametrize(
    "out_channels, ratio, dw_size, stride",
    [(16, 2, 3, 1), (7, 2, 3, 2), (7, 3, 5, 1), (10, 4, 1, 2)],  # 7/2, 7/3, 10/4: cat-then-slice waste
)
def test_ghost_conv_is_primary_plus_cheap_depthwise(out_channels: int, ratio: int, dw_size: int, stride: int) -> None:
    c_in, k, shape = 5, 3, (2, 5, 9, 11)
    ghost = GhostConv2d(c_in, out_channels, k, stride=stride, padding=1, ratio=ratio, dw_size=dw_size)
    h_out, w_out = ghost(torch.randn(shape)).shape[2:]
    m = math.ceil(out_channels / ratio)
    positions = shape[0] * h_out * w_out
    primary = positions * m * c_in * k * k
    cheap = positions * m * (ratio - 1) * dw_size * dw_size  # all m·(s-1) ghosts, even those sliced away
    c = count_complexity(nn.Sequential(ghost), shape)
    assert [(r.name, r.type) for r in c.rows] == [("0", "GhostConv2d")]  # children folded in
    assert c.rows[0].macs == primary + cheap == c.macs
    assert c.rows[0].params == c_in * m * k * k + m * (ratio - 1) * dw_size * dw_size


def test_ghost_conv_with_norm_and_activation_is_one_row() -> None:
    ghost = GhostConv2d(8, 16, 1, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU)
    c = count_complexity(nn.Sequential(ghost, nn.Conv2d(16, 4, 1)), (1, 8, 6, 6))
    assert [r.name for r in c.rows] == ["0", "1"]
    assert c.rows[0].params == n_params(ghost)  # BN parameters folded in
    assert c.rows[0].macs == 36 * (8 * 8 + 8 * 9)  # BN and ReLU not counted


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(hidden_channels=4, hidden_kernel_size=2, padding=1), (2, 8, 9, 9)),
        (dict(hidden_channels=8, hidden_kernel_size=(2, 1), stride=2, padding=(1, 0)), (1, 8, 10, 7)),
        (dict(hidden_channels=2, hidden_kernel_size=2, groups=2, padding=1, dilation=2), (1, 8, 12, 12)),
    ],
)
def test_structured_conv_macs_and_pool_adds(kwargs: dict, shape: tuple[int, ...]) -> None:
    layer = StructuredConv2d(8, 6, 3, **kwargs)
    out = layer(torch.randn(shape))
    n_h, n_w = layer.hidden_kernel_size
    c = count_complexity(nn.Sequential(layer), shape)
    row = c.by_name()["0"]
    assert row.type == "StructuredConv2d"
    assert row.macs == out.numel() * layer.hidden_channels * n_h * n_w == c.macs
    assert row.adds == layer.pooling_additions(shape) == c.adds > 0
    assert row.params == n_params(layer)


def test_structured_linear_macs_and_pool_adds() -> None:
    layer = StructuredLinear(32, 10, hidden_features=12)
    c = count_complexity(nn.Sequential(nn.Flatten(), layer), (3, 2, 16))
    row = c.by_name()["1"]
    assert row.macs == 3 * 12 * 10
    assert row.adds == layer.pooling_additions((3, 32)) > 0


def test_every_structure_record_module_is_one_row() -> None:
    model = nn.Sequential(
        DepthwiseSeparableConv2d(4, 8, 3, padding=1),
        SqueezeExcite(8, se_ratio=0.25),
        nn.Conv2d(8, 8, 1),
    )
    c = count_complexity(model, (1, 4, 6, 6))
    assert [(r.name, r.type) for r in c.rows] == [
        ("0", "DepthwiseSeparableConv2d"),
        ("1", "SqueezeExcite"),
        ("2", "Conv2d"),
    ]
    assert c.rows[0].macs == 36 * 4 * 9 + 36 * 4 * 8
    assert c.rows[1].macs == 8 * 2 + 2 * 8  # the 1x1 convs on the pooled 1x1 map
    assert sum(r.params for r in c.rows) == c.params == n_params(model)


def test_leaf_types_fold_more_modules() -> None:
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model = nn.Sequential(block, nn.Conv2d(4, 2, 1))
    c = count_complexity(model, (1, 3, 8, 8), leaf_types=(nn.Sequential,))
    assert [(r.name, r.type) for r in c.rows] == [("", "Sequential")]  # the root itself is a Sequential
    c = count_complexity(model, (1, 3, 8, 8), leaf_types=(nn.BatchNorm2d,))
    assert [r.name for r in c.rows] == ["0.0", "0.1", "1"]


# ---------------------------------------------------------------------------------------------- whole models


def test_resnet18_reference_counts_and_counter_breakdown() -> None:
    model = torchvision.models.resnet18()
    c = count_complexity(model, (1, 3, 224, 224))
    assert c.params == 11_689_512
    assert c.macs == pytest.approx(1.814e9, rel=0.005)
    assert c.by_name()["layer1.0.conv1"].macs == 56 * 56 * 64 * 64 * 9
    assert c.by_name()["fc"].macs == 512 * 1000
    assert sum(r.params for r in c.rows) == c.params
    assert sum(r.macs for r in c.rows) == c.macs
    # The counter's own per-module breakdown agrees; its keys are "<root class name>.<qualified name>".
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, 224, 224))
    flops = counter.get_flop_counts()
    assert sum(flops["Global"].values()) == 2 * c.macs
    for row in c.rows:
        if row.type in ("Conv2d", "Linear"):
            assert sum(flops[f"ResNet.{row.name}"].values()) == 2 * row.macs, row.name


def _ghost_everything_but_first_conv(model: nn.Module) -> nn.Module:
    convs = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    convs = [entry for entry in convs if type(entry[2]) is nn.Conv2d][1:]
    for parent, name, conv in convs:
        ghost = GhostConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
        setattr(parent, name, ghost)
    return model


@pytest.fixture(scope="module")
def resnet56_counts() -> tuple[Complexity, Complexity]:
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    dense = count_complexity(resnet56(), shape)
    ghost = count_complexity(_ghost_everything_but_first_conv(resnet56()), shape)
    return dense, ghost


def test_cifar_resnet56_and_ghost_match_references(resnet56_counts: tuple[Complexity, Complexity]) -> None:
    dense, ghost = resnet56_counts  # REFERENCES.md, "Counts checked on this machine"
    assert dense.params == 853_018
    assert dense.macs == pytest.approx(125.5e6, rel=0.001)
    assert ghost.params == 438_154
    assert ghost.macs == pytest.approx(65.3e6, rel=0.001)
    assert ghost.by_name()["layer1.0.conv1"].type == "GhostConv2d"
    assert "layer1.0.conv1.primary_conv" not in ghost.by_name()


def test_shared_module_counted_once() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.block = nn.Sequential(self.conv, nn.ReLU())  # the same conv under a second name
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.block(self.conv(x))
            return self.head(x.mean((2, 3)))

    model = Shared()
    c = count_complexity(model, (2, 4, 5, 5))
    one_call = 2 * 4 * 25 * 4 * 9
    assert [r.name for r in c.rows] == ["conv", "head"]  # one row, under its first name
    assert c.by_name()["conv"].params == 144
    assert c.by_name()["conv"].macs == 2 * one_call  # both calls
    assert c.params == 144 + 10 == n_params(model)
    assert c.macs == 2 * one_call + 2 * 4 * 2


def test_functional_macs_of_a_container_get_its_own_row() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Parameter(torch.randn(6, 3))
            self.body = nn.Linear(5, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) @ self.proj

    c = count_complexity(nn.Sequential(Head()), (4, 5))
    assert c.by_name()["0"] == LayerComplexity("0", "Head", 18, 4 * 6 * 3, 0)
    assert c.by_name()["0.body"].macs == 4 * 5 * 6
    assert c.macs == sum(r.macs for r in c.rows)


def test_counting_leaves_modes_state_and_rng_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    model.train()
    model[4].eval()  # a frozen BN inside a training model
    model(torch.randn(2, 3, 8, 8))  # non-trivial running statistics
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    count_complexity(model, (2, 3, 8, 8))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    count_complexity(model, (2, 3, 8, 8))
    assert not any(m.training for m in model.modules())


def test_errors_in_forward_propagate_and_leave_no_hooks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 2))  # Linear gets the wrong width
    model.train()
    with pytest.raises(RuntimeError):
        count_complexity(model, (1, 3, 8, 8))
    assert model.training and model[0].training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_example_input_and_argument_errors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).double()
    c = count_complexity(model, example_input=torch.randn(1, 3, 6, 6))  # cast to the model's dtype
    assert c.input_shape == (1, 3, 6, 6)
    assert c.macs == 16 * 4 * 27
    with pytest.raises(ValueError, match="exactly one"):
        count_complexity(model)
    with pytest.raises(ValueError, match="exactly one"):
        count_complexity(model, (1, 3, 6, 6), example_input=torch.randn(1, 3, 6, 6))

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    c = count_complexity(TwoInputs(), example_input=(torch.randn(4, 3), torch.randn(4, 5)))
    assert c.macs == 4 * 3 * 2 + 4 * 5 * 2
    assert c.input_shape == (4, 3)


def test_meta_device_model_is_counted_without_memory() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Linear(56, 10))
    c = count_complexity(model, (8, 64, 56, 56))
    assert c.macs == 8 * 64 * 56 * 56 * 64 * 9 + 8 * 64 * 56 * 56 * 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_counts_on_cuda_match_cpu() -> None:
    model = torchvision.models.resnet18()
    cpu = count_complexity(model, (1, 3, 64, 64))
    gpu = count_complexity(model.cuda(), (1, 3, 64, 64))
    assert gpu.rows == cpu.rows and gpu.macs == cpu.macs


def test_to_dict_is_json_and_str_is_short() -> None:
    c = count_complexity(nn.Sequential(StructuredConv2d(4, 4, 3, padding=1, hidden_channels=2)), (1, 4, 8, 8))
    d = json.loads(json.dumps(c.to_dict()))
    assert d["params"] == c.params and d["macs"] == c.macs and d["adds"] == c.adds > 0
    assert d["input_shape"] == [1, 4, 8, 8]
    assert d["rows"][0] == {"name": "0", "type": "StructuredConv2d", "params": c.params, "macs": c.macs, "adds": c.adds}
    text = str(c)
    assert "params" in text and "MACs" in text and "1x4x8x8" in text and "\n" not in text


# ---------------------------------------------------------------------------------------------- ratios, report


def test_compression_ratios_arithmetic() -> None:
    before = Complexity([], params=1000, macs=8000, adds=0, input_shape=(1, 3, 8, 8))
    after = Complexity([], params=400, macs=2000, adds=500)
    r = compression_ratios(before, after)
    assert r["params_ratio"] == 2.5
    assert r["macs_ratio"] == 4.0
    assert r["ops_ratio"] == 8000 / 2500
    assert (r["params_before"], r["params_after"], r["macs_before"], r["macs_after"]) == (1000, 400, 8000, 2000)
    assert (r["adds_before"], r["adds_after"]) == (0, 500)
    assert compression_ratios(before, before)["macs_ratio"] == 1.0
    empty = Complexity([], params=0, macs=0)
    assert math.isinf(compression_ratios(before, empty)["params_ratio"])
    assert math.isnan(compression_ratios(empty, empty)["macs_ratio"])


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0"),
        (512, "512"),
        (1234, "1.23K"),
        (11_689_512, "11.7M"),
        (125_485_696, "125M"),
        (1_814_073_344, "1.81G"),
        (999_999, "1.00M"),
        (-2_500_000, "-2.50M"),
        (2.5, "2.5"),
    ],
)
def test_format_count(n: float, text: str) -> None:
    assert format_count(n) == text


def _record() -> Console:
    return Console(record=True, width=200)


def test_report_renders_layers_totals_and_convention(resnet56_counts: tuple[Complexity, Complexity]) -> None:
    dense, ghost = resnet56_counts
    console = _record()
    table = compression_report(dense, ghost, title="Ghost-ResNet-56", console=console)
    text = console.export_text()
    assert table.row_count == len(dense.rows) + 1
    assert "Ghost-ResNet-56" in text
    assert "layer1.0.conv1" in text and "layer3.8.conv2" in text
    assert "Conv2d → GhostConv2d" in text
    assert "ratio = original / compressed" in text
    total = next(line for line in text.splitlines() if "total" in line)
    ratios = compression_ratios(dense, ghost)
    for value in (
        format_count(dense.params),
        format_count(ghost.params),
        format_count(dense.macs),
        format_count(ghost.macs),
        f"{ratios['params_ratio']:.2f}×",
        f"{ratios['macs_ratio']:.2f}×",
    ):
        assert value in total


def test_report_rows_on_one_side_max_rows_and_no_print() -> None:
    before = Complexity(
        [LayerComplexity("conv1", "Conv2d", 100, 1000), LayerComplexity("fc", "Linear", 50, 50)], 150, 1050
    )
    after = Complexity(
        [
            LayerComplexity("conv1.0", "StructuredConv2d", 40, 300, 77),
            LayerComplexity("conv1.1", "BatchNorm2d", 8, 0),
            LayerComplexity("fc", "Linear", 50, 50),
        ],
        98,
        350,
        77,
    )
    console = _record()
    compression_report(before, after, console=console)
    text = console.export_text()
    lines = text.splitlines()
    names = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert names == ["conv1", "conv1.0", "conv1.1", "fc", "total"]
    conv1 = next(line for line in lines if "│ conv1 " in line)
    assert conv1.count("—") == 5  # after-side counts and both ratios
    assert "(MACs + adds) ratio" in text

    console = _record()
    compression_report(before, after, console=console, max_rows=1)
    text = console.export_text()
    assert "3 more layers" in text and "fc" not in text and "total" in text

    console = _record()
    table = compression_report(before, after, console=console, per_layer=False, print_table=False)
    assert console.export_text() == ""
    assert table.row_count == 1


# ---------------------------------------------------------------------------------------------- groups, by hand


def test_grouped_and_depthwise_layers_count_by_hand() -> None:
    """MACs = out_channels · (in_channels / groups) · k_h · k_w · H_out · W_out · batch, written out: a count that
    ignored ``groups`` would make every grouped row ``groups`` times larger."""
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False),  # grouped, out 10x10
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise
        nn.Conv2d(16, 32, 5, stride=2, padding=2, groups=16, bias=False),  # depth multiplier 2, out 5x5
        StructuredConv2d(32, 32, 3, padding=1, groups=4, bias=False, hidden_channels=4, hidden_kernel_size=2),
        StructuredConv2d(32, 32, 3, padding=1, groups=32, bias=False, hidden_channels=1, hidden_kernel_size=2),
        DepthwiseSeparableConv2d(32, 8, 3, padding=1, bias=False),
        GhostConv2d(8, 12, 1, ratio=3, dw_size=3),  # m = 4 intrinsic maps; 8 ghosts from a depthwise 3x3 conv
    )
    c = count_complexity(model, (2, 8, 10, 10))
    by_name = {r.name: (r.params, r.macs) for r in c.rows}
    assert by_name == {
        "0": (16 * 2 * 9, 16 * 2 * 9 * 100 * 2),
        "1": (16 * 1 * 9, 16 * 1 * 9 * 100 * 2),
        "2": (32 * 1 * 25, 32 * 1 * 25 * 25 * 2),
        "3": (32 * 4 * 4, 32 * 4 * 4 * 25 * 2),  # per group: C = 8 -> c = 4, 3x3 -> 2x2
        "4": (32 * 1 * 4, 32 * 1 * 4 * 25 * 2),  # C = 1: spatial structure only
        "5": (32 * 9 + 8 * 32, (32 * 1 * 9 + 8 * 32) * 25 * 2),
        "6": (4 * 8 + 8 * 9, (4 * 8 + 8 * 1 * 9) * 25 * 2),
    }
    assert c.macs == sum(macs for _, macs in by_name.values())


def test_decompose_structured_counts_grouped_layers_per_group() -> None:
    """The per-position multiplications a conversion reports, and the counted MACs after it, for grouped and
    depthwise 3x3 convs at c = C/2 per group (C = 4 -> 2; C = 1 stays 1) and n = 2."""
    from lightning_cheapconv.convert import decompose_structured

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # the stem: kept
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 10, 1),  # the last layer: kept
    )
    result = decompose_structured(model, channel_ratio=0.5)
    per_position = {c.name: (c.macs_per_position_before, c.macs_per_position_after) for c in result.changes}
    assert per_position == {"1": (16 * 4 * 9, 16 * 2 * 4), "2": (16 * 1 * 9, 16 * 1 * 4)}
    assert result.layer_macs_ratio == pytest.approx((576 + 144) / (128 + 64))
    rows = count_complexity(model, (1, 3, 6, 6)).by_name()
    assert [rows[n].macs for n in ("1", "2")] == [16 * 2 * 4 * 36, 16 * 1 * 4 * 36]
    assert [rows[n].params for n in ("1", "2")] == [16 * 2 * 4 + 16, 16 * 1 * 4 + 16]  # with the biases


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: count_complexity("resnet18", (1, 3, 8, 8)), "count_complexity: model must be a Module, got str"),
        (lambda m: count_complexity(m, (1, 3, 8.0, 8)), r"input_shape\[2\]=8.0 is not an int; valid range is >= 1"),
        (lambda m: count_complexity(m, (1, 3, 0, 8)), r"input_shape\[2\]=0 is out of range"),
        (lambda m: count_complexity(m, ()), r"input_shape=\(\) is not valid; valid values are non-empty sequences"),
        (lambda m: count_complexity(m, 224), "input_shape=224 is not valid"),
        (
            lambda m: count_complexity(m, example_input=3.0),
            "example_input must be a tensor, a sequence of positional inputs or a ModelCall",
        ),
        (lambda m: count_complexity(m, (1, 3, 8, 8), leaf_types=("Conv2d",)), "leaf_types=.*must be module classes"),
        (lambda m: format_count(1234, digits=0), "format_count: digits=0 is out of range; valid range is >= 1"),
        (lambda m: format_count("1234"), "format_count: n='1234' is not a number"),
        (lambda m: compression_ratios(None, None), "compression_ratios: before must be a Complexity, got NoneType"),
    ],
)
def test_argument_errors_name_argument_value_and_range(call, match) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=match):
        call(model)
