"""Ghost and structured forms of Conv1d and Conv3d (lightning_cheapconv/nn/ghost.py, nn/structured.py) and the N-d
structure maths (lightning_cheapconv/structure.py)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_cheapconv.checkpoint import restructure
from lightning_cheapconv.complexity import count_complexity
from lightning_cheapconv.inherit import fit_ghost_from_activations, fit_ghost_from_kernels
from lightning_cheapconv.nn import GhostConv1d, GhostConv2d, GhostConv3d, StructuredConv1d, StructuredConv3d
from lightning_cheapconv.nn.record import build_from_record, check_conv_args, decode_record
from lightning_cheapconv.nn.structured import POOLINGS, POOLINGS_3D
from lightning_cheapconv.structure import (
    StructureSpec,
    composite_basis,
    from_alpha,
    project,
    random_residual,
    spec_from_ratios,
    structural_residual,
    to_alpha,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # nn.ConvNd's own 'same' path with even kernels warns about a padded copy; that is the reference, not us.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]

STRUCTURED = {1: StructuredConv1d, 3: StructuredConv3d}
GHOST = {1: GhostConv1d, 2: GhostConv2d, 3: GhostConv3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FORMS = {1: POOLINGS, 3: POOLINGS_3D}


# ------------------------------------------------------------------------------------------------ structure maths


def _dense_basis(big: tuple[int, ...], small: tuple[int, ...]) -> torch.Tensor:
    """``A = A_C ⊗ A_1 ⊗ ...`` as one dense matrix (only for tiny shapes)."""
    basis = torch.ones(1, 1, dtype=torch.float64)
    for b, s in zip(big, small, strict=True):
        basis = torch.kron(basis, composite_basis(b, s))
    return basis


@pytest.mark.parametrize(
    "big, small",
    [((3, 4), (2, 2)), ((2, 5), (1, 3)), ((3, 3, 2, 3), (2, 2, 1, 2)), ((2, 3, 3, 3), (2, 1, 2, 3))],
)
def test_mode_products_equal_the_kronecker_basis(big, small):
    torch.manual_seed(0)
    spec = StructureSpec(small[0], small[1:])
    basis = _dense_basis(big, small)
    alpha = torch.randn(3, *small, dtype=torch.float64)
    dense = from_alpha(alpha, big)
    torch.testing.assert_close(dense.flatten(1), alpha.flatten(1) @ basis.T)
    weight = torch.randn(3, *big, dtype=torch.float64)
    projector = basis @ torch.linalg.pinv(basis)
    torch.testing.assert_close(project(weight, spec).flatten(1), weight.flatten(1) @ projector.T)
    torch.testing.assert_close(to_alpha(dense, spec), alpha)
    assert float(structural_residual(dense, spec)) < 1e-12
    assert random_residual(big, spec) == pytest.approx(math.sqrt(1 - math.prod(small) / math.prod(big)))


def test_specs_of_every_rank():
    assert spec_from_ratios((8, 5), channel_ratio=0.5) == StructureSpec(4, (4,))
    assert spec_from_ratios((8, 3, 3, 3), kernel_size=2) == StructureSpec(8, (2, 2, 2))
    assert spec_from_ratios((8, 1, 3, 3), kernel_size=(2, 2, 2)) == StructureSpec(8, (1, 2, 2))
    assert StructureSpec(2, (3,)).num_weights == 6 and StructureSpec(2, (1, 2, 3)).num_weights == 12
    with pytest.raises(
        ValueError, match=r"conv3: kernel_size=\(2, 2\) is out of range; the layer's kernel \(3, 3, 3\) has 3"
    ):
        spec_from_ratios((8, 3, 3, 3), kernel_size=(2, 2), layer="conv3")
    with pytest.raises(ValueError, match=r"conv1: structured kernel_size=\(2, 2\) has 2 sides; .* \(5,\) has 1"):
        StructureSpec(2, (2, 2)).validate((4, 5), layer="conv1")
    with pytest.raises(
        ValueError, match=r"conv1: structured kernel size \(n\)=6 is out of range; valid range is 1\.\.5"
    ):
        StructureSpec(2, (6,)).validate((4, 5), layer="conv1")
    with pytest.raises(ValueError, match=r"kernel depth \(n_d\)=4 is out of range; valid range is 1\.\.3"):
        StructureSpec(2, (4, 1, 1)).validate((4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"kernel_size=\(1, 2, 3, 4\).*or a tuple of 1 or 3 ints"):
        StructureSpec(1, (1, 2, 3, 4))


# ------------------------------------------------------------------------------------- structured: exactness


@dataclass
class Case:
    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | int | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    hidden_channels: int
    hidden_kernel: tuple[int, ...]
    input_shape: tuple[int, ...]

    def dense(self) -> nn.Module:
        return CONV[self.dims](
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
            dtype=torch.float64,
        )


@st.composite
def cases(draw, dims: int) -> Case:
    groups = draw(st.integers(1, 3))
    per_group = draw(st.integers(1, 4))
    out_channels = groups * draw(st.integers(1, 2))
    top = 4 if dims == 1 else 3
    kernel = tuple(draw(st.integers(1, top)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * dims
        padding: str | int | tuple[int, ...] = "same"
        pads = tuple(d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        if padding_kind == "int":
            padding = draw(st.integers(0, 2))
            pads = (padding,) * dims
        elif padding_kind == "tuple":
            padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
            pads = padding
        else:
            padding, pads = "valid", (0,) * dims
    # The input must hold the dilated kernel, and reflect padding needs pad < size.
    sizes = []
    for axis in range(dims):
        reach = dilation[axis] * (kernel[axis] - 1) + 1
        low = max(reach - min(pads[axis], reach - 1), pads[axis] + 1, 1)
        sizes.append(draw(st.integers(low, low + (4 if dims == 1 else 2))))
    return Case(
        dims=dims,
        in_channels=per_group * groups,
        out_channels=out_channels,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        hidden_channels=draw(st.integers(1, per_group)),
        hidden_kernel=tuple(draw(st.integers(1, k)) for k in kernel),
        input_shape=(draw(st.integers(1, 2)), per_group * groups, *sizes),
    )


def _check_structured(case: Case, seed: int, pooling: str) -> None:
    torch.manual_seed(seed)
    conv = case.dense()
    x = torch.randn(case.input_shape, dtype=torch.float64)
    spec = StructureSpec(case.hidden_channels, case.hidden_kernel)
    layer = STRUCTURED[case.dims].from_dense(conv, case.hidden_channels, case.hidden_kernel, pooling=pooling)
    assert layer.weight.shape == (case.out_channels, case.hidden_channels, *case.hidden_kernel)
    with torch.no_grad():
        expected = conv._conv_forward(x, project(conv.weight, spec), conv.bias)
        got = layer(x)
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
        dense = layer.to_dense()
        assert type(dense) is CONV[case.dims]
        torch.testing.assert_close(dense(x), expected, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(layer.dense_weight(), dense.weight, atol=1e-12, rtol=0)
    again = STRUCTURED[case.dims].from_dense(dense, case.hidden_channels, case.hidden_kernel)
    torch.testing.assert_close(again.weight, layer.weight, atol=1e-9, rtol=1e-9)
    assert layer.pooling_additions(case.input_shape) >= 0


@settings(max_examples=40, deadline=None)
@given(case=cases(1), seed=st.integers(0, 2**16), pooling=st.sampled_from(POOLINGS))
def test_structured_conv1d_equals_projected_dense(case, seed, pooling):
    _check_structured(case, seed, pooling)


@settings(max_examples=30, deadline=None)
@given(case=cases(3), seed=st.integers(0, 2**16), pooling=st.sampled_from(POOLINGS_3D))
def test_structured_conv3d_equals_projected_dense(case, seed, pooling):
    _check_structured(case, seed, pooling)


PINNED = [
    # grouped 1-d, channel and spatial windows, 'same' with dilation (asymmetric padding).
    Case(1, 6, 4, (4,), (1,), "same", (2,), 2, True, "zeros", 2, (2,), (2, 6, 11)),
    # depthwise 1-d, strided, reflect.
    Case(1, 3, 3, (3,), (2,), 1, (1,), 3, False, "reflect", 1, (2,), (1, 3, 9)),
    # 3-d, anisotropic kernel, the pool's own zero padding (symmetric, at most half the window).
    Case(3, 4, 2, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 1), 1, True, "zeros", 3, (1, 2, 1), (1, 4, 3, 5, 5)),
    # 3-d grouped, strided, circular, dilated.
    Case(3, 4, 4, (2, 3, 2), (2, 1, 2), (1, 2, 0), (1, 2, 1), 2, False, "circular", 1, (1, 2, 2), (1, 4, 4, 6, 5)),
]


@pytest.mark.parametrize("case", PINNED, ids=lambda c: f"{c.dims}d-{c.kernel}-g{c.groups}-{c.padding_mode}")
def test_structured_pinned_cases(case):
    for pooling in FORMS[case.dims]:
        _check_structured(case, seed=3, pooling=pooling)


@pytest.mark.parametrize("dims", [1, 3])
def test_structured_half_precision_and_backward(dims):
    torch.manual_seed(0)
    conv = CONV[dims](4, 4, 3, padding=1)
    layer = STRUCTURED[dims].from_dense(conv, hidden_channels=2)
    x = torch.randn(2, 4, *(6,) * dims, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    half = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.no_grad():
        out = half(x.detach().to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), layer(x.detach()), atol=0.1, rtol=0.05)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dims", [1, 3])
def test_structured_scripts_and_traces(dims):
    layer = STRUCTURED[dims](4, 4, 3, padding=1, groups=2, hidden_channels=1, dilation=(1,) * (dims - 1) + (2,))
    x = torch.randn(1, 4, *(7,) * dims)
    for pooling in FORMS[dims]:
        layer.set_pooling(pooling)
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(layer)(x), layer(x))
    layer.set_pooling("auto")
    traced = torch.jit.trace(layer, x)
    assert "aten::cumsum" in {node.kind() for node in traced.inlined_graph.nodes()}
    torch.testing.assert_close(traced(x), layer(x))


# ------------------------------------------------------------------------------------------------------ Ghost


def _manual_ghost(ghost, x: torch.Tensor, dims: int) -> torch.Tensor:
    """The ``m·ratio`` concatenated channels, ghost ``t`` made from intrinsic ``t // (ratio - 1)``, conv by conv."""
    conv = getattr(torch.nn.functional, f"conv{dims}d")
    p, c, s = ghost.primary, ghost.cheap, ghost.ratio
    intrinsic = conv(x, p.weight, p.bias, p.stride, p.padding, p.dilation)
    ghosts = []
    for t in range(ghost.intrinsic_channels * (s - 1)):
        bias = None if c.bias is None else c.bias[t : t + 1]
        source = intrinsic[:, t // (s - 1)].unsqueeze(1)
        ghosts.append(conv(source, c.weight[t : t + 1], bias, padding=ghost.dw_size // 2))
    return torch.cat([intrinsic, *ghosts], dim=1)


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize(
    "out_channels, kernel, stride, padding, ratio, dw_size, bias",
    [(8, 3, 1, 1, 2, 3, False), (7, 3, 2, 1, 3, 3, True), (5, 1, 1, 0, 2, 1, True), (6, 2, 1, "same", 4, 5, False)],
)
def test_ghost_nd_shapes_and_channels(dims, out_channels, kernel, stride, padding, ratio, dw_size, bias):
    torch.manual_seed(1)
    ghost = GHOST[dims](3, out_channels, kernel, stride, padding, ratio=ratio, dw_size=dw_size, bias=bias).double()
    conv = CONV[dims](3, out_channels, kernel, stride, padding).double()
    assert type(ghost.primary) is CONV[dims] and type(ghost.cheap) is CONV[dims]
    assert ghost.cheap.groups == ghost.intrinsic_channels
    x = torch.randn(2, 3, *(7,) * dims, dtype=torch.float64)
    with torch.no_grad():
        out = ghost(x)
        assert out.shape == conv(x).shape
        torch.testing.assert_close(out, _manual_ghost(ghost, x, dims)[:, :out_channels])
    m = math.ceil(out_channels / ratio)
    params = m * 3 * kernel**dims + m * (ratio - 1) * dw_size**dims + (m * ratio if bias else 0)
    assert sum(p.numel() for p in ghost.parameters()) == params


@pytest.mark.parametrize("dims", [1, 3])
def test_ghost_nd_output_index_norm_and_backward(dims):
    torch.manual_seed(2)
    norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm3d
    ghost = GHOST[dims](2, 5, 3, padding=1, ratio=3, norm_layer=norm, act_layer=nn.ReLU)
    assert isinstance(ghost.primary_conv[1], norm) and ghost.config()["norm_layer"] == norm.__name__
    x = torch.randn(2, 2, *(5,) * dims)
    ghost.eval()
    with torch.no_grad():
        full = torch.cat([ghost.primary_conv(x), ghost.cheap_operation(ghost.primary_conv(x))], 1)
        ghost.set_output_index([4, 0, 5, 2, 1])
        torch.testing.assert_close(ghost(x), full[:, [4, 0, 5, 2, 1]])
    ghost.train()
    ghost(x).sum().backward()
    assert all(p.grad is not None for p in ghost.parameters())
    with pytest.raises(ValueError, match=rf"GhostConv{dims}d: output_index values must lie in 0\.\.5"):
        ghost.set_output_index([0, 1, 2, 3, 6])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dims", [1, 3])
def test_ghost_nd_scripts(dims):
    ghost = GHOST[dims](3, 6, 3, padding=1, permuted=True).eval()
    x = torch.randn(1, 3, *(5,) * dims)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(ghost)(x), ghost(x))


# -------------------------------------------------------------------------------------------- records, restructure


@pytest.mark.parametrize(
    "module",
    [
        GhostConv1d(4, 6, 3, 2, 1, ratio=3, bias=True, padding_mode="reflect", permuted=True),
        GhostConv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), dilation=(1, 2, 1), norm_layer=nn.BatchNorm3d),
        StructuredConv1d(6, 4, 5, 2, "valid", 2, 2, True, "circular", 2, 3, pooling="cumsum"),
        StructuredConv3d(4, 4, (2, 3, 3), padding=(1, 1, 1), groups=2, hidden_channels=1, pooling="adds"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_records_round_trip(module):
    record = decode_record(module.get_extra_state())
    assert record["kind"] == type(module).__name__ and record["version"] == 1
    rebuilt = build_from_record(record)
    assert type(rebuilt) is type(module) and rebuilt.structure_record() == module.structure_record()
    rebuilt.load_state_dict(module.state_dict())
    dims = len(record["kernel_size"])
    x = torch.randn(1, module.in_channels, *(10,) * dims)
    module.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))


def _net(dims: int) -> nn.Sequential:
    conv, norm = CONV[dims], (nn.BatchNorm1d if dims == 1 else nn.BatchNorm3d)
    return nn.Sequential(
        conv(3, 8, 3, padding=1, bias=False),
        norm(8),
        nn.ReLU(),
        conv(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        conv(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        conv(8, 4, 1),
    )


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("dims", [1, 3])
def test_restructure_fresh_models_both_ways(dims):
    torch.manual_seed(4)
    model = _net(dims)
    _randomize(model)
    model[0] = GHOST[dims](3, 8, 3, padding=1)
    model[3] = STRUCTURED[dims].from_dense(model[3], hidden_channels=4)
    model[5] = STRUCTURED[dims].from_dense(model[5], hidden_channels=2, pooling="cumsum")
    model[7] = GHOST[dims](8, 4, 1, bias=True, ratio=2, dw_size=1, permuted=True)
    model.eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, *(8,) * dims)

    fresh = _net(dims).eval()
    changes = restructure(fresh, state)
    assert [(c.name, c.new_type) for c in changes] == [
        ("0", f"GhostConv{dims}d"),
        ("3", f"StructuredConv{dims}d"),
        ("5", f"StructuredConv{dims}d"),
        ("7", f"GhostConv{dims}d"),
    ]
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    # The other way: a converted model meets dense weights and gets its plain ConvNd layers back.
    dense = _net(dims).eval()
    _randomize(dense)
    changes = restructure(model, dense.state_dict())
    assert {c.new_type for c in changes} == {CONV[dims].__name__}
    model.load_state_dict(dense.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))


# ------------------------------------------------------------------------------------------------------ counting


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("out_channels, ratio, dw_size, stride", [(8, 2, 3, 1), (7, 3, 3, 2), (6, 4, 1, 1)])
def test_ghost_nd_counts(dims, out_channels, ratio, dw_size, stride):
    c_in, k = 5, 3
    shape = (2, c_in, *(7,) * dims)
    ghost = GHOST[dims](c_in, out_channels, k, stride=stride, padding=1, ratio=ratio, dw_size=dw_size)
    positions = shape[0] * math.prod(ghost(torch.randn(shape)).shape[2:])
    m = math.ceil(out_channels / ratio)
    counted = count_complexity(nn.Sequential(ghost), shape)
    assert [(r.name, r.type) for r in counted.rows] == [("0", f"GhostConv{dims}d")]
    # all m·(s-1) ghosts are computed, even those sliced away
    assert counted.macs == positions * (m * c_in * k**dims + m * (ratio - 1) * dw_size**dims)
    assert counted.params == m * c_in * k**dims + m * (ratio - 1) * dw_size**dims
    assert counted.adds == 0


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("groups, stride", [(1, 1), (2, 2)])
def test_structured_nd_counts(dims, groups, stride):
    """Windows of 2 (C - c = k - n = 1): the sum-pool is one add per value it outputs, stage by stage."""
    batch, channels, size = 2, 6, 5
    shape = (batch, channels, *(size,) * dims)
    per_group, hidden = channels // groups, channels // groups - 1
    layer = STRUCTURED[dims](channels, 4, 3, stride, padding=1, groups=groups, hidden_channels=hidden)
    out = layer(torch.randn(shape))
    counted = count_complexity(nn.Sequential(layer), shape)
    assert [(r.name, r.type) for r in counted.rows] == [("0", f"StructuredConv{dims}d")]
    assert counted.macs == batch * math.prod(out.shape[1:]) * hidden * 2**dims
    assert counted.params == 4 * hidden * 2**dims + 4
    assert per_group - hidden == 1
    values = batch * groups * hidden * size**dims  # the channel window's outputs
    sizes = [size + 2] * dims  # padded
    for axis in range(dims):
        sizes[axis] -= 1
        values += batch * groups * hidden * math.prod(sizes)
    assert counted.adds == values


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: GhostConv1d(4, 8, (3, 3)), r"GhostConv1d: kernel_size=\(3, 3\) is out of range; .*a tuple of 1 int"),
        (lambda: GhostConv3d(4, 8, 3, stride=(1, 2)), r"GhostConv3d: stride=\(1, 2\) is out of range"),
        (lambda: GhostConv3d(4, 8, 3, stride=2, padding="same"), r"padding='same' needs stride 1, as for nn\.Conv3d"),
        (lambda: GhostConv1d(4, 8, 3, ratio=1), r"GhostConv1d: ratio=1 is out of range"),
        (lambda: GhostConv1d(4, 8, 3, norm_layer=lambda c: nn.BatchNorm1d(c)), r"GhostConv1d: .*nn\.BatchNorm1d"),
        (lambda: StructuredConv1d(4, 8, 3, padding=-1), r"StructuredConv1d: padding=-1 is out of range"),
        (lambda: StructuredConv1d(4, 8, 3, hidden_kernel_size=4), r"kernel size \(n\)=4 is out of range"),
        (lambda: StructuredConv1d(4, 8, 3, hidden_channels=5), r"channels \(c\)=5 is out of range; valid range is"),
        (
            lambda: StructuredConv3d(4, 8, 3, pooling="avg_pool"),
            r"StructuredConv3d: pooling='avg_pool' is not valid; valid values are 'auto', 'adds' and 'cumsum'",
        ),
        (lambda: StructuredConv3d(4, 8, 3, hidden_kernel_size=(2, 2)), r"hidden_kernel_size=\(2, 2\) is out of range"),
        (
            lambda: StructuredConv3d.from_dense(nn.Conv2d(4, 4, 3)),
            r"StructuredConv3d\.from_dense expects an initialized nn\.Conv3d, got Conv2d",
        ),
        (lambda: StructuredConv1d.from_dense(nn.LazyConv1d(4, 3)), r"expects an initialized nn\.Conv1d"),
    ],
)
def test_bad_arguments_are_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_check_conv_args_keeps_the_2d_rules():
    assert check_conv_args("c", 4, 8, 3, 1, 1, 1, 1, True, "zeros") == (
        4,
        8,
        (3, 3),
        (1, 1),
        (1, 1),
        (1, 1),
        1,
        True,
        "zeros",
    )
    assert check_conv_args("c", 4, 8, [3], 2, "valid", 1, 2, False, "zeros", dims=1).kernel_size == (3,)
    with pytest.raises(
        ValueError, match=r"c: kernel_size=\(3, 3, 3\) is not an int or a pair of ints; each side must be in 1\.\."
    ):
        check_conv_args("c", 4, 8, (3, 3, 3), 1, 1, 1, 1, True, "zeros")


# ------------------------------------------------------------------------------------------------- inheritance


@pytest.mark.parametrize("fit_in", ["kernels", "activations"])
@pytest.mark.parametrize("dims, stride, dilation", [(1, 1, 1), (1, 2, 1), (1, 1, 2), (3, 1, 1), (3, 2, 2)])
def test_inheritance_fits_like_the_2d_fit_of_the_embedded_conv(fit_in, dims, stride, dilation):
    """A Conv1d is a Conv2d of height 1 and a Conv3d of depth 1 is a Conv2d: their fits must agree (the 2-d kernels'
    other rows see only zeros, so they fit to zero)."""
    torch.manual_seed(5)
    conv = CONV[dims](3, 6, (3,) * dims, stride=stride, dilation=dilation, padding=1, bias=True)
    with torch.no_grad():
        if dims == 3:  # depth 1: the 2-d kernel sits in the middle slice
            conv.weight[:, :, [0, 2]] = 0.0
    flat = nn.Conv2d(3, 6, 3, stride=stride, dilation=dilation, padding=1, bias=True)
    with torch.no_grad():
        flat.weight.zero_()
        if dims == 1:
            flat.weight[:, :, 1] = conv.weight
            flat.stride, flat.dilation, flat.padding = (1, stride), (1, dilation), (1, 1)
        else:
            flat.weight.copy_(conv.weight[:, :, 1])
        flat.bias.copy_(conv.bias)
    x = torch.randn(2, 3, *(9,) * dims)
    if fit_in == "kernels":
        fit, flat_fit = fit_ghost_from_kernels(conv, 2, 3), fit_ghost_from_kernels(flat, 2, 3)
    else:
        x2 = x.unsqueeze(2) if dims == 1 else x[:, :, 4]
        if dims == 3:  # an output of depth 1, whose kernel's middle slice reads x2
            x = x[:, :, 4 - dilation : 5 + dilation]
            conv.padding = (0, 1, 1)
        fit, flat_fit = fit_ghost_from_activations(conv, x, 2, 3), fit_ghost_from_activations(flat, x2, 2, 3)
    assert fit.intrinsics.tolist() == flat_fit.intrinsics.tolist() and fit.ghost_of == flat_fit.ghost_of
    assert fit.relative_error == pytest.approx(flat_fit.relative_error, rel=1e-4, abs=1e-6)
    for filt, kernel in fit.kernels.items():
        assert kernel.shape == (3,) * dims
        middle = kernel[1] if dims == 3 else kernel
        other = flat_fit.kernels[filt][1] if dims == 1 else flat_fit.kernels[filt]
        torch.testing.assert_close(middle, other, atol=1e-4, rtol=1e-3)
        if dims == 3:
            assert kernel[[0, 2]].abs().max() < 1e-4
        assert fit.bias_shift[filt] == pytest.approx(flat_fit.bias_shift[filt], abs=1e-4)


# ------------------------------------------------------------------------------------- convert_to_ghost, decompose


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_conversion_of_1d_and_3d_nets_restructures_into_fresh_models(dims, method):
    from lightning_cheapconv import convert_to_ghost, decompose_structured

    torch.manual_seed(6)
    model = _net(dims).eval()
    _randomize(model)
    x = torch.randn(2, 3, *(8,) * dims)
    if method == "ghost":
        result = convert_to_ghost(model, skip_first=False)
        expected = {"0": GHOST[dims], "3": GHOST[dims]}  # 5 is grouped, 7 the last layer
    else:
        result = decompose_structured(model, channel_ratio=0.5, skip_first=False)
        expected = {"0": STRUCTURED[dims], "3": STRUCTURED[dims], "5": STRUCTURED[dims]}
    assert {name: type(model.get_submodule(name)) for name in result.converted} == expected
    reasons = {p.name: p.reason for p in result.skipped}
    if method == "ghost":
        assert "grouped conv" in reasons["5"]
    state = model.state_dict()
    fresh = _net(dims).eval()
    restructure(fresh, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert str(result)  # the report names the new types
