"""StructuredConv2d / StructuredLinear (lightning_cheapconv/nn/structured.py) and the sum-pool helpers."""

from __future__ import annotations

import copy
import io
import json
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_cheapconv.nn import StructuredConv2d, StructuredLinear, build_from_record
from lightning_cheapconv.nn.functional import window_sum, window_sum_additions, window_sum_cumsum
from lightning_cheapconv.nn.record import decode_record, records_equal
from lightning_cheapconv.nn.structured import POOLINGS
from lightning_cheapconv.structure import StructureSpec, project

# nn.Conv2d's own 'same' path with even kernels warns about a padded copy; that is the reference, not us.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


@dataclass
class ConvCase:
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: str | int | tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    padding_mode: str
    hidden_channels: int
    hidden_kernel: tuple[int, int]
    input_shape: tuple[int, int, int, int]

    def dense(self, dtype: torch.dtype = torch.float64) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
            dtype=dtype,
        )

    @property
    def spec(self) -> StructureSpec:
        return StructureSpec(self.hidden_channels, self.hidden_kernel)


@st.composite
def conv_cases(draw) -> ConvCase:
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "depthwise":
        groups = draw(st.integers(1, 4))
        per_group, out_channels = 1, groups * draw(st.integers(1, 2))
    else:
        groups = 1 if kind == "dense" else draw(st.integers(2, 3))
        per_group = draw(st.integers(1, 5))
        out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([(1, 1), (1, 3), (3, 1), (2, 2), (3, 3), (5, 3), (2, 4), (4, 4)]))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1, 1)
        padding: str | int | tuple[int, int] = "same"
        pads = tuple(d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        if padding_kind == "int":
            padding = draw(st.integers(0, 2))
            pads = (padding, padding)
        elif padding_kind == "tuple":
            padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
            pads = padding
        else:
            padding, pads = "valid", (0, 0)
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    # The input must hold the dilated kernel, and reflect padding needs pad < size.
    sizes = []
    for axis in range(2):
        reach = dilation[axis] * (kernel[axis] - 1) + 1
        low = max(reach - min(pads[axis], reach - 1), pads[axis] + 1, 1)
        sizes.append(draw(st.integers(low, low + 5)))
    hidden_channels = draw(st.integers(1, per_group))
    hidden_kernel = (draw(st.integers(1, kernel[0])), draw(st.integers(1, kernel[1])))
    return ConvCase(
        in_channels=per_group * groups,
        out_channels=out_channels,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
        hidden_channels=hidden_channels,
        hidden_kernel=hidden_kernel,
        input_shape=(draw(st.integers(1, 2)), per_group * groups, *sizes),
    )


def _reference(conv: nn.Conv2d, spec: StructureSpec, x: torch.Tensor) -> torch.Tensor:
    """What the dense conv computes with its weight replaced by the projected (structured) kernel."""
    with torch.no_grad():
        return conv._conv_forward(x, project(conv.weight, spec), conv.bias)


def _assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected.double()).abs().max()
    assert error <= rel * scale, f"max error {error:.3e} > {rel:.0e} x scale {scale:.3e}"


def _check_case(case: ConvCase, seed: int, pooling: str = "auto") -> None:
    torch.manual_seed(seed)
    conv32 = case.dense(torch.float32)
    conv64 = copy.deepcopy(conv32).double()
    x32 = torch.randn(case.input_shape)
    x64 = x32.double()
    spec = case.spec

    # float64: exact up to rounding.
    layer64 = StructuredConv2d.from_dense(conv64, case.hidden_channels, case.hidden_kernel, pooling=pooling)
    assert layer64.pooling == pooling
    assert layer64.weight.shape == (case.out_channels, case.hidden_channels, *case.hidden_kernel)
    expected = _reference(conv64, spec, x64)
    with torch.no_grad():
        got = layer64(x64)
    assert got.shape == conv64(x64).shape
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)

    # float32 against the float64 reference.
    layer32 = StructuredConv2d.from_dense(conv32, case.hidden_channels, case.hidden_kernel, pooling=pooling)
    assert layer32.weight.dtype == torch.float32
    with torch.no_grad():
        _assert_relative_close(layer32(x32), expected, 1e-5)

    # Folding back: same output, and decomposing the folded conv gives the same alpha.
    dense = layer64.to_dense()
    assert isinstance(dense, nn.Conv2d)
    assert (dense.stride, dense.padding, dense.dilation, dense.groups, dense.padding_mode) == (
        conv64.stride,
        conv64.padding,
        conv64.dilation,
        conv64.groups,
        conv64.padding_mode,
    )
    torch.testing.assert_close(dense.weight, project(conv64.weight, spec).detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer64.dense_weight(), dense.weight, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(dense(x64), got, atol=1e-9, rtol=1e-9)
    again = StructuredConv2d.from_dense(dense, case.hidden_channels, case.hidden_kernel)
    torch.testing.assert_close(again.weight, layer64.weight, atol=1e-9, rtol=1e-9)
    if case.bias:
        torch.testing.assert_close(again.bias, conv64.bias)


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16), pooling=st.sampled_from(POOLINGS))
def test_structured_conv_equals_projected_dense(case, seed, pooling):
    _check_case(case, seed, pooling)


# Cases the property test may or may not draw, pinned so they always run.
PINNED = [
    # 1x1 kernel: channel pooling only.
    ConvCase(6, 4, (1, 1), (1, 1), 0, (1, 1), 1, True, "zeros", 3, (1, 1), (2, 6, 5, 5)),
    # depthwise (C = 1 per group): spatial pooling only, strided, reflect padding.
    ConvCase(4, 4, (3, 3), (2, 2), 1, (1, 1), 4, False, "reflect", 1, (2, 2), (1, 4, 7, 6)),
    # non-square kernel, 'same' with dilation (asymmetric padding), circular.
    ConvCase(3, 2, (5, 3), (1, 1), "same", (2, 1), 1, True, "circular", 2, (3, 2), (1, 3, 9, 8)),
    ConvCase(3, 2, (2, 4), (1, 1), "same", (1, 2), 1, False, "zeros", 3, (1, 3), (2, 3, 6, 9)),
    # grouped, replicate, tuple padding and stride.
    ConvCase(6, 4, (3, 3), (3, 2), (2, 1), (1, 1), 2, True, "replicate", 2, (2, 1), (1, 6, 8, 7)),
    # hidden sizes equal to the dense sizes: no pooling at all, plain padding path.
    ConvCase(3, 5, (3, 3), (1, 1), 1, (1, 1), 1, True, "zeros", 3, (3, 3), (1, 3, 5, 5)),
    # hidden sizes all 1: one box covering the whole kernel.
    ConvCase(4, 2, (3, 3), (1, 1), "valid", (2, 2), 1, False, "zeros", 1, (1, 1), (1, 4, 7, 7)),
]


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("case", PINNED, ids=lambda c: f"{c.kernel}-g{c.groups}-{c.padding_mode}-{c.padding}")
def test_structured_conv_pinned_cases(case, pooling):
    _check_case(case, seed=7, pooling=pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_default_hidden_sizes_and_gradients(pooling):
    conv = nn.Conv2d(3, 2, 3, padding=1, dtype=torch.float64)
    layer = StructuredConv2d.from_dense(conv, pooling=pooling)
    assert layer.hidden_channels == 3 and layer.hidden_kernel_size == (2, 2)
    assert layer.windows == (1, 2, 2)
    assert StructuredConv2d(4, 6, 1).hidden_kernel_size == (1, 1)
    assert StructuredConv2d(4, 6, 3, hidden_channels=2).windows == (3, 2, 2)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradcheck(
        StructuredConv2d(4, 2, 3, padding=1, hidden_channels=2, pooling=pooling).double(),
        (torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True),),
    )
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_input_on_cpu(channels_last, dtype, pooling):
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    layer = StructuredConv2d.from_dense(conv, hidden_channels=4, hidden_kernel_size=2, pooling=pooling)
    x = torch.randn(2, 8, 9, 9)
    expected = _reference(conv.double(), layer.spec, x.double())
    half = layer.to(dtype)
    xh = x.to(dtype)
    if channels_last:
        half, xh = half.to(memory_format=torch.channels_last), xh.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = half(xh)
    assert out.dtype == dtype and out.shape == expected.shape
    # Rounding of the inputs, weights and the pooled map (and, for the average pools, of weight · volume): a few
    # units of the dtype's eps relative to the output's scale; bfloat16's eps is 2**-7, float16's 2**-10.
    _assert_relative_close(out, expected, 4 * torch.finfo(dtype).eps)


def test_bfloat16_linear_on_cpu():
    torch.manual_seed(8)
    fc = nn.Linear(12, 5)
    linear = StructuredLinear.from_dense(fc, hidden_features=5).to(torch.bfloat16)
    xl = torch.randn(3, 12)
    with torch.no_grad():
        out = linear(xl.to(torch.bfloat16))
        expected = F.linear(xl.double(), project(fc.weight.double(), StructureSpec(5)), fc.bias.double())
    assert out.dtype == torch.bfloat16
    _assert_relative_close(out, expected, 3e-2)


# --- sum-pool operator forms ---------------------------------------------------------------------------------------

# Channel window with groups, a dilated spatial window (shifted adds in every form), asymmetric 'same' padding, a
# padding too wide for the pool's own, a padding mode, a 1x1 (channel window only), and no channel window.
FORM_CASES = [
    ConvCase(6, 4, (3, 3), (2, 1), 1, (1, 1), 2, True, "zeros", 2, (2, 2), (2, 6, 7, 8)),
    ConvCase(4, 4, (3, 3), (1, 1), "same", (2, 1), 1, False, "zeros", 2, (2, 1), (1, 4, 8, 7)),
    ConvCase(3, 2, (2, 4), (1, 1), "same", (1, 1), 1, True, "zeros", 2, (1, 2), (2, 3, 6, 9)),
    ConvCase(4, 4, (5, 5), (1, 1), 2, (1, 1), 1, True, "zeros", 4, (4, 4), (1, 4, 7, 7)),
    ConvCase(4, 6, (3, 3), (1, 1), 1, (1, 1), 1, True, "reflect", 3, (1, 2), (1, 4, 6, 6)),
    ConvCase(6, 4, (1, 1), (1, 1), 0, (1, 1), 1, True, "zeros", 2, (1, 1), (2, 6, 5, 5)),
    ConvCase(4, 4, (3, 3), (1, 1), 1, (1, 1), 1, True, "zeros", 4, (2, 2), (2, 4, 6, 6)),
]


def _layer(case: ConvCase, pooling: str) -> StructuredConv2d:
    torch.manual_seed(3)
    return StructuredConv2d.from_dense(
        case.dense(torch.float64), case.hidden_channels, case.hidden_kernel, pooling=pooling
    )


@pytest.mark.parametrize("case", FORM_CASES, ids=lambda c: f"{c.kernel}-d{c.dilation}-{c.padding}-{c.padding_mode}")
def test_pooling_forms_agree_with_gradients(case):
    """Every form: the same output, pool, input gradient and weight gradient as the shifted adds, in train mode."""
    torch.manual_seed(4)
    x = torch.randn(case.input_shape, dtype=torch.float64)
    results = {}
    for pooling in POOLINGS:
        layer = _layer(case, pooling).train()
        xg = x.clone().requires_grad_(True)
        out = layer(xg)
        out.backward(torch.ones_like(out) + out.detach())
        results[pooling] = (out.detach(), layer.pool(x).detach(), xg.grad, layer.weight.grad)
    for pooling, values in results.items():
        for got, expected in zip(values, results["adds"], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10, msg=f"pooling={pooling}")


def _onnx_ops(module: nn.Module, x: torch.Tensor) -> Counter:
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    return Counter(node.op_type for node in program.model_proto.graph.node)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("hidden_channels", [8, 4])
def test_auto_exports_average_pools_not_slice_chains(hidden_channels):
    pytest.importorskip("onnxscript")
    layer = StructuredConv2d(8, 8, 3, padding=1, hidden_channels=hidden_channels).eval()
    x = torch.randn(1, 8, 6, 6)
    adds = _onnx_ops(StructuredConv2d(**{**layer.config(), "pooling": "adds"}).eval(), x)
    auto = _onnx_ops(layer, x)
    assert adds["Slice"] >= 4 and adds["AveragePool"] == 0
    assert auto["AveragePool"] == 1 and auto["Add"] == 0
    if hidden_channels == 8:  # no channel window: one AveragePool with its own padding, then the conv
        assert set(auto) <= {"AveragePool", "Conv", "Mul"}
    else:  # the channel window as one cumulative-sum difference
        assert auto["CumSum"] == 1 and auto["Slice"] == 2 and auto["Pad"] == 1
    assert _onnx_ops(StructuredConv2d(**{**layer.config(), "pooling": "avg_pool"}).eval(), x)["AveragePool"] == 1


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_auto_picks_by_context(monkeypatch):
    layer = StructuredConv2d(8, 8, 3, padding=1, hidden_channels=4).eval()
    x = torch.randn(1, 8, 6, 6)
    assert layer.active_pooling() == "adds"  # eager
    traced = torch.jit.trace(layer, x)
    nodes = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::cumsum" in nodes and "aten::avg_pool2d" in nodes
    torch.testing.assert_close(traced(x), layer(x))
    exported = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert any("cumsum" in t for t in targets) and any("avg_pool2d" in t for t in targets)
    # torch.compile (compiling, not exporting) keeps the shifted adds.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert layer.active_pooling() == "adds"
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert layer.active_pooling() == "cumsum"
    for pooling in POOLINGS[1:]:
        layer.set_pooling(pooling)
        assert layer.active_pooling() == pooling


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("pooling", POOLINGS)
def test_torchscript_runs_every_form(pooling):
    layer = StructuredConv2d(6, 4, 3, padding=1, dilation=(1, 2), groups=2, hidden_channels=2, pooling=pooling).eval()
    x = torch.randn(2, 6, 7, 8)
    for _ in range(2):  # scripting the same class twice in one process
        scripted = torch.jit.script(layer)
        torch.testing.assert_close(scripted(x), layer(x))
    # auto runs the exported form when scripted
    assert scripted.active_pooling() == ("cumsum" if pooling == "auto" else pooling)


@pytest.mark.parametrize("pooling", ["sum", None, "AUTO"])
def test_bad_pooling_is_a_clear_error(pooling):
    match = r"StructuredConv2d: pooling=.* is not valid; valid values are 'auto', 'adds', 'avg_pool' and 'cumsum'"
    with pytest.raises(ValueError, match=match):
        StructuredConv2d(4, 4, 3, pooling=pooling)
    with pytest.raises(ValueError, match=match):
        StructuredConv2d.from_dense(nn.Conv2d(4, 4, 3), pooling=pooling)


def test_set_pooling_validates_and_keeps_weights():
    layer = StructuredConv2d(4, 4, 3, padding=1, hidden_channels=2, pooling="avg_pool")
    weights = {k: v.clone() for k, v in layer.named_parameters()}
    record = layer.structure_record()
    with pytest.raises(ValueError, match="pooling='fast' is not valid"):
        layer.set_pooling("fast")
    assert layer.pooling == "avg_pool" and layer.structure_record() == record
    layer.set_pooling("adds")
    assert layer.pooling == "adds" and layer.config()["pooling"] == "adds"
    assert all(torch.equal(p, weights[k]) for k, p in layer.named_parameters())
    assert "pooling='adds'" in repr(layer) and "pooling" not in repr(StructuredConv2d(4, 4, 3))


def test_pooling_survives_records_and_from_dense():
    layer = StructuredConv2d.from_dense(nn.Conv2d(4, 4, 3), hidden_channels=2, pooling="cumsum")
    assert layer.pooling == "cumsum"
    record = layer.structure_record()
    assert record["version"] == 2 and record["pooling"] == "cumsum"
    assert build_from_record(json.loads(json.dumps(record))).pooling == "cumsum"
    assert StructuredConv2d(**layer.config()).config() == layer.config()  # the constructor takes config() back
    assert StructuredConv2d.record_defaults == {"pooling": "auto"}


# --- StructuredLinear ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 5),
    data=st.data(),
    bias=st.booleans(),
    lead=st.sampled_from([(3,), (2, 3), ()]),
    seed=st.integers(0, 2**16),
)
def test_structured_linear_equals_projected_dense(in_features, out_features, data, bias, lead, seed):
    hidden = data.draw(st.integers(1, in_features), label="hidden_features")
    torch.manual_seed(seed)
    fc32 = nn.Linear(in_features, out_features, bias=bias)
    fc64 = copy.deepcopy(fc32).double()
    x32 = torch.randn(*lead, in_features)
    spec = StructureSpec(hidden)
    with torch.no_grad():
        expected = F.linear(x32.double(), project(fc64.weight, spec), fc64.bias)

    layer64 = StructuredLinear.from_dense(fc64, hidden_features=hidden)
    assert layer64.weight.shape == (out_features, hidden)
    with torch.no_grad():
        got = layer64(x32.double())
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
        # float32 rounding scales with the products summed, not with the output (which may cancel to ~0)
        magnitude = F.linear(x32.double().abs(), project(fc64.weight, spec).abs()).abs().max().clamp_min(1e-30)
        error = (StructuredLinear.from_dense(fc32, hidden_features=hidden)(x32).double() - expected).abs().max()
        assert error <= 1e-5 * magnitude + (0 if fc64.bias is None else 1e-6 * fc64.bias.abs().max())

    dense = layer64.to_dense()
    assert isinstance(dense, nn.Linear) and (dense.bias is not None) == bias
    torch.testing.assert_close(dense.weight, layer64.dense_weight().detach())
    with torch.no_grad():
        torch.testing.assert_close(dense(x32.double()), got, atol=1e-9, rtol=1e-9)
    again = StructuredLinear.from_dense(dense, hidden_features=hidden)
    torch.testing.assert_close(again.weight, layer64.weight, atol=1e-9, rtol=1e-9)


# --- sum-pooling ----------------------------------------------------------------------------------------------------


def _naive_window_sum(x: torch.Tensor, dim: int, window: int, dilation: int) -> torch.Tensor:
    x = x.movedim(dim, 0)
    length = x.shape[0] - dilation * (window - 1)
    out = torch.stack([sum(x[u + dilation * t] for t in range(window)) for u in range(length)])
    return out.movedim(0, dim)


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 24),
    window=st.integers(1, 12),
    dilation=st.integers(1, 3),
    dim=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_window_sum_equals_naive_loop(length, window, dilation, dim, seed):
    shape = [3, 2, 4]
    shape[dim] = length
    # Small integers in float64: every sum is exact, so the comparison is exact.
    x = torch.randint(-50, 50, shape, generator=torch.Generator().manual_seed(seed)).double()
    if length - dilation * (window - 1) < 1:
        with pytest.raises(ValueError, match="does not fit"):
            window_sum(x, dim, window, dilation)
        return
    got = window_sum(x, dim, window, dilation)
    expected = _naive_window_sum(x, dim, window, dilation)
    assert torch.equal(got, expected)
    if dilation == 1:  # small integers: the prefix-sum differences are exact too
        assert torch.equal(window_sum_cumsum(x, dim - 3, window), expected)
    # ... and its addition count is what it really does.
    counted = _count_additions(lambda: window_sum(x, dim, window, dilation))
    others = x.numel() // length
    assert counted == window_sum_additions(length, window, dilation, others=others)


def test_window_sum_examples_and_errors():
    assert window_sum(torch.arange(5.0), dim=0, window=2).tolist() == [1.0, 3.0, 5.0, 7.0]
    assert window_sum(torch.arange(6.0), dim=0, window=3, dilation=2).tolist() == [6.0, 9.0]
    half = window_sum(torch.ones(4, dtype=torch.bfloat16), 0, 2)
    assert half.dtype == torch.float32  # accumulates in float32
    with pytest.raises(ValueError, match="window >= 1"):
        window_sum(torch.ones(3), 0, 0)
    with pytest.raises(ValueError, match="dilation >= 1"):
        window_sum(torch.ones(3), 0, 2, dilation=0)
    assert window_sum_cumsum(torch.arange(5.0), dim=0, window=2).tolist() == [1.0, 3.0, 5.0, 7.0]
    assert window_sum_cumsum(torch.ones(4, dtype=torch.float16), 0, 2).dtype == torch.float32
    with pytest.raises(ValueError, match="window >= 1"):
        window_sum_cumsum(torch.ones(3), 0, 0)
    with pytest.raises(ValueError, match="a window of 4 does not fit a dimension of size 3"):
        window_sum_cumsum(torch.ones(3), 0, 4)


class _AddCounter(TorchFunctionMode):
    """Counts the output elements of every tensor addition (one addition per element)."""

    def __init__(self) -> None:
        super().__init__()
        self.additions = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.add, torch.Tensor.__add__, torch.add, torch.Tensor.__radd__):
            self.additions += out.numel()
        return out


def _count_additions(fn) -> int:
    with _AddCounter() as counter:
        fn()
    return counter.additions


def test_window_sum_additions_hand_counts():
    # Window 1: nothing to add. Window 2: one add per output element (one shifted add).
    assert window_sum_additions(10, 1) == 0
    assert window_sum_additions(10, 2) == 9
    # Window 3 = 1 + 2: pairs x[u] + x[u+1] (9 adds), then x[u] + pair[u+1] for 8 outputs.
    assert window_sum_additions(10, 3) == 9 + 8
    # Window 4: pairs (9 adds), then pairs of pairs (7 adds), which are the output.
    assert window_sum_additions(10, 4) == 9 + 7
    # Dilation 2, window 2: x[u] + x[u+2] for 8 outputs; times 5 other positions.
    assert window_sum_additions(10, 2, dilation=2, others=5) == 8 * 5


@pytest.mark.parametrize(
    "layer,input_shape,hand",
    [
        # 1x2 kernel, n=(1,1): window 2 along W over width 5 -> 4 outputs, one add each.
        (StructuredConv2d(1, 3, (1, 2), hidden_kernel_size=1), (1, 1, 1, 5), 4),
        # 3x3 kernel, padding 1, n=2: windows (1, 2, 2) on a padded 7x8 map, 3 channels, batch 2.
        # H pass: 6 x 8 outputs; W pass: 6 x 7 outputs; one add each.
        (StructuredConv2d(3, 4, 3, padding=1, hidden_kernel_size=2), (2, 3, 5, 6), 2 * 3 * (6 * 8 + 6 * 7)),
        # 1x1 kernel, C=4, c=2: channel window 3 = pairs (3 adds) + one more add for 2 outputs, at 2x2 positions.
        (StructuredConv2d(4, 4, 1, hidden_channels=2), (1, 4, 2, 2), (3 + 2) * 4),
        # grouped 1x1, 2 groups of 3 channels, c=2: window 2 -> 2 adds per group and position.
        (StructuredConv2d(6, 2, 1, groups=2, hidden_channels=2), (1, 6, 3, 1), 2 * 2 * 3),
        # hidden size = dense size: no pooling, no adds.
        (StructuredConv2d(2, 2, 3, padding=1, hidden_kernel_size=3), (1, 2, 4, 4), 0),
    ],
)
def test_pooling_additions(layer, input_shape, hand):
    assert layer.pooling_additions(input_shape) == hand
    x = torch.randn(input_shape)
    assert _count_additions(lambda: layer.pool(x)) == hand


def test_linear_pooling_additions():
    layer = StructuredLinear(6, 2, bias=False, hidden_features=3)  # window 4: pairs (5 adds) + pairs of pairs (3)
    assert layer.pooling_additions((4, 6)) == 4 * (5 + 3)
    assert _count_additions(lambda: layer(torch.randn(4, 6))) == 4 * (5 + 3)
    assert StructuredLinear(6, 2).pooling_additions((4, 6)) == 0


@settings(max_examples=15, deadline=None)
@given(case=conv_cases())
def test_pooling_additions_match_counted(case):
    layer = StructuredConv2d(
        case.in_channels,
        case.out_channels,
        case.kernel,
        case.stride,
        case.padding,
        case.dilation,
        case.groups,
        case.bias,
        case.padding_mode,
        case.hidden_channels,
        case.hidden_kernel,
    )
    x = torch.randn(case.input_shape)
    assert _count_additions(lambda: layer.pool(x)) == layer.pooling_additions(case.input_shape)


# --- structure records ------------------------------------------------------------------------------------------


def test_state_dict_carries_structure_record():
    layer = StructuredConv2d(6, 4, (3, 1), stride=2, padding=(1, 0), groups=2, hidden_channels=2)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "_extra_state"}
    record = decode_record(state["_extra_state"])
    assert record["kind"] == "StructuredConv2d" and record["version"] == StructuredConv2d.record_version
    assert record["in_channels"] == 6 and record["out_channels"] == 4 and record["groups"] == 2
    assert tuple(record["kernel_size"]) == (3, 1) and tuple(record["stride"]) == (2, 2)
    assert tuple(record["padding"]) == (1, 0) and record["bias"] is True
    assert record["hidden_channels"] == 2 and tuple(record["hidden_kernel_size"]) == (2, 1)

    # Primitive values only: the checkpoint loads with weights_only=True.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert records_equal(decode_record(loaded["_extra_state"]), record)


@pytest.mark.parametrize(
    "make",
    [
        lambda: StructuredConv2d(4, 6, 3, padding="same", dilation=2, bias=False, padding_mode="reflect"),
        lambda: StructuredConv2d(6, 4, (3, 1), stride=2, padding=(1, 0), groups=2, hidden_channels=2),
        lambda: StructuredConv2d(4, 4, 3, groups=4, hidden_kernel_size=(1, 2)),
        lambda: StructuredConv2d(4, 4, 3, hidden_channels=2, pooling="cumsum"),
        lambda: StructuredLinear(10, 3, hidden_features=4),
        lambda: StructuredLinear(10, 3, bias=False),
    ],
)
@pytest.mark.parametrize("via_json", [False, True])
def test_build_from_record_rebuilds_identical_module(make, via_json):
    torch.manual_seed(9)
    layer = make()
    record = decode_record(layer.state_dict()["_extra_state"])
    if via_json:  # serializers may turn tuples into lists
        record = json.loads(json.dumps(record))
    rebuilt = build_from_record(record)
    assert type(rebuilt) is type(layer)
    assert rebuilt.config() == layer.config()
    rebuilt.load_state_dict(layer.state_dict())
    shape = (2, 10) if isinstance(layer, StructuredLinear) else (1, layer.in_channels, 7, 7)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), layer(x))


def test_mismatching_record_refuses_to_load():
    source = StructuredConv2d(4, 4, 3, stride=2, hidden_channels=2)
    target = StructuredConv2d(4, 4, 3, stride=1, hidden_channels=2)  # same weight shapes, other structure
    with pytest.raises(ValueError, match="restructure"):
        target.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="restructure"):
        target.set_extra_state(source.structure_record())
    with pytest.raises(ValueError, match="restructure"):
        target.set_extra_state("not a record")
    with pytest.raises(ValueError, match="restructure"):
        StructuredLinear(8, 2, hidden_features=4).set_extra_state(StructuredLinear(8, 2, hidden_features=5).config())
    target.set_extra_state(target.structure_record())  # its own record is fine


def test_build_from_record_errors():
    with pytest.raises(ValueError, match="expected a structure record"):
        build_from_record({"in_channels": 3})
    with pytest.raises(ValueError, match="unknown structure kind 'Nope'"):
        build_from_record({"kind": "Nope"})
    record = StructuredLinear(4, 2).structure_record()
    with pytest.raises(ValueError, match="newer than this library"):
        build_from_record({**record, "version": 99})


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: StructuredConv2d.from_dense(nn.Conv2d(4, 4, 3), hidden_channels=5), r"channels \(c\)=5.*1\.\.4"),
        (lambda: StructuredConv2d.from_dense(nn.Conv2d(4, 4, 3), hidden_kernel_size=4), r"n_h\)=4.*1\.\.3"),
        (lambda: StructuredConv2d.from_dense(nn.Conv2d(4, 4, (3, 1)), hidden_kernel_size=(2, 2)), r"n_w\)=2.*1\.\.1"),
        (lambda: StructuredConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), hidden_channels=3), r"\(c\)=3.*1\.\.2"),
        (lambda: StructuredConv2d(4, 4, 3, hidden_channels=0), r"channels \(c\)=0.*1\.\.4"),
        (lambda: StructuredConv2d(3, 4, 3, groups=2), "must both be divisible by groups=2"),
        (lambda: StructuredConv2d(4, 3, 3, groups=2), "must both be divisible by groups=2"),
        (lambda: StructuredConv2d(0, 4, 3), r"in_channels=0 is out of range; valid range is 1\.\."),
        (lambda: StructuredConv2d(4, 0, 3), "out_channels=0 is out of range"),
        (lambda: StructuredConv2d(4, 4, 3, groups=0), "groups=0 is out of range"),
        (lambda: StructuredConv2d(4, 4, 0), r"kernel_size=0 is out of range; each side must be in 1\.\."),
        (lambda: StructuredConv2d(4, 4, 3, padding_mode="mirror"), "padding_mode='mirror' is not valid; valid values"),
        (lambda: StructuredConv2d(4, 4, 3, stride=2, padding="same"), "padding='same' needs stride 1"),
        (
            lambda: StructuredConv2d(4, 4, (1, 2, 3)),
            r"kernel_size=\(1, 2, 3\) is not an int or a pair of ints; .*a pair of ints",
        ),
        (lambda: StructuredConv2d.from_dense(nn.Linear(4, 4)), "expects an initialized nn.Conv2d, got Linear"),
        (lambda: StructuredConv2d.from_dense(nn.LazyConv2d(4, 3)), "expects an initialized nn.Conv2d"),
        (lambda: StructuredLinear(4, 2, hidden_features=5), r"channels \(c\)=5.*1\.\.4"),
        (lambda: StructuredLinear(0, 2), "in_features=0 is out of range"),
        (lambda: StructuredLinear.from_dense(nn.Conv2d(4, 4, 1)), "expects an initialized nn.Linear, got Conv2d"),
    ],
)
def test_bad_input_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_extra_repr_shows_configuration():
    text = repr(StructuredConv2d(8, 4, 3, padding=1, groups=2, bias=False, hidden_channels=2))
    for part in ("8, 4", "kernel_size=(3, 3)", "padding=(1, 1)", "groups=2", "bias=False", "hidden_channels=2"):
        assert part in text
    assert "hidden_features=3" in repr(StructuredLinear(6, 2, hidden_features=3))


def test_loading_a_record_that_differs_only_in_pooling_adopts_it():
    source = StructuredConv2d(8, 8, 3, padding=1, hidden_channels=4, pooling="cumsum")
    target = StructuredConv2d(8, 8, 3, padding=1, hidden_channels=4)
    target.load_state_dict(source.state_dict())
    assert target.pooling == "cumsum"
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(target(x), source(x), rtol=1e-5, atol=1e-6)
    # Any other difference still needs restructure, and a pooling the library does not know is refused.
    with pytest.raises(ValueError, match="restructure"):
        StructuredConv2d(8, 8, 3, padding=1, hidden_channels=2).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="pooling"):
        target.set_extra_state({**source.structure_record(), "pooling": "fft"})
    assert target.pooling == "cumsum"
