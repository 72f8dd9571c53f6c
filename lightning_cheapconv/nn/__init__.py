"""Cheap operators in pure PyTorch (no Lightning import)."""

from .crelu import CReLU
from .fused import FoldedBatchNorm, FusedConv2d, FusedGhostConv2d
from .ghost import GhostBottleneck, GhostConv1d, GhostConv2d, GhostConv3d
from .record import build_from_record
from .separable import DepthwiseSeparableConv2d
from .shuffle import ChannelShuffle
from .squeeze_excite import SqueezeExcite
from .structured import POOLINGS, StructuredConv1d, StructuredConv2d, StructuredConv3d, StructuredLinear
from .transposed import (
    GhostConvTranspose1d,
    GhostConvTranspose2d,
    GhostConvTranspose3d,
    StructuredConvTranspose1d,
    StructuredConvTranspose2d,
    StructuredConvTranspose3d,
)

__all__ = [
    "POOLINGS",
    "CReLU",
    "ChannelShuffle",
    "DepthwiseSeparableConv2d",
    "FoldedBatchNorm",
    "FusedConv2d",
    "FusedGhostConv2d",
    "GhostBottleneck",
    "GhostConv1d",
    "GhostConv2d",
    "GhostConv3d",
    "GhostConvTranspose1d",
    "GhostConvTranspose2d",
    "GhostConvTranspose3d",
    "SqueezeExcite",
    "StructuredConv1d",
    "StructuredConv2d",
    "StructuredConv3d",
    "StructuredConvTranspose1d",
    "StructuredConvTranspose2d",
    "StructuredConvTranspose3d",
    "StructuredLinear",
    "build_from_record",
]
