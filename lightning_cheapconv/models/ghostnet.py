"""GhostNet (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020).

Built from this library's :class:`~lightning_cheapconv.nn.GhostBottleneck` and
:class:`~lightning_cheapconv.nn.GhostConv2d`, with the layout of the paper's released code and of
timm's ``ghostnet.py`` (v1), so that parameter and MAC counts match timm's ``ghostnet_050`` /
``ghostnet_100`` / ``ghostnet_130``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..nn import GhostBottleneck
from ..nn.functional import make_divisible

__all__ = ["GHOSTNET_CFGS", "GhostNet", "ghostnet_050", "ghostnet_100", "ghostnet_130"]

# Per stage, per block: kernel size, expansion (mid) channels, output channels, SE ratio, stride.
GHOSTNET_CFGS: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0, 2),),
    (
        (3, 200, 80, 0, 1),
        (3, 184, 80, 0, 1),
        (3, 184, 80, 0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ),
    ((5, 672, 160, 0.25, 2),),
    (
        (5, 960, 160, 0, 1),
        (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0, 1),
        (5, 960, 160, 0.25, 1),
    ),
)


class GhostNet(nn.Module):
    """GhostNet: a MobileNetV3-like network of Ghost bottlenecks, scaled by ``width``.

    From Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020. Layout (as in
    timm's ``ghostnet.py``): stem ``conv_stem`` (3x3, stride 2, ``make_divisible(16·width, 4)``
    channels) + BN + ReLU; ``blocks`` = the stages of :class:`GhostBottleneck` from
    :data:`GHOSTNET_CFGS` (channels ``make_divisible(c·width, 4)``) and a final 1x1 conv + BN + ReLU
    to ``make_divisible(960·width, 4)``; global average pool; ``conv_head`` (1x1 to 1280, with
    bias) + ReLU; dropout; ``classifier`` (linear). At 224x224 with 1000 classes, width 0.5 / 1.0 /
    1.3: 2,587,292 / 5,182,508 / 7,358,820 params and 42.3M / 141.2M / 227.0M MACs.

    Example::

        >>> model = GhostNet(width=1.0, num_classes=1000)
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.2,
        num_features: int = 1280,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"GhostNet: width={width} is out of range; valid range is > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GhostNet: dropout={dropout} is out of range; valid range is [0, 1)")
        self.width, self.num_classes, self.num_features = width, num_classes, num_features
        stem_channels = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.act1 = nn.ReLU(inplace=True)
        channels = stem_channels
        stages: list[nn.Module] = []
        for stage_cfg in GHOSTNET_CFGS:
            layers = []
            for kernel_size, expansion, out, se_ratio, stride in stage_cfg:
                out_channels = make_divisible(out * width, 4)
                mid_channels = make_divisible(expansion * width, 4)
                layers.append(
                    GhostBottleneck(channels, mid_channels, out_channels, kernel_size, stride, se_ratio=se_ratio)
                )
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        last_channels = make_divisible(GHOSTNET_CFGS[-1][-1][1] * width, 4)
        stages.append(
            nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(channels, last_channels, 1, bias=False),
                    bn=nn.BatchNorm2d(last_channels),
                    act=nn.ReLU(inplace=True),
                )
            )
        )
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(last_channels, num_features, 1, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and blocks: the feature map before pooling (``960·width`` channels, stride 32)."""
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        """Pool, ``conv_head``, ReLU, dropout and the classifier."""
        x = self.flatten(self.act2(self.conv_head(self.global_pool(x))))
        return self.classifier(self.dropout(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"width={self.width}, num_classes={self.num_classes}"


def ghostnet_050(num_classes: int = 1000, dropout: float = 0.2) -> GhostNet:
    """GhostNet 0.5x (Han et al., CVPR 2020). 2,587,292 params, 42.3M MACs at 224x224 (1000 classes)."""
    return GhostNet(0.5, num_classes=num_classes, dropout=dropout)


def ghostnet_100(num_classes: int = 1000, dropout: float = 0.2) -> GhostNet:
    """GhostNet 1.0x (Han et al., CVPR 2020). 5,182,508 params, 141.2M MACs at 224x224 (1000 classes)."""
    return GhostNet(1.0, num_classes=num_classes, dropout=dropout)


def ghostnet_130(num_classes: int = 1000, dropout: float = 0.2) -> GhostNet:
    """GhostNet 1.3x (Han et al., CVPR 2020). 7,358,820 params, 227.0M MACs at 224x224 (1000 classes)."""
    return GhostNet(1.3, num_classes=num_classes, dropout=dropout)
