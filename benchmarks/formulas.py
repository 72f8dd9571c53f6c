"""Parameters and MACs written out from layer shapes: the "recount" column of ``benchmarks/counts.py``.

Nothing here builds a model or runs a FLOP counter. Each architecture is listed layer by layer (channels,
kernel, groups, output size) and added up with these formulas, for one image:

- conv: ``out · (in / groups) · k_h · k_w`` weights (plus ``out`` for a bias); MACs = weights · H_out · W_out
  (the bias is not counted);
- linear: ``in · out`` weights (plus ``out``); MACs = ``in · out``;
- BatchNorm: ``2 · channels`` parameters, no MACs;
- Ghost conv (ratio s, cheap kernel d; Han et al., CVPR 2020): a primary conv ``in -> m = ceil(out / s)`` with
  the original kernel and stride, and a depthwise ``d x d`` conv making ``m · (s - 1)`` ghosts at the primary's
  output size (all of them are computed, then the first ``out`` channels are kept);
- structured conv (Bhalgat et al., NeurIPS 2020): a conv with ``c`` channels per group and an ``n x n`` kernel at
  the original output size; its sum-pool has no parameters and no MACs (its additions are counted apart).

A converted network follows the selection rules of ``convert_to_ghost`` / ``decompose_structured`` (DESIGN.md):
the first conv (the stem) and the last layer stay dense; Ghost leaves depthwise and grouped convs, and convs whose
Ghost form would not have fewer parameters; structured uses ``c = round(C · channel_ratio)`` (at least 1; C is
channels per group) and ``n = k - 1`` (at least 1), and leaves 1x1 convs at ``c = C`` and layers the structure
would not reduce. In every architecture here the last layer is a linear classifier, which both methods keep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Cost", "Counter", "recount", "cifar_resnet56", "cifar_vgg16", "resnet50", "mobilenet_v2", "ghostnet_100"]


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


class Counter:
    """Adds up one network, layer by layer, as ``method`` converts it: ``("original",)``, ``("ghost", s, d)`` or
    ``("structured", channel_ratio)`` (the method tuples of ``benchmarks/counts.py``)."""

    def __init__(self, method: tuple = ("original",)) -> None:
        self.method = method
        self.params = 0
        self.macs = 0
        self._first_conv = True

    def _conv_weights(self, c_in: int, c_out: int, k: int, side: int, groups: int, bias: bool) -> None:
        weights = c_out * (c_in // groups) * k * k
        self.params += weights + (c_out if bias else 0)
        self.macs += weights * side * side

    def norm(self, channels: int) -> None:
        self.params += 2 * channels

    def linear(self, c_in: int, c_out: int, bias: bool = True) -> None:
        self.params += c_in * c_out + (c_out if bias else 0)
        self.macs += c_in * c_out

    def conv(self, c_in: int, c_out: int, k: int, side: int, groups: int = 1, bias: bool = False) -> None:
        """A ``k x k`` conv with output ``side x side``, in the form the method gives it (no BatchNorm: see
        :meth:`norm`)."""
        first, self._first_conv = self._first_conv, False
        kind = self.method[0]
        if first or kind == "original":
            self._conv_weights(c_in, c_out, k, side, groups, bias)
        elif kind == "ghost":
            self._ghost(c_in, c_out, k, side, groups, bias)
        else:
            self._structured(c_in, c_out, k, side, groups, bias)

    def _ghost(self, c_in: int, c_out: int, k: int, side: int, groups: int, bias: bool) -> None:
        _, ratio, dw_size = self.method
        m = math.ceil(c_out / ratio)
        ghost_params = m * c_in * k * k + m * (ratio - 1) * dw_size * dw_size + (m * ratio if bias else 0)
        if groups > 1 or c_out < ratio or ghost_params >= c_out * c_in * k * k + (c_out if bias else 0):
            self._conv_weights(c_in, c_out, k, side, groups, bias)
            return
        self._conv_weights(c_in, m, k, side, 1, bias)  # primary
        self._conv_weights(m, m * (ratio - 1), dw_size, side, m, bias)  # cheap depthwise

    def _structured(self, c_in: int, c_out: int, k: int, side: int, groups: int, bias: bool) -> None:
        per_group = c_in // groups
        c = min(per_group, max(1, round(per_group * self.method[1])))
        n = max(1, k - 1)
        if (c, n) == (per_group, k):  # 1x1 at c = C, or nothing to reduce
            self._conv_weights(c_in, c_out, k, side, groups, bias)
            return
        weights = c_out * c * n * n
        self.params += weights + (c_out if bias else 0)
        self.macs += weights * side * side


def recount(architecture: Callable[[Counter], None], method: tuple = ("original",)) -> Cost:
    """Parameters (BatchNorm included) and MACs of one image through ``architecture`` converted by ``method``."""
    counter = Counter(method)
    architecture(counter)
    return Cost(counter.params, counter.macs)


def cifar_resnet56(net: Counter) -> None:
    """He et al., CVPR 2016, section 4.2, at 32x32: a 3x3 stem 3 -> 16, three stages of 9 basic blocks (two 3x3
    convs + BN; the first conv of stages 2 and 3 has stride 2) at 16/32/64 channels, parameter-free shortcuts,
    global pooling and a 64 -> 10 classifier."""
    net.conv(3, 16, 3, 32)
    net.norm(16)
    c_in = 16
    for width, side in ((16, 32), (32, 16), (64, 8)):
        for _ in range(2 * 9):
            net.conv(c_in, width, 3, side)
            net.norm(width)
            c_in = width
    net.linear(64, 10)


def cifar_vgg16(net: Counter) -> None:
    """The GhostNet paper's CIFAR VGG-16: 13 bias-free 3x3 convs + BN ("M": a 2x2 max-pool), a 512-512-10
    classifier."""
    c_in, side = 3, 32
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if item == "M":
            side //= 2
            continue
        net.conv(c_in, item, 3, side)
        net.norm(item)
        c_in = item
    net.linear(512, 512)
    net.linear(512, 10)


def resnet50(net: Counter) -> None:
    """torchvision ResNet-50 at 224x224: a 7x7 stride-2 stem 3 -> 64 (112x112) and a max-pool (56x56); bottlenecks
    1x1 -> 3x3 (stride here) -> 1x1 (x4 channels), each conv with BN, and a strided 1x1 + BN downsample in each
    stage's first block; [3, 4, 6, 3] blocks at widths 64/128/256/512; a 2048 -> 1000 classifier."""
    net.conv(3, 64, 7, 112)
    net.norm(64)
    c_in, side = 64, 56
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            out_side = side // stride if block == 0 else side
            for a, b, k, s in ((c_in, width, 1, side), (width, width, 3, out_side), (width, 4 * width, 1, out_side)):
                net.conv(a, b, k, s)
                net.norm(b)
            if block == 0:
                net.conv(c_in, 4 * width, 1, out_side)
                net.norm(4 * width)
            c_in, side = 4 * width, out_side
    net.linear(2048, 1000)


def mobilenet_v2(net: Counter) -> None:
    """torchvision MobileNetV2 (width 1.0) at 224x224: a 3x3 stride-2 stem 3 -> 32; inverted residuals (1x1
    expansion by t unless t = 1, 3x3 depthwise with the stride, 1x1 projection; each conv with BN) for the
    (t, channels, blocks, stride) settings below; a 1x1 conv 320 -> 1280 + BN; a 1280 -> 1000 classifier."""
    net.conv(3, 32, 3, 112)
    net.norm(32)
    c_in, side = 32, 112
    for t, c_out, blocks, stride in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for block in range(blocks):
            hidden = c_in * t
            out_side = side // stride if block == 0 else side
            if t != 1:
                net.conv(c_in, hidden, 1, side)
                net.norm(hidden)
            net.conv(hidden, hidden, 3, out_side, groups=hidden)
            net.norm(hidden)
            net.conv(hidden, c_out, 1, out_side)
            net.norm(c_out)
            c_in, side = c_out, out_side
    net.conv(320, 1280, 1, 7)
    net.norm(1280)
    net.linear(1280, 1000)


def _make_divisible(value: float, divisor: int) -> int:
    """MobileNet/GhostNet channel rounding: the nearest multiple of ``divisor``, not below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _ghost_module(net: Counter, c_in: int, c_out: int, side: int) -> None:
    """GhostNet's own Ghost module (ratio 2, 1x1 primary, 3x3 cheap conv), each conv followed by BN."""
    m = math.ceil(c_out / 2)
    net.conv(c_in, m, 1, side)
    net.norm(m)
    net.conv(m, m, 3, side, groups=m)
    net.norm(m)


def ghostnet_100(net: Counter) -> None:
    """GhostNet 1.0x (Han et al., CVPR 2020; the layout of the released code and timm) at 224x224: a 3x3 stride-2
    stem 3 -> 16; Ghost bottlenecks (kernel, mid, out, SE ratio, stride) below: Ghost module in -> mid, a strided
    depthwise conv + BN when stride 2, squeeze-excite (mid -> make_divisible(mid / 4, 4) -> mid, 1x1 convs with
    bias on the pooled map), Ghost module mid -> out, and a shortcut (depthwise k x k + BN, 1x1 + BN) where the
    shape changes; a 1x1 conv 160 -> 960 + BN at 7x7; after pooling a 1x1 conv 960 -> 1280 with bias and a
    1280 -> 1000 classifier."""
    blocks = (
        (3, 16, 16, 0, 1), (3, 48, 24, 0, 2), (3, 72, 24, 0, 1), (5, 72, 40, 0.25, 2), (5, 120, 40, 0.25, 1),
        (3, 240, 80, 0, 2), (3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1), (5, 672, 160, 0.25, 2), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1),
    )  # fmt: skip
    net.conv(3, 16, 3, 112)
    net.norm(16)
    c_in, side = 16, 112
    for k, mid, c_out, se_ratio, stride in blocks:
        out_side = side // stride
        _ghost_module(net, c_in, mid, side)
        if stride > 1:
            net.conv(mid, mid, k, out_side, groups=mid)
            net.norm(mid)
        if se_ratio:
            reduced = _make_divisible(mid * se_ratio, 4)
            net.conv(mid, reduced, 1, 1, bias=True)
            net.conv(reduced, mid, 1, 1, bias=True)
        _ghost_module(net, mid, c_out, out_side)
        if c_in != c_out or stride > 1:
            net.conv(c_in, c_in, k, out_side, groups=c_in)
            net.norm(c_in)
            net.conv(c_in, c_out, 1, out_side)
            net.norm(c_out)
        c_in, side = c_out, out_side
    net.conv(160, 960, 1, 7)
    net.norm(960)
    net.conv(960, 1280, 1, 1, bias=True)
    net.linear(1280, 1000)
