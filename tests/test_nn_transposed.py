"""Structured and Ghost transposed convolutions (lightning_cheapconv/nn/transposed.py)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_cheapconv import count_complexity, restructure
from lightning_cheapconv.nn import build_from_record
from lightning_cheapconv.nn.record import decode_record, records_equal
from lightning_cheapconv.nn.transposed import (
    GhostConvTranspose1d,
    GhostConvTranspose2d,
    GhostConvTranspose3d,
    StructuredConvTranspose1d,
    StructuredConvTranspose2d,
    StructuredConvTranspose3d,
    check_transpose_args,
    transpose_config,
)
from lightning_cheapconv.structure import StructureSpec, from_alpha, project

STRUCTURED = {1: StructuredConvTranspose1d, 2: StructuredConvTranspose2d, 3: StructuredConvTranspose3d}
GHOST = {1: GhostConvTranspose1d, 2: GhostConvTranspose2d, 3: GhostConvTranspose3d}
DENSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass
class Case:
    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    hidden_channels: int
    hidden_kernel: tuple[int, ...]
    input_size: tuple[int, ...]

    def kwargs(self) -> dict:
        return {
            "stride": self.stride,
            "padding": self.padding,
            "output_padding": self.output_padding,
            "groups": self.groups,
            "bias": self.bias,
            "dilation": self.dilation,
        }

    def structured(self) -> torch.nn.Module:
        layer = STRUCTURED[self.dims](
            self.in_channels,
            self.out_channels,
            self.kernel,
            **self.kwargs(),
            hidden_channels=self.hidden_channels,
            hidden_kernel_size=self.hidden_kernel,
            dtype=torch.float64,
        )
        with torch.no_grad():
            layer.weight.normal_()
        return layer


@st.composite
def cases(draw, dims: int | None = None) -> Case:
    dims = dims or draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 4))
    biggest = 4 if dims < 3 else 3
    kernel = tuple(draw(st.integers(1, biggest)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    # Paddings up to (and past) the dilated kernel: the small conv crops, then F.pad crops the rest.
    padding = tuple(draw(st.integers(0, d * (k - 1) + 1)) for k, d in zip(kernel, dilation, strict=True))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True))
    hidden_kernel = tuple(draw(st.integers(1, k)) for k in kernel)
    hidden_channels = draw(st.integers(1, out_channels // groups))
    # The input must give a non-empty output: (L-1)s - 2p + d(K-1) + o + 1 >= 1.
    input_size = []
    for k, s, p, o, d in zip(kernel, stride, padding, output_padding, dilation, strict=True):
        smallest = max(1, math.ceil((2 * p - d * (k - 1) - o) / s) + 1)
        input_size.append(draw(st.integers(smallest, smallest + (3 if dims < 3 else 1))))
    return Case(
        dims, in_channels, out_channels, kernel, stride, padding, output_padding, dilation, groups,
        draw(st.booleans()), hidden_channels, hidden_kernel, tuple(input_size),
    )  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_structured_equals_dense_conv_transpose_of_structured_kernel(case):
    layer = case.structured()
    x = torch.randn(2, case.in_channels, *case.input_size, dtype=torch.float64)
    dense_weight = from_alpha(layer.weight, (case.out_channels // case.groups, *case.kernel))
    expected = CONV_TRANSPOSE[case.dims](
        x, dense_weight, layer.bias, case.stride, case.padding, case.output_padding, case.groups, case.dilation
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.to_dense()(x), expected, rtol=1e-10, atol=1e-10)
    # The box filter's additions, counted as they happen.
    layer.bias = None
    assert _count_additions(lambda: layer(x)) == layer.pooling_additions(tuple(x.shape))


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_from_dense_projects_the_kernel(case):
    dense = DENSE[case.dims](case.in_channels, case.out_channels, case.kernel, **case.kwargs(), dtype=torch.float64)
    layer = STRUCTURED[case.dims].from_dense(dense, case.hidden_channels, case.hidden_kernel)
    projected = project(dense.weight.detach(), StructureSpec(case.hidden_channels, case.hidden_kernel))
    torch.testing.assert_close(layer.dense_weight(), projected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        dense.weight.copy_(projected)
    x = torch.randn(1, case.in_channels, *case.input_size, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_output_size_as_nn_conv_transpose(dims):
    dense = DENSE[dims](4, 6, 3, stride=2, padding=1, dtype=torch.float64)
    layer, ghost = STRUCTURED[dims].from_dense(dense), GHOST[dims](4, 6, 3, stride=2, padding=1)
    x = torch.randn(1, 4, *([3] * dims), dtype=torch.float64)
    dense.weight.data = layer.dense_weight().detach()
    for size in ([6] * dims, [1, 6, *([6] * dims)]):
        torch.testing.assert_close(layer(x, output_size=size), dense(x, output_size=size))
        assert ghost(x.float(), output_size=size).shape == (1, 6, *([6] * dims))
    for too_small_or_large in (4, 7):  # sizes 5 and 6 are valid for this input, as for nn.ConvTranspose
        with pytest.raises(ValueError, match="output size"):
            dense(x, output_size=[too_small_or_large] * dims)
        with pytest.raises(ValueError, match=r"output size .* can only be 5\.\.6"):
            layer(x, output_size=[too_small_or_large] * dims)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_forward_backward_and_half_precision(dims):
    layer = STRUCTURED[dims](4, 6, 3, stride=2, padding=1, output_padding=1, hidden_channels=3)
    ghost = GHOST[dims](4, 6, 3, stride=2, padding=1, output_padding=1, bias=True, permuted=True)
    x = torch.randn(2, 4, *([3] * dims), requires_grad=True)
    for module in (layer, ghost):
        out = module(x)
        assert out.shape == (2, 6, *([6] * dims))
        out.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    half = layer.to(torch.bfloat16)(x.detach().bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), layer.float()(x.detach()), rtol=0.05, atol=0.05)


def test_box_filter_and_additions_by_hand():
    # K=3, n=2: window 2 over z = conv_transpose(ones(3), alpha=1) = [1, 2, 2, 1] padded by 1 on both sides.
    layer = StructuredConvTranspose1d(1, 1, 3, hidden_kernel_size=2, bias=False)
    torch.testing.assert_close(layer.box_filter(torch.ones(1, 1, 3), [0]), torch.tensor([[[1.0, 2.0, 2.0, 1.0]]]))
    # Input 2 at stride 1: z has 3 positions, padded to 5, window 2 -> 4 outputs, one add each.
    assert layer.pooling_additions((1, 1, 2)) == 4
    # Channel window 2 (C_out=3, c=2): padded to 4 channels, 3 outputs; plus the spatial pass on 2 channels.
    layer = StructuredConvTranspose1d(1, 3, 3, hidden_channels=2, hidden_kernel_size=2, bias=False)
    assert layer.pooling_additions((2, 1, 2)) == 2 * (2 * 4 + 3 * 4)
    # Hidden sizes = dense sizes: no box filter at all.
    assert StructuredConvTranspose2d(2, 2, 3, hidden_kernel_size=3).pooling_additions((1, 2, 4, 4)) == 0


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


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_complexity_against_hand_formulas(dims):
    batch, c_in, c_out, k, size = 2, 8, 6, 3, 4
    structured = STRUCTURED[dims](c_in, c_out, k, stride=2, padding=1, hidden_channels=3, hidden_kernel_size=2)
    ghost = GHOST[dims](c_out, c_out, k, stride=2, padding=1, ratio=3, dw_size=3)
    model = nn.Sequential(structured, ghost.requires_grad_(False))
    counts = count_complexity(model, (batch, c_in, *([size] * dims))).by_name()
    # Small transposed conv: every input position meets C_in · c · n^dims weights.
    assert counts["0"].macs == batch * size**dims * c_in * 3 * 2**dims
    assert counts["0"].params == c_in * 3 * 2**dims + c_out
    assert counts["0"].adds == structured.pooling_additions((batch, c_in, *([size] * dims))) > 0
    # Ghost: m = 2 intrinsic maps from the primary transposed conv, then a depthwise d^dims conv for 4 ghosts, at
    # the output resolution (2·4 - 2 + 3 - 1 + 1 = 7 per side) after the first layer's output (7 per side too).
    out_size = (size - 1) * 2 - 2 + k - 1 + 1
    ghost_in = out_size
    ghost_out = (ghost_in - 1) * 2 - 2 + k
    primary = batch * ghost_in**dims * c_out * 2 * k**dims
    cheap = batch * ghost_out**dims * 4 * 3**dims
    assert counts["1"].macs == primary + cheap
    assert counts["1"].params == c_out * 2 * k**dims + 4 * 3**dims


def _rebuilt(module: nn.Module) -> nn.Module:
    record = decode_record(module.get_extra_state())
    assert records_equal(record, module.structure_record())
    fresh = build_from_record(record)
    fresh.load_state_dict(module.state_dict())
    return fresh


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_records_round_trip(dims):
    structured = STRUCTURED[dims](4, 6, (3,) * dims, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    ghost = GHOST[dims](4, 6, 3, stride=2, padding=1, dilation=2, output_padding=1, ratio=3, permuted=True)
    ghost.set_output_index(torch.tensor([5, 0, 1, 2, 3, 4]))
    x = torch.randn(1, 4, *([3] * dims))
    for module in (structured, ghost):
        fresh = _rebuilt(module)
        assert type(fresh) is type(module)
        torch.testing.assert_close(fresh(x), module(x))


def _models(dims: int) -> tuple[nn.Module, nn.Module]:
    def net() -> nn.Module:
        return nn.Sequential(
            DENSE[dims](4, 8, 4, stride=2, padding=1),
            nn.ReLU(),
            DENSE[dims](8, 6, 3, stride=2, padding=1, output_padding=1, bias=False),
        )

    dense, fresh = net(), net()
    dense[0] = STRUCTURED[dims].from_dense(dense[0], hidden_channels=4)
    dense[2] = GHOST[dims].from_dense(dense[2], ratio=2, init="random")
    return dense, fresh


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_restructure_a_fresh_dense_model(dims):
    converted, fresh = _models(dims)
    state = converted.state_dict()
    changes = restructure(fresh, state)
    assert [c.new_type for c in changes] == [STRUCTURED[dims].__name__, GHOST[dims].__name__]
    fresh.load_state_dict(state)
    x = torch.randn(2, 4, *([3] * dims))
    torch.testing.assert_close(fresh(x), converted(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_restructure_a_converted_model_back_to_dense_weights(dims):
    """A converted model meeting a dense checkpoint gets its nn.ConvTranspose layers back (not nn.Conv layers)."""
    converted, dense = _models(dims)
    changes = restructure(converted, dense.state_dict())
    assert [c.new_type for c in changes] == [DENSE[dims].__name__] * 2
    converted.load_state_dict(dense.state_dict())
    x = torch.randn(2, 4, *([3] * dims))
    torch.testing.assert_close(converted(x), dense(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dense_layer_for_a_record_is_the_layer_replaced(dims):
    converted, dense = _models(dims)
    for index in (0, 2):
        cheap = converted[index]
        rebuilt = type(cheap).dense_layer_for(decode_record(cheap.get_extra_state()))
        assert type(rebuilt) is type(dense[index]) and rebuilt.weight.is_meta
        assert transpose_config(rebuilt) == transpose_config(dense[index])
        assert rebuilt.weight.shape == dense[index].weight.shape


def test_ghost_inherits_exact_filters_at_any_stride():
    # Filter 1 is filter 0 shifted one tap along W, filter 3 is twice filter 2: each a ghost of another. The
    # ghosts' depthwise kernels act on the output grid, so the kernel-space fit is exact at stride 2 too (no bias:
    # a bias under a zero-padded depthwise conv differs at the borders, as for GhostConv2d).
    torch.manual_seed(0)
    dense = nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        base = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        base[..., -1] = 0
        dense.weight[:, 0], dense.weight[:, 2] = base[:, 0], base[:, 1]
        dense.weight[:, 1] = base[:, 0].roll(1, dims=-1)
        dense.weight[:, 3] = 2 * base[:, 1]
    ghost = GhostConvTranspose2d.from_dense(dense, ratio=2, dw_size=3, init="inherit")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), dense(x), rtol=1e-5, atol=1e-5)  # the fit's ridge leaves ~1e-7 taps
    assert ghost.output_index is not None


def test_ghost_inheritance_beats_random_init():
    torch.manual_seed(0)
    dense = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, bias=True).requires_grad_(False)
    x = torch.randn(4, 16, 6, 6)
    errors = {}
    for init in ("inherit", "random"):
        ghost = GhostConvTranspose2d.from_dense(dense, init=init)
        assert not any(p.requires_grad for p in ghost.parameters())
        errors[init] = ((ghost(x) - dense(x)).norm() / dense(x).norm()).item()
    assert errors["inherit"] < 0.9 < errors["random"]


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: StructuredConvTranspose2d(4, 4, 3, stride=2, output_padding=2), "output_padding=2 is out of range"),
        (lambda: StructuredConvTranspose2d(4, 4, 3, padding_mode="reflect"), "padding_mode='reflect'"),
        (lambda: StructuredConvTranspose2d(4, 4, 3, hidden_channels=5), r"channels \(c\)=5 is out of range"),
        (lambda: StructuredConvTranspose3d(4, 4, 3, hidden_kernel_size=(2, 2)), "hidden_kernel_size=.* 3 ints"),
        (lambda: StructuredConvTranspose1d(4, 4, (3, 3)), r"kernel_size=.*a tuple of 1 int\)"),
        (lambda: StructuredConvTranspose2d(4, 6, 3, groups=4), "divisible by groups=4"),
        (lambda: StructuredConvTranspose2d(4, 4, 3, padding=-1), "padding=-1 is out of range"),
        (lambda: GhostConvTranspose2d(4, 4, 3, ratio=1), "ratio=1"),
        (lambda: GhostConvTranspose1d(4, 4, 3, dw_size=2), "dw_size=2"),
        (lambda: StructuredConvTranspose2d.from_dense(nn.Conv2d(4, 4, 3)), "expects an initialized nn.ConvTranspose2d"),
        (lambda: StructuredConvTranspose1d.from_dense(nn.ConvTranspose2d(4, 4, 3)), "nn.ConvTranspose1d"),
        (lambda: GhostConvTranspose2d.from_dense(nn.ConvTranspose2d(4, 4, 3, groups=2)), "groups=2"),
        (lambda: GhostConvTranspose2d.from_dense(nn.ConvTranspose2d(4, 4, 3), init="zeros"), "init='zeros'"),
        (lambda: check_transpose_args("up", 2, 4, 4, 3, stride=0), "up: stride=0 is out of range"),
    ],
)
def test_bad_arguments_are_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_scripted_and_traced(dims):
    x = torch.randn(1, 4, *([3] * dims))
    for module in (STRUCTURED[dims](4, 6, 3, stride=2, padding=1, hidden_channels=2), GHOST[dims](4, 6, 3, stride=2)):
        expected = module(x)
        torch.testing.assert_close(torch.jit.script(module)(x), expected)
        torch.testing.assert_close(torch.jit.trace(module, x)(x), expected)


@pytest.mark.filterwarnings(
    "ignore:.*is deprecated:FutureWarning", "ignore::torch.jit.TracerWarning", "ignore:Constant folding:UserWarning"
)
@pytest.mark.parametrize(
    "module",
    [
        StructuredConvTranspose2d(8, 6, 4, stride=2, padding=1, output_padding=1, hidden_channels=3),
        StructuredConvTranspose2d(2, 2, 3, padding=3, hidden_kernel_size=2),  # a negative pad crops
        GhostConvTranspose2d(8, 6, 4, stride=2, padding=1, bias=True, permuted=True),
    ],
)
def test_onnx_runtime_runs_the_exported_graph(module):
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(2, module.in_channels, 5, 5)
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), (x,), buffer, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), module(x).detach(), rtol=1e-5, atol=1e-5)
