"""Cheap operators in pure PyTorch (no Lightning import)."""

from .crelu import CReLU
from .fused import FoldedBatchNorm, FusedConv2d, FusedGhostConv2d
from .ghost import GhostBottleneck, GhostConv2d
from .record import build_from_record
from .separable import DepthwiseSeparableConv2d
from .shuffle import ChannelShuffle
from .squeeze_excite import SqueezeExcite
from .structured import StructuredConv2d, StructuredLinear

__all__ = [
    "CReLU",
    "ChannelShuffle",
    "DepthwiseSeparableConv2d",
    "FoldedBatchNorm",
    "FusedConv2d",
    "FusedGhostConv2d",
    "GhostBottleneck",
    "GhostConv2d",
    "SqueezeExcite",
    "StructuredConv2d",
    "StructuredLinear",
    "build_from_record",
]
