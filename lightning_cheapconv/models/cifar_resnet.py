"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

The configuration the GhostNet and Structured Convolutions papers use on CIFAR-10: a 3x3 conv with
16 channels, three stages of ``n`` basic blocks with 16/32/64 channels (the first block of stages 2
and 3 has stride 2), parameter-free shortcuts (option A), global average pooling and one linear
layer: depth ``6n + 2``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters).

    Channels are padded evenly on both sides, as in the reference CIFAR implementations, so the
    input channels sit in the middle of the output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA: out_channels ({out_channels}) must be >= in_channels ({in_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a ReLU between them, an option-A shortcut, and a final ReLU.

    From He et al., CVPR 2016 (section 4.2). Every conv is a plain ``nn.Conv2d`` followed by a
    ``nn.BatchNorm2d``, so the Ghost and structured converters can replace the convs alone.

    Example::

        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(1, 16, 32, 32)).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images with depth ``6n + 2`` and option-A (parameter-free) shortcuts.

    From He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: the
    baseline of the GhostNet (Han et al., CVPR 2020) and Structured Convolutions (Bhalgat et al.,
    NeurIPS 2020) CIFAR-10 experiments. The stem conv ``conv1`` is the first ``nn.Conv2d`` in
    ``named_modules()`` order (converters usually keep it), and the classifier is ``fc``.
    ResNet-56: 853,018 parameters (BN included), 125.5M MACs at 32x32.

    Example::

        >>> model = CifarResNet(56, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth={depth!r} is invalid; valid depths are 6n+2 (20, 32, 44, 56, 110)")
        self.depth, self.num_classes = depth, num_classes
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        channels = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, num_classes={self.num_classes}"


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (He et al., CVPR 2016). 269,722 params, 40.6M MACs at 32x32 (10 classes)."""
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-32 (He et al., CVPR 2016). 464,154 params, 68.9M MACs at 32x32 (10 classes)."""
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-44 (He et al., CVPR 2016). 658,586 params, 97.2M MACs at 32x32 (10 classes)."""
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56 (He et al., CVPR 2016). 853,018 params, 125.5M MACs at 32x32 (10 classes)."""
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-110 (He et al., CVPR 2016). 1,727,962 params, 252.9M MACs at 32x32 (10 classes)."""
    return CifarResNet(110, num_classes)
