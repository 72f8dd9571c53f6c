"""Ghost weight inheritance (lightning_cheapconv/inherit.py, via convert.ghost_from_conv)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_cheapconv.convert import capture_inputs, convert_to_ghost, ghost_from_conv
from lightning_cheapconv.inherit import (
    _finish,
    _PairFits,
    assign_ghosts,
    fit_ghost_from_activations,
    fit_ghost_from_kernels,
    ghost_output_errors,
)
from lightning_cheapconv.nn import GhostConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _channel_errors(a: torch.Tensor, b: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """Relative error of ``a`` against ``b`` per output channel, optionally away from the borders."""
    if crop:
        a, b = a[..., crop:-crop, crop:-crop], b[..., crop:-crop, crop:-crop]
    return (a - b).pow(2).sum((0, 2, 3)).sqrt() / b.pow(2).sum((0, 2, 3)).sqrt()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _exact_ghost_conv(
    in_channels: int,
    out_channels: int,
    ratio: int,
    support: int = 3,
    step: int = 1,
    stride: int = 1,
    dilation: int = 1,
    bias: bool = False,
    seed: int = 0,
) -> tuple[nn.Conv2d, torch.Tensor]:
    """A conv whose filters are exact ghosts, in shuffled order (DESIGN.md section 3).

    ``m`` intrinsic filters have a ``support x support`` centre inside a kernel of size
    ``support + 2·step``; ghost ``t`` of intrinsic ``t // (ratio-1)`` is the composite
    ``sum_q D_t[q] · shift(W_i, step·q)`` (kernel-index shifts, ``q`` in ``{-1, 0, 1}²``), i.e. a
    3x3 depthwise kernel on the output grid for stride 1 (step 1) or stride 2 (step 2), or a 5x5 one
    with taps two pixels apart for dilation 2 (step 1). Returns the conv and ``perm`` (conv filter
    ``j`` is planted filter ``perm[j]``; planted filters ``< m`` are the intrinsics).
    """
    gen = torch.Generator().manual_seed(seed)
    m = math.ceil(out_channels / ratio)
    size = support + 2 * step
    intrinsic = F.pad(torch.randn(m, in_channels, support, support, generator=gen), (step,) * 4)
    dw = torch.randn(out_channels - m, 3, 3, generator=gen)
    ghosts = []
    for t in range(out_channels - m):
        kernel = torch.zeros(in_channels, size, size)
        for a in range(3):
            for b in range(3):
                shifts = (step * (a - 1), step * (b - 1))
                kernel += dw[t, a, b] * torch.roll(intrinsic[t // (ratio - 1)], shifts, dims=(1, 2))
        ghosts.append(kernel)
    filters = torch.cat([intrinsic, torch.stack(ghosts)])
    perm = torch.randperm(out_channels, generator=gen)
    conv = nn.Conv2d(in_channels, out_channels, size, stride, dilation * (size // 2), dilation, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(filters[perm])
        if bias:
            conv.bias.copy_(torch.randn(out_channels, generator=gen))
    return conv, perm


@pytest.mark.parametrize(
    "in_channels,out_channels,ratio,step,stride,dilation,dw_size,bias",
    [
        (4, 8, 2, 1, 1, 1, 3, False),
        (4, 8, 2, 1, 1, 1, 3, True),
        (5, 12, 3, 1, 1, 1, 3, True),
        (3, 7, 3, 1, 1, 1, 3, False),  # m = 3 intrinsics, 4 ghosts in 6 slots, 9 channels made, 7 kept
        (4, 8, 2, 2, 2, 1, 3, True),  # stride 2: the depthwise kernel steps two input pixels
        (4, 8, 2, 1, 1, 2, 5, False),  # dilation 2: a 5x5 depthwise kernel with taps two pixels apart
    ],
)
def test_exact_ghosts_are_reproduced_in_the_original_order(
    in_channels, out_channels, ratio, step, stride, dilation, dw_size, bias
):
    conv, perm = _exact_ghost_conv(
        in_channels, out_channels, ratio, step=step, stride=stride, dilation=dilation, bias=bias
    )
    ghost, error = ghost_from_conv(conv, ratio=ratio, dw_size=dw_size, init="inherit")
    m = math.ceil(out_channels / ratio)
    assert isinstance(ghost, GhostConv2d) and ghost.intrinsic_channels == m
    assert error is not None and error < 1e-3  # kernel-space fit is exact (float32 cancellation aside)

    x = torch.randn(2, in_channels, 21, 21)
    with torch.no_grad():
        expected, out = conv(x), ghost(x)
    assert out.shape == expected.shape
    # Channel by channel, in the conv's own order, away from the borders (where the depthwise conv
    # pads the intrinsic map with zeros instead of seeing it extended).
    errors = _channel_errors(out, expected, crop=dw_size // 2)
    assert errors.max() < 1e-4, errors
    # The planted intrinsic filters became the primary conv, unchanged; they are exact everywhere.
    planted = sorted((perm < m).nonzero().flatten().tolist())
    rows = [
        next(j for j in range(out_channels) if torch.equal(ghost.primary.weight[r], conv.weight[j])) for r in range(m)
    ]
    assert sorted(rows) == planted
    assert _channel_errors(out, expected)[planted].max() < 1e-6


@pytest.mark.parametrize("bias", [False, True])
def test_exact_ghosts_with_a_calibration_batch(bias):
    conv, _ = _exact_ghost_conv(4, 8, 2, bias=bias, seed=1)
    calibration = torch.randn(4, 4, 24, 24)
    fitted, error = ghost_from_conv(conv, 2, 3, calibration_input=calibration)
    exact, _ = ghost_from_conv(conv, 2, 3)  # kernel space: exact away from the borders
    x = torch.randn(2, 4, 24, 24)
    with torch.no_grad():
        expected, out = conv(x), fitted(x)
        # The activation fit also weighs the border pixels, which no depthwise kernel gets exactly
        # right: close in the interior, and on its own batch at least as good as the exact kernels.
        assert _channel_errors(out, expected, crop=1).max() < 0.05
        reference = conv(calibration)
        assert _relative(fitted(calibration), reference) <= _relative(exact(calibration), reference) * (1 + 1e-4)
    assert error < 0.25


@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_1x1_ghosts_are_scaled_copies(calibrate, bias):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 16, 1, 1, generator=gen)
    scale = torch.tensor([0.5, -2.0, 3.0, 1.5])
    filters = torch.cat([base, base * scale[:, None, None, None]])
    perm = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
    conv = nn.Conv2d(16, 8, 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(filters[perm])
        if bias:
            conv.bias.copy_(torch.randn(8, generator=gen))
    x = torch.randn(3, 16, 5, 7, generator=gen)
    ghost, error = ghost_from_conv(conv, 2, 3, calibration_input=x if calibrate else None)
    assert error < 1e-3
    cheap = ghost.cheap.weight.detach()[:, 0]
    off_centre = cheap.clone()
    off_centre[:, 1, 1] = 0.0
    assert off_centre.abs().max() < 1e-5  # centre tap only (exactly zero in kernel space)
    if not calibrate:
        assert torch.count_nonzero(off_centre) == 0
    # Either of a pair may become the intrinsic: the tap is the scale or its inverse.
    folded = sorted(min(abs(v), 1 / abs(v)) for v in cheap[:, 1, 1].tolist())
    assert folded == pytest.approx(sorted(min(abs(v), 1 / abs(v)) for v in scale.tolist()), rel=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), conv(x), rtol=1e-4, atol=1e-4)  # everywhere, borders too


def test_dilation_with_a_small_depthwise_kernel_keeps_intrinsics_exact():
    # Taps one pixel apart cannot reach a dilated kernel's grid: only the centre tap fits (a scaled copy).
    conv, perm = _exact_ghost_conv(4, 8, 2, step=1, dilation=2, seed=3)
    ghost, error = ghost_from_conv(conv, 2, 3)
    assert math.isfinite(error) and 0.1 < error < 1.0
    cheap = ghost.cheap.weight.detach()[:, 0]
    off_centre = cheap.clone()
    off_centre[:, 1, 1] = 0.0
    assert torch.count_nonzero(off_centre) == 0 and torch.count_nonzero(cheap) == 4
    x = torch.randn(2, 4, 20, 20)
    with torch.no_grad():
        expected, out = conv(x), ghost(x)
    errors = _channel_errors(out, expected)
    intrinsic = [j for j in range(8) if any(torch.equal(conv.weight[j], w) for w in ghost.primary.weight)]
    assert len(intrinsic) == 4
    assert errors[intrinsic].max() < 1e-6  # copies, in their original positions
    assert torch.isfinite(errors).all() and errors.max() < 1.2  # ghosts: about as bad as a zero output at worst


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_kernel_fit_error_is_the_composite_kernel_error(stride, dilation):
    # For stride 1 the composite kernel is the full convolution of W_i with D; check the reported
    # error against it. For stride/dilation 2 the intrinsics stay exact and the error is finite.
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 10, 3, stride, padding=dilation, dilation=dilation, bias=False)
    fit = fit_ghost_from_kernels(conv, ratio=2, dw_size=3)
    assert len(fit.intrinsics) == 5 and len(fit.ghost_of) == 5
    assert set(fit.intrinsics.tolist()).isdisjoint(fit.ghost_of)
    assert sorted(fit.ghost_of.values()) == list(range(5))  # one ghost per slot
    assert all(k.shape == (3, 3) for k in fit.kernels.values()) and fit.bias_shift == {}
    assert 0.0 < fit.relative_error < 1.0
    if (stride, dilation) != (1, 1):
        return
    weight = conv.weight.detach()
    squared = 0.0
    for filt, slot in fit.ghost_of.items():
        source = weight[fit.intrinsics[slot]].unsqueeze(1)  # (C, 1, 3, 3)
        composite = F.conv_transpose2d(source, fit.kernels[filt].view(1, 1, 3, 3))[:, 0]  # (C, 5, 5)
        squared += (composite - F.pad(weight[filt], (1, 1, 1, 1))).pow(2).sum().item()
    assert fit.relative_error == pytest.approx(math.sqrt(squared / weight.pow(2).sum().item()), rel=1e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_activation_fit_error_is_the_output_error_on_the_calibration_batch(bias):
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=bias)
    inputs = torch.relu(F.avg_pool2d(torch.randn(16, 8, 18, 18), 3, 1))  # smooth, non-negative, 16·16² positions
    ghost, error = ghost_from_conv(conv, 3, 3, calibration_input=inputs)
    with torch.no_grad():
        expected, out = conv(inputs), ghost(inputs)
    # Reported: the output error on the batch itself, relative to the output's energy (about each
    # channel's mean when the ghosts get their own bias, the least-squares intercept).
    energy = expected - expected.mean((0, 2, 3), keepdim=True) if bias else expected
    assert error == pytest.approx(float((out - expected).norm() / energy.norm()), rel=1e-3)
    if bias:  # the intercept leaves no mean offset in any channel
        assert (out - expected).mean((0, 2, 3)).abs().max() < 1e-4 * expected.abs().mean()
    kernel_ghost, _ = ghost_from_conv(conv, 3, 3)
    with torch.no_grad():
        assert (out - expected).norm() <= (kernel_ghost(inputs) - expected).norm() * (1.0 + 1e-3)
    # Fewer positions than the batch has are sampled, and the fit still works.
    fit = fit_ghost_from_activations(conv, inputs, 3, 3, max_positions=500)
    assert len(fit.intrinsics) == 4 and 0.0 < fit.relative_error < 1.0


def test_assign_ghosts_recovers_a_planted_pairing():
    count, ratio = 9, 3
    errors = torch.ones(count, count)
    planted = {0: [4, 7], 5: [1, 2], 8: [3, 6]}
    for owner, ghosts in planted.items():
        errors[owner, ghosts] = 0.0
    intrinsics, ghost_of = assign_ghosts(errors, ratio)
    assert sorted(intrinsics) == [0, 5, 8]
    assert ghost_of == {g: o for o, gs in planted.items() for g in gs}


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(2, 14),
    ratio=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_assign_ghosts_partitions_the_filters(count, ratio, seed):
    if ratio > count:
        ratio = count
    errors = torch.rand(count, count, generator=torch.Generator().manual_seed(seed))
    intrinsics, ghost_of = assign_ghosts(errors, ratio)
    assert len(intrinsics) == len(set(intrinsics)) == math.ceil(count / ratio)
    assert set(intrinsics).isdisjoint(ghost_of)
    assert set(intrinsics) | set(ghost_of) == set(range(count))
    assert set(ghost_of.values()) <= set(intrinsics)
    load = {i: list(ghost_of.values()).count(i) for i in intrinsics}
    assert max(load.values()) <= ratio - 1


# ----------------------------------------------------------------------------- quality on real data


def _digits_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),  # "7": the 32 -> 32 conv under study
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def trained_digits():
    """A small conv net trained for 60 steps on scikit-learn's digits (8x8 upsampled to 16x16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=gen)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = _digits_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        batch = train[torch.randint(len(train), (64,), generator=gen)]
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, images[train[:256]], images[test], labels[test]


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).float().mean().item()


def test_inherited_layer_error_is_far_below_random(trained_digits):
    model, calibration, test_images, test_labels = trained_digits
    assert _accuracy(model, test_images, test_labels) > 0.8  # the net learned something: its convs are not random
    conv = model[7]
    layer_input = capture_inputs(model, test_images, ["7"])["7"]  # held-out digits, as the layer sees them
    calibration_input = capture_inputs(model, calibration, ["7"])["7"]
    with torch.no_grad():
        reference = conv(layer_input)

    def layer_error(ghost: nn.Module) -> float:
        with torch.no_grad():
            return _relative(ghost(layer_input), reference)

    torch.manual_seed(0)
    random_error = layer_error(ghost_from_conv(conv, 2, 3, init="random")[0])
    kernel_error = layer_error(ghost_from_conv(conv, 2, 3, init="inherit")[0])
    activation_error = layer_error(ghost_from_conv(conv, 2, 3, calibration_input=calibration_input)[0])
    print(
        f"\nrelative output error of conv 32->32 on held-out digits: random {random_error:.3f}, "
        f"inherit (kernel space) {kernel_error:.3f}, inherit (activation space) {activation_error:.3f}"
    )
    assert random_error > 0.8
    assert kernel_error < 0.75 * random_error
    assert activation_error < 0.5 * random_error
    assert activation_error <= kernel_error


def test_inherited_network_accuracy_is_far_above_random(trained_digits):
    model, calibration, test_images, test_labels = trained_digits
    trained = _accuracy(model, test_images, test_labels)
    accuracies = {}
    for scope, include in (("conv 7 only", "7"), ("every conv but the first", None)):
        for label, kwargs in (
            ("random", {"init": "random"}),
            ("inherit/kernel", {"init": "inherit"}),
            ("inherit/activation", {"init": "inherit", "calibration": calibration}),
        ):
            converted = copy.deepcopy(model)
            torch.manual_seed(0)
            convert_to_ghost(converted, include=include, **kwargs)
            accuracies[scope, label] = _accuracy(converted, test_images, test_labels)
    print(f"\ndigits test accuracy: trained {trained:.3f}")
    for (scope, label), value in accuracies.items():
        print(f"  right after conversion ({scope}), {label}: {value:.3f}")
    for scope in ("conv 7 only", "every conv but the first"):
        assert accuracies[scope, "random"] < 0.25  # chance is 0.1
    assert accuracies["conv 7 only", "inherit/activation"] > accuracies["conv 7 only", "random"] + 0.3
    every = "every conv but the first"
    assert accuracies[every, "inherit/activation"] > accuracies[every, "random"] + 0.1


# ----------------------------------------------------------------------------- activation fit: memory, arguments


def _unfold_reference(conv: nn.Conv2d, inputs: torch.Tensor, dw_size: int, max_positions: int):
    """The centred least-squares terms as the activation fit first computed them: unfold the whole output map
    (``d²`` times the output, plus a permuted copy), then subsample positions."""
    with torch.no_grad():
        outputs = conv(inputs)
    batch, channels, height, width = outputs.shape
    patches = F.unfold(outputs, dw_size, padding=dw_size // 2)
    patches = patches.reshape(batch, channels, dw_size * dw_size, height * width).permute(1, 2, 0, 3)
    patches = patches.reshape(channels, dw_size * dw_size, batch * height * width)
    targets = outputs.permute(1, 0, 2, 3).reshape(channels, -1)
    if targets.shape[1] > max_positions:
        keep = torch.randperm(targets.shape[1], generator=torch.Generator().manual_seed(0))[:max_positions]
        patches, targets = patches[:, :, keep], targets[:, keep]
    return patches, targets


@pytest.mark.parametrize(
    "shape,dw_size,max_positions",
    [((3, 5, 9, 7), 3, 16384), ((2, 5, 6, 6), 5, 16384), ((4, 5, 20, 20), 3, 500), ((1, 5, 1, 1), 3, 16384)],
    ids=["3x3", "5x5", "subsampled", "1-pixel"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_activation_fit_gathers_exactly_what_unfolding_gave(shape, dw_size, max_positions, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 12, 3, padding=1, bias=bias)
    x = torch.randn(shape)
    patches, targets = _unfold_reference(conv, x, dw_size, max_positions)
    fit = fit_ghost_from_activations(conv, x, 3, dw_size, max_positions)
    # The same least squares from the reference terms: the fit must be bit-identical.
    centred = (patches - patches.mean(-1, keepdim=True), targets - targets.mean(-1, keepdim=True)) if bias else None
    p, t = centred or (patches, targets)
    expected = _finish(_PairFits(p @ p.transpose(1, 2), torch.einsum("iqn,on->ioq", p, t), t.pow(2).sum(1), dw_size), 3)
    assert torch.equal(fit.intrinsics, expected.intrinsics) and fit.ghost_of == expected.ghost_of
    assert all(torch.equal(fit.kernels[g], expected.kernels[g]) for g in expected.kernels)
    assert fit.relative_error == expected.relative_error


_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize(
    "dims,spatial,max_positions",
    [(2, (9, 7), 16384), (2, (12, 12), 100), (1, (30,), 16384), (3, (4, 5, 6), 64)],
    ids=["2d", "2d-subsampled", "1d", "3d-subsampled"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_output_errors_are_the_activation_fit_errors(dims, spatial, max_positions, bias):
    """One implementation: each ratio's output error is the squared relative error of the fit that inheritance on
    activations makes from the same outputs and positions."""
    torch.manual_seed(0)
    conv = _CONV_BY_DIMS[dims](5, 12, 3, padding=1, bias=bias)
    x = torch.randn(3, 5, *spatial)
    with torch.no_grad():
        errors = ghost_output_errors(conv(x), (2, 3, 4), 3, bias, max_positions)
    for ratio in (2, 3, 4):
        fit = fit_ghost_from_activations(conv, x, ratio, 3, max_positions)
        assert errors[ratio] == pytest.approx(fit.relative_error**2, rel=1e-12, abs=0)
    assert 0 < errors[2] < 1 and 0 < errors[4] < 1


@pytest.mark.parametrize("bias", [False, True])
def test_output_errors_are_the_converted_layers_measured_error(bias):
    """Fitted on every position, the error is what the Ghost module built by inheritance really makes: the squared
    relative error of its output (around the means with a bias: the ghosts' intercepts are fitted)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 3, padding=1, bias=bias)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        y = conv(x)
        ghost, _ = ghost_from_conv(conv, 2, 3, "inherit", x)
        energy = (y - y.mean((0, 2, 3), keepdim=True) if bias else y).pow(2).sum()
        measured = float((ghost(x) - y).pow(2).sum() / energy)
        errors = ghost_output_errors(y, (2,), 3, bias)
    assert measured > 0.05  # a real approximation, not a trivial one
    assert errors[2] == pytest.approx(measured, rel=1e-4)


_PEAK_SCRIPT = """
import resource, sys, torch
from torch import nn
from lightning_cheapconv.inherit import fit_ghost_from_activations
torch.set_num_threads(1)
conv, x = nn.Conv2d(16, 64, 3, padding=1), torch.randn(8, 16, 128, 128)
fit_ghost_from_activations(conv, x[:1, :, :8, :8], 2, 3)  # load kernels and libraries first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fit_ghost_from_activations(conv, x, 2, 3, max_positions=4096)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_activation_fit_peak_memory_is_bounded_by_the_output_not_its_unfolding():
    output_bytes = 8 * 64 * 128 * 128 * 4  # 33.6 MB; unfolding it took 9x that, twice (~19x with the targets)
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True)
    growth = int(done.stdout.split()[-1])
    # The output itself, its (O, d², 4096) neighbourhoods (9.4 MB), the conv's workspace and small terms: measured
    # 2.4x the output (81 MB) on torch 2.14 CPU, against ~19x (640 MB) when the whole map was unfolded.
    assert growth < 4 * output_bytes, f"peak grew by {growth / 1e6:.0f} MB for a {output_bytes / 1e6:.0f} MB output"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda c: fit_ghost_from_kernels(c, 1, 3, name="c1"), "c1: ratio=1 is out of range"),
        (lambda c: fit_ghost_from_kernels(c, 2, 4, name="c1"), r"c1: dw_size=4 is out of range; .*odd"),
        (lambda c: fit_ghost_from_kernels(nn.Linear(2, 2), 2, 3), "conv must be a Conv1d or Conv2d or Conv3d"),
        (lambda c: fit_ghost_from_kernels(nn.Conv2d(4, 8, 3, groups=2), 2, 3), "groups=2; Ghost weight inheritance"),
        (lambda c: fit_ghost_from_activations(c, torch.randn(2, 3, 6, 6), 2, 3, name="c1"), r"c1: inputs of shape"),
        (lambda c: fit_ghost_from_activations(c, torch.randn(4, 6, 6), 2, 3, name="c1"), r"\(B, 4, H, W\)"),
        (lambda c: fit_ghost_from_activations(c, torch.randn(2, 4, 6, 6), 2, 3, 0), "max_positions=0 is out of range"),
        (
            lambda c: fit_ghost_from_activations(c, torch.full((2, 4, 6, 6), float("nan")), 2, 3, name="c1"),
            r"c1: inputs \(shape \(2, 4, 6, 6\)\) has 288 non-finite",
        ),
        (lambda c: ghost_output_errors(torch.randn(2, 8), (2,), name="c1"), r"c1: outputs of shape \(2, 8\) are not"),
        (lambda c: ghost_output_errors(torch.randn(2, 8, 4, 4), (1,), name="c1"), "c1: ratio=1 is out of range"),
        (lambda c: ghost_output_errors(torch.randn(2, 8, 4, 4), (2,), 2, name="c1"), "c1: dw_size=2 is out of range"),
        (lambda c: ghost_output_errors(torch.randn(2, 8, 4), (2,), max_positions=0), "max_positions=0 is out of range"),
        (
            lambda c: ghost_output_errors(torch.full((1, 2, 2), float("nan")), (2,), name="c1"),
            r"c1: outputs \(shape \(1, 2, 2\)\) has 4 non-finite",
        ),
        (lambda c: assign_ghosts(torch.rand(4, 3), 2), r"errors must be a non-empty square \(O, O\) matrix"),
        (lambda c: assign_ghosts(torch.full((4, 4), float("nan")), 2), "errors .* non-finite"),
        (lambda c: assign_ghosts(torch.rand(4, 4), 1.5), "assign_ghosts: ratio=1.5 is not an int"),
    ],
)
def test_fit_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call(nn.Conv2d(4, 8, 3, padding=1))


@pytest.mark.parametrize("calibrate", [False, True])
def test_non_finite_weights_are_refused_by_name_instead_of_failing_inside_the_fit(calibrate):
    conv = nn.Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight[2, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer3\.conv1\.weight \(shape \(8, 4, 3, 3\)\) has 1 non-finite"):
        ghost_from_conv(conv, calibration_input=torch.randn(2, 4, 6, 6) if calibrate else None, name="layer3.conv1")
