"""lightning-cheapconv: make convolutional networks cheaper while they train."""

from .nn import (
    ChannelShuffle,
    CReLU,
    DepthwiseSeparableConv2d,
    GhostBottleneck,
    GhostConv2d,
    SqueezeExcite,
    StructuredConv2d,
    StructuredLinear,
)

__version__ = "0.1.0"

__all__ = [
    "CReLU",
    "ChannelShuffle",
    "DepthwiseSeparableConv2d",
    "GhostBottleneck",
    "GhostConv2d",
    "SqueezeExcite",
    "StructuredConv2d",
    "StructuredLinear",
]
