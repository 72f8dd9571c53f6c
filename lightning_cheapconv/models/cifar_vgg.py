"""VGG-16 for CIFAR (Simonyan & Zisserman, ICLR 2015), with BatchNorm, as in the GhostNet paper's
CIFAR-10 experiments (Han et al., CVPR 2020, Table 3: 15.0M parameters, 313M MACs).

Which configuration matches the paper's count: 13 bias-free 3x3 convs, each followed by BatchNorm
and ReLU, and a classifier with feature widths 512-512-10, i.e. two linear layers (512->512, ReLU,
dropout, 512->10): 14,986,698 parameters (BN included) and 313.5M MACs at 32x32. Three linear
layers (512->512->512->10) would give 15.25M; a single one (512->10) 14.72M. The Ghost-VGG-16 count
of the paper (7.7M at s=2) also matches only the two-layer classifier (7.65M analytically).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CifarVGG", "VGG16_CFG", "vgg16"]

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG for 32x32 images: 3x3 conv + BN + ReLU layers and 2x2 max-pools (``features``), then a
    512-512-``num_classes`` classifier (``classifier``).

    From Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
    ICLR 2015, in the CIFAR-10 form the GhostNet paper (Han et al., CVPR 2020) compresses. Every
    conv is a bias-free ``nn.Conv2d`` followed by ``nn.BatchNorm2d``, so converters replace the
    convs alone. ``cfg`` lists conv widths, with ``"M"`` for a max-pool.

    Example::

        >>> model = CifarVGG(VGG16_CFG, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...] | list[int | str] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"CifarVGG: dropout={dropout} is out of range; valid range is [0, 1)")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            elif isinstance(item, int) and item > 0:
                layers += [nn.Conv2d(channels, item, 3, 1, 1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
            else:
                raise ValueError(f"CifarVGG: cfg entries must be positive ints or 'M', got {item!r}")
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def vgg16(num_classes: int = 10, dropout: float = 0.5) -> CifarVGG:
    """CIFAR VGG-16 with BN and a 512-512-10 classifier (GhostNet paper, Table 3).

    14,986,698 params (BN included), 313.5M MACs at 32x32 (10 classes); the paper: 15.0M / 313M.
    """
    return CifarVGG(VGG16_CFG, num_classes=num_classes, dropout=dropout)
