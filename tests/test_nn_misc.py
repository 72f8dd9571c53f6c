"""DepthwiseSeparableConv2d, SqueezeExcite, CReLU, ChannelShuffle, make_divisible, and the seed texts' arithmetic."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cheapconv.nn import ChannelShuffle, CReLU, DepthwiseSeparableConv2d, SqueezeExcite
from lightning_cheapconv.nn.functional import make_divisible


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the seed texts' arithmetic (REFERENCES.md) -----------------------------------------------------------------


@pytest.mark.parametrize("out_channels,standard,separable", [(4, 108, 27 + 12), (256, 6912, 795)])
def test_seed_parameter_counts(out_channels, standard, separable):
    assert _num_params(nn.Conv2d(3, out_channels, 3, bias=False)) == standard
    sep = DepthwiseSeparableConv2d(3, out_channels, 3, bias=False)
    assert _num_params(sep) == separable
    assert _num_params(sep.depthwise) == 27
    assert _num_params(sep.pointwise) == 3 * out_channels


@pytest.mark.parametrize(
    "in_channels,out_channels,kernel", [(3, 4, 3), (3, 256, 3), (32, 64, 3), (16, 16, 5), (8, 24, 7)]
)
def test_separable_over_standard_ratio(in_channels, out_channels, kernel):
    standard = _num_params(nn.Conv2d(in_channels, out_channels, kernel, bias=False))
    separable = _num_params(DepthwiseSeparableConv2d(in_channels, out_channels, kernel, bias=False))
    assert Fraction(separable, standard) == Fraction(1, out_channels) + Fraction(1, kernel**2)


@pytest.mark.parametrize("channels,groups", [(8, 1), (8, 2), (8, 4), (12, 3), (16, 16)])
def test_grouped_conv_has_one_over_g_of_the_parameters(channels, groups):
    standard = _num_params(nn.Conv2d(channels, 2 * channels, 3, bias=False))
    grouped = _num_params(nn.Conv2d(channels, 2 * channels, 3, groups=groups, bias=False))
    assert Fraction(grouped, standard) == Fraction(1, groups)


@pytest.mark.parametrize("channels,r", [(64, 16), (32, 4), (96, 8)])
def test_squeeze_excite_adds_2c2_over_r_weights_plus_biases(channels, r):
    se = SqueezeExcite(channels, se_ratio=1 / r)
    reduced = channels // r
    assert se.reduced_channels == reduced
    weights = se.conv_reduce.weight.numel() + se.conv_expand.weight.numel()
    assert weights == 2 * channels**2 // r
    assert _num_params(se) == 2 * channels**2 // r + reduced + channels


def test_crelu_doubles_channels():
    x = torch.randn(2, 5, 3, 4)
    out = CReLU()(x)
    assert out.shape == (2, 10, 3, 4)
    torch.testing.assert_close(out, torch.cat([F.relu(x), F.relu(-x)], dim=1))
    last = CReLU(dim=-1)(x)
    assert last.shape == (2, 5, 3, 8)
    torch.testing.assert_close(last, torch.cat([F.relu(x), F.relu(-x)], dim=-1))
    # Nothing is lost: x = relu(x) - relu(-x).
    torch.testing.assert_close(out[:, :5] - out[:, 5:], x)


@pytest.mark.parametrize("dim", [True, 1.0, "1", None])
def test_crelu_refuses_a_dim_that_is_not_an_int(dim):
    with pytest.raises(
        ValueError, match=rf"CReLU: dim={dim!r} is not an int; valid range is unbounded \(an int\), got "
    ):
        CReLU(dim=dim)


# --- DepthwiseSeparableConv2d ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (3, 5), "stride": 2, "padding": (1, 2), "bias": False},
        {"kernel_size": 3, "dilation": 2, "padding": "same", "padding_mode": "reflect"},
    ],
)
def test_separable_is_depthwise_then_pointwise(kwargs):
    torch.manual_seed(0)
    sep = DepthwiseSeparableConv2d(4, 6, **kwargs).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    dw, pw = sep.depthwise, sep.pointwise
    assert dw.groups == 4 and dw.weight.shape[1] == 1 and dw.bias is None
    assert pw.kernel_size == (1, 1)
    with torch.no_grad():
        if dw.padding_mode == "zeros":
            depthwise = F.conv2d(x, dw.weight, None, dw.stride, dw.padding, dw.dilation, groups=4)
        else:
            padded = F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode)
            depthwise = F.conv2d(padded, dw.weight, None, dw.stride, 0, dw.dilation, groups=4)
        expected = F.conv2d(depthwise, pw.weight, pw.bias)
        torch.testing.assert_close(sep(x), expected)
    assert sep.config()["bias"] is kwargs.get("bias", True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_channels": 0}, r"DepthwiseSeparableConv2d: in_channels=0 is out of range; valid range is 1\.\.\d+"),
        ({"out_channels": True}, "out_channels=True is not an int"),
        ({"stride": 0}, r"DepthwiseSeparableConv2d: stride=0 is out of range; each side must be in 1\.\."),
        ({"padding": -1}, r"padding=-1 is out of range; each side must be in 0\.\."),
        ({"padding": (1, -1)}, r"padding=\(1, -1\) is out of range"),
        ({"dilation": (1, 0)}, r"dilation=\(1, 0\) is out of range"),
        ({"kernel_size": (3, 3, 3)}, r"kernel_size=\(3, 3, 3\) is not an int or a pair of ints"),
        ({"padding": "same", "stride": 2}, "padding='same' needs stride 1"),
        ({"bias": "no"}, "bias='no' is not a bool"),
        ({"padding_mode": "mirror"}, "padding_mode='mirror' is not valid"),
    ],
)
def test_separable_refuses_what_nn_conv2d_cannot_run(kwargs, match):
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        DepthwiseSeparableConv2d(**args)


def test_separable_normalizes_its_arguments():
    sep = DepthwiseSeparableConv2d(4, 6, 3, stride=[2, 1], padding=1)
    assert sep.config()["stride"] == (2, 1) and sep.config()["padding"] == (1, 1)


# --- ChannelShuffle --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,groups", [(6, 2), (6, 3), (12, 4), (8, 8), (5, 1)])
def test_channel_shuffle_definition_and_inverse(channels, groups):
    x = torch.randn(2, channels, 3, 2)
    out = ChannelShuffle(groups)(x)
    # Definition: split into groups, transpose (group, channel-in-group), flatten.
    expected = x.reshape(2, groups, channels // groups, 3, 2).transpose(1, 2).reshape(2, channels, 3, 2)
    assert torch.equal(out, expected)
    assert torch.equal(out, nn.ChannelShuffle(groups)(x))
    # A permutation of the channels: output channel i is input channel (i % g)·(C/g) + i // g.
    per_group = channels // groups
    source = [(i % groups) * per_group + i // groups for i in range(channels)]
    assert sorted(source) == list(range(channels))
    assert torch.equal(out, x[:, source])
    # Shuffling with C/g groups undoes it.
    assert torch.equal(ChannelShuffle(per_group)(out), x)


def test_channel_shuffle_example_and_errors():
    assert ChannelShuffle(2)(torch.arange(4.0).view(1, 4, 1, 1)).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="5 channels are not divisible by groups=2"):
        ChannelShuffle(2)(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match=r"ChannelShuffle: groups=0 is out of range; valid range is 1\.\.\d+"):
        ChannelShuffle(0)
    with pytest.raises(ValueError, match="ChannelShuffle: groups=True is not an int"):
        ChannelShuffle(True)
    with pytest.raises(ValueError, match="groups=2.0 is not an int"):
        ChannelShuffle(2.0)


# --- SqueezeExcite ---------------------------------------------------------------------------------------------------


def test_squeeze_excite_forward_matches_definition():
    torch.manual_seed(1)
    se = SqueezeExcite(8, se_ratio=0.25).double()
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    squeezed = x.mean((2, 3), keepdim=True)
    hidden = F.relu(F.conv2d(squeezed, se.conv_reduce.weight, se.conv_reduce.bias))
    gate = torch.sigmoid(F.conv2d(hidden, se.conv_expand.weight, se.conv_expand.bias))
    with torch.no_grad():
        torch.testing.assert_close(se(x), x * gate)


def test_squeeze_excite_ghostnet_variant_and_errors():
    se = SqueezeExcite(72, se_ratio=0.25, divisor=4, gate_layer=nn.Hardsigmoid)
    assert se.reduced_channels == 20  # make_divisible(18, 4): 20 (GhostNet's rounding)
    assert isinstance(se.gate, nn.Hardsigmoid)
    with pytest.raises(ValueError, match=r"se_ratio=0 is out of range; valid range is \(0, 1\]"):
        SqueezeExcite(8, se_ratio=0)
    with pytest.raises(ValueError, match=r"SqueezeExcite: channels=0 is out of range; valid range is 1\.\.\d+"):
        SqueezeExcite(0)


@pytest.mark.parametrize(
    "value,divisor,expected",
    [(18, 4, 20), (16, 8, 16), (20, 8, 24), (3, 8, 8), (36.0, 8, 40), (100, 8, 104), (10, 8, 16)],
)
def test_make_divisible(value, divisor, expected):
    got = make_divisible(value, divisor)
    assert got == expected
    assert got % divisor == 0 and got >= 0.9 * value
