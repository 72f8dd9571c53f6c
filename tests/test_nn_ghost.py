"""GhostConv2d and GhostBottleneck (lightning_cheapconv/nn/ghost.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cheapconv.nn import GhostBottleneck, GhostConv2d, SqueezeExcite, build_from_record
from lightning_cheapconv.nn.record import decode_record


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _manual_ghost(ghost: GhostConv2d, x: torch.Tensor) -> torch.Tensor:
    """All ``m·ratio`` concatenated channels, computed channel by channel with F.conv2d."""
    p, c, s = ghost.primary, ghost.cheap, ghost.ratio
    intrinsic = F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation)
    ghosts = []
    for t in range(ghost.intrinsic_channels * (s - 1)):
        source = intrinsic[:, t // (s - 1)].unsqueeze(1)
        bias = None if c.bias is None else c.bias[t : t + 1]
        ghosts.append(F.conv2d(source, c.weight[t : t + 1], bias, padding=ghost.dw_size // 2))
    return torch.cat([intrinsic, *ghosts], dim=1)


@pytest.mark.parametrize(
    "in_channels,out_channels,kernel,stride,padding,ratio,dw_size,input_hw,expected_hw",
    [
        (4, 8, 3, 1, 1, 2, 3, (8, 8), (8, 8)),
        (4, 7, 3, 2, 1, 2, 3, (9, 8), (5, 4)),
        (3, 10, 1, 1, 0, 3, 5, (5, 6), (5, 6)),
        (2, 5, (3, 1), 1, "same", 4, 1, (6, 5), (6, 5)),
        (3, 6, 5, 1, 0, 2, 3, (7, 9), (3, 5)),
    ],
)
def test_output_shape(in_channels, out_channels, kernel, stride, padding, ratio, dw_size, input_hw, expected_hw):
    ghost = GhostConv2d(in_channels, out_channels, kernel, stride, padding, ratio=ratio, dw_size=dw_size)
    out = ghost(torch.randn(2, in_channels, *input_hw))
    assert out.shape == (2, out_channels, *expected_hw)
    reference = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
    assert out.shape == reference(torch.randn(2, in_channels, *input_hw)).shape


@pytest.mark.parametrize(
    "in_channels,out_channels,kernel,ratio,dw_size,bias",
    [
        (16, 32, 3, 2, 3, False),
        (16, 32, 3, 2, 3, True),
        (8, 10, 3, 3, 3, False),  # 10 / 3: m = 4, 12 concatenated channels, 10 kept
        (8, 7, 1, 2, 1, True),  # m = 4, 8 concatenated, 7 kept
        (5, 17, 3, 4, 5, True),  # m = 5, 20 concatenated
        (3, 9, 5, 5, 7, False),  # m = 2
    ],
)
def test_parameter_count_formula(in_channels, out_channels, kernel, ratio, dw_size, bias):
    ghost = GhostConv2d(in_channels, out_channels, kernel, ratio=ratio, dw_size=dw_size, bias=bias)
    m = math.ceil(out_channels / ratio)
    assert ghost.intrinsic_channels == m
    primary = in_channels * m * kernel**2 + (m if bias else 0)
    cheap = m * (ratio - 1) * dw_size**2 + (m * (ratio - 1) if bias else 0)
    assert _num_params(ghost) == primary + cheap
    assert ghost.primary.weight.shape == (m, in_channels, kernel, kernel)
    assert ghost.cheap.weight.shape == (m * (ratio - 1), 1, dw_size, dw_size)


def test_ghost_halves_a_conv_roughly():
    conv = nn.Conv2d(64, 64, 3, bias=False)
    ghost = GhostConv2d(64, 64, 3, ratio=2, dw_size=3)
    assert _num_params(ghost) == 32 * 64 * 9 + 32 * 9
    assert _num_params(conv) / _num_params(ghost) == pytest.approx(2, rel=0.02)


@pytest.mark.parametrize(
    "out_channels,ratio,dw_size,bias,stride",
    [(8, 2, 3, False, 1), (10, 3, 3, True, 1), (7, 4, 5, True, 2), (5, 2, 1, False, 2)],
)
def test_ghost_channel_comes_from_intrinsic_t_div_ratio_minus_one(out_channels, ratio, dw_size, bias, stride):
    torch.manual_seed(0)
    ghost = GhostConv2d(3, out_channels, 3, stride, 1, ratio=ratio, dw_size=dw_size, bias=bias).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), _manual_ghost(ghost, x)[:, :out_channels])


@pytest.mark.parametrize("ratio", [2, 3, 4])
def test_zeroing_an_intrinsic_map_zeroes_exactly_its_ghosts(ratio):
    torch.manual_seed(1)
    m = 3
    ghost = GhostConv2d(2, m * ratio, 3, padding=1, ratio=ratio)
    x = torch.randn(1, 2, 6, 6)
    for j in range(m):
        with torch.no_grad():
            ghost.primary.weight.normal_()
            ghost.primary.weight[j] = 0.0
            out = ghost(x)
        zero = out.abs().flatten(2).amax(-1)[0] == 0
        ghosts_of_j = [m + t for t in range(m * (ratio - 1)) if t // (ratio - 1) == j]
        assert zero.nonzero().flatten().tolist() == [j, *ghosts_of_j]


def test_set_output_index_permutes_and_drops_identity():
    torch.manual_seed(2)
    ghost = GhostConv2d(3, 5, 3, padding=1, ratio=3)  # m = 2, 6 concatenated channels
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        full = _manual_ghost(ghost, x)
    assert ghost.output_index is None and "output_index" not in ghost.state_dict()

    index = [4, 0, 5, 2, 1]  # may pick any of the 6 concatenated channels
    ghost.set_output_index(index)
    assert ghost.output_index.tolist() == index and ghost.output_index.dtype == torch.long
    assert "output_index" in dict(ghost.named_buffers())
    assert ghost.state_dict()["output_index"].tolist() == index
    assert ghost.config()["permuted"] is True
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), full[:, index])

    ghost.set_output_index(torch.arange(5))  # the identity is the plain "first out_channels"
    assert ghost.output_index is None and "output_index" not in ghost.state_dict()
    assert ghost.config()["permuted"] is False
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), full[:, :5])

    ghost.set_output_index(torch.tensor([1, 0, 2, 3, 4]))  # and back again
    ghost.set_output_index(None)
    assert ghost.output_index is None and dict(ghost.named_buffers()) == {}

    permuted = GhostConv2d(3, 5, 3, padding=1, ratio=3, permuted=True)
    assert permuted.output_index.tolist() == list(range(5))  # stored, so a saved permutation can load into it
    permuted.set_output_index([0, 1, 2, 3, 5])
    with torch.no_grad():
        assert permuted(x).shape == (2, 5, 5, 5)


@pytest.mark.parametrize(
    "index,match",
    [
        ([0, 1, 2, 3], "5 distinct indices"),
        ([0, 1, 2, 3, 4, 5], "5 distinct indices"),
        ([0, 1, 2, 3, 3], "5 distinct indices"),
        ([0, 1, 2, 3, 6], r"values must lie in 0\.\.5"),
        ([-1, 1, 2, 3, 4], r"values must lie in 0\.\.5"),
        ([[0, 1, 2, 3, 4]], "5 distinct indices"),
    ],
)
def test_set_output_index_rejects_bad_indices(index, match):
    ghost = GhostConv2d(3, 5, 3, ratio=3)
    with pytest.raises(ValueError, match=match):
        ghost.set_output_index(index)
    assert ghost.output_index is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1}, r"GhostConv2d: ratio=1 is out of range; valid range is >= 2 \(an int\)"),
        ({"ratio": 2.5}, r"ratio=2\.5 is not an int"),
        ({"ratio": True}, r"ratio=True is not an int"),
        ({"dw_size": 2}, r"dw_size=2 is out of range; valid range is >= 1 \(an odd int\)"),
        ({"dw_size": 0}, r"dw_size=0 is out of range"),
        ({"in_channels": 0}, r"in_channels=0 is out of range; valid range is 1\.\.\d+ \(an int\)"),
        ({"out_channels": 0}, "out_channels=0 is out of range"),
        ({"norm_layer": lambda c: nn.BatchNorm2d(c)}, "must be a torch.nn class"),
        ({"act_layer": type("MyReLU", (nn.ReLU,), {})}, "must be a torch.nn class"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"in_channels": 4, "out_channels": 8, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        GhostConv2d(**args)


def _randomize_batchnorm(module: nn.Module) -> None:
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("train", [False, True])
def test_norm_act_variant_is_conv_bn_relu_twice(train):
    torch.manual_seed(3)
    ghost = GhostConv2d(3, 7, 3, stride=2, padding=1, ratio=2, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU).double()
    assert isinstance(ghost.primary_conv, nn.Sequential) and isinstance(ghost.cheap_operation, nn.Sequential)
    _randomize_batchnorm(ghost)
    ghost.train(train)
    bn1, bn2 = ghost.primary_conv[1], ghost.cheap_operation[1]
    stats = [t.clone() for t in (bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var)]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = ghost(x)
        p, c = ghost.primary, ghost.cheap
        intrinsic = F.relu(F.batch_norm(F.conv2d(x, p.weight, None, 2, 1), *stats[:2], bn1.weight, bn1.bias, train))
        cheap = F.conv2d(intrinsic, c.weight, None, 1, 1, 1, ghost.intrinsic_channels)
        ghosts = F.relu(F.batch_norm(cheap, *stats[2:], bn2.weight, bn2.bias, train))
    torch.testing.assert_close(out, torch.cat([intrinsic, ghosts], 1)[:, :7])
    # The conv-only form has no norm or activation: negative outputs survive.
    plain = GhostConv2d(3, 7, 3)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in plain.modules())
    assert (plain(x.float()) < 0).any()


@pytest.mark.parametrize("via_json", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm_layer": nn.BatchNorm2d, "act_layer": nn.ReLU, "permuted": True},
        {"stride": 2, "padding": 1, "bias": True, "ratio": 3, "dw_size": 5},
        {"padding": "same", "dilation": 2, "padding_mode": "reflect", "act_layer": nn.Hardswish},
    ],
)
def test_record_round_trip(kwargs, via_json):
    torch.manual_seed(4)
    ghost = GhostConv2d(4, 6, 3, **kwargs)
    _randomize_batchnorm(ghost)
    if kwargs.get("permuted"):
        ghost.set_output_index([5, 3, 1, 0, 2, 4])
    state = ghost.state_dict()
    record = decode_record(state["_extra_state"])
    assert record["kind"] == "GhostConv2d" and record["version"] == 1
    assert record["norm_layer"] == (kwargs["norm_layer"].__name__ if "norm_layer" in kwargs else None)
    assert record["act_layer"] == (kwargs["act_layer"].__name__ if "act_layer" in kwargs else None)
    assert record["permuted"] is bool(kwargs.get("permuted"))
    if via_json:
        record = json.loads(json.dumps(record))

    rebuilt = build_from_record(record)
    assert isinstance(rebuilt, GhostConv2d)
    assert rebuilt.config() == ghost.config()
    rebuilt.load_state_dict(state)
    ghost.eval()
    rebuilt.eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ghost(x))


def test_permuted_checkpoint_needs_restructure():
    ghost = GhostConv2d(4, 6, 3)
    ghost.set_output_index([1, 0, 2, 3, 4, 5])
    assert GhostConv2d(4, 6, 3, permuted=True).load_state_dict(ghost.state_dict())  # same structure: loads
    with pytest.raises(ValueError, match="restructure"):
        GhostConv2d(4, 6, 3).load_state_dict(ghost.state_dict())
    with pytest.raises(ValueError, match="restructure"):
        GhostConv2d(4, 6, 3, ratio=3).set_extra_state(GhostConv2d(4, 6, 3).structure_record())


# --- GhostBottleneck ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_channels,mid_channels,out_channels,stride,se_ratio,input_hw,expected_hw",
    [
        (16, 48, 16, 1, 0.0, (8, 8), (8, 8)),
        (16, 48, 24, 2, 0.0, (8, 8), (4, 4)),
        (16, 48, 24, 2, 0.25, (9, 7), (5, 4)),
        (8, 20, 12, 1, 0.25, (6, 6), (6, 6)),
    ],
)
def test_bottleneck_shapes(in_channels, mid_channels, out_channels, stride, se_ratio, input_hw, expected_hw):
    block = GhostBottleneck(in_channels, mid_channels, out_channels, stride=stride, se_ratio=se_ratio)
    x = torch.randn(2, in_channels, *input_hw, requires_grad=True)
    out = block(x)
    assert out.shape == (2, out_channels, *expected_hw)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (block.se is not None) == (se_ratio > 0)
    assert (block.conv_dw is not None) == (stride == 2)
    if se_ratio > 0:
        assert isinstance(block.se, SqueezeExcite) and isinstance(block.se.gate, nn.Hardsigmoid)
    assert isinstance(block.shortcut, nn.Identity) == (in_channels == out_channels and stride == 1)


def test_bottleneck_identity_shortcut_adds_the_input():
    torch.manual_seed(5)
    block = GhostBottleneck(8, 16, 8, se_ratio=0.25).eval()
    with torch.no_grad():
        for bn in block.ghost2.modules():
            if isinstance(bn, nn.BatchNorm2d):  # the projection's BN outputs zero: only the shortcut remains
                bn.weight.zero_()
                bn.bias.zero_()
        x = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(block(x), x)


def test_bottleneck_bad_arguments():
    with pytest.raises(ValueError, match=r"GhostBottleneck: stride=3 is out of range; valid range is 1\.\.2"):
        GhostBottleneck(8, 16, 8, stride=3)
    with pytest.raises(ValueError, match="stride=True is not an int"):
        GhostBottleneck(8, 16, 8, stride=True)
    with pytest.raises(ValueError, match=r"se_ratio=1\.5 is out of range"):
        GhostBottleneck(8, 16, 8, se_ratio=1.5)
