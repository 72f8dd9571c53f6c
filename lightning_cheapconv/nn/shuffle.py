"""Channel shuffle (Zhang et al., "ShuffleNet", CVPR 2018)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .record import StructureRecordMixin, check_positive_ints, register_kind

__all__ = ["ChannelShuffle"]


@register_kind
class ChannelShuffle(StructureRecordMixin, nn.Module):
    """Interleave channels across ``groups`` so that the next grouped conv sees every group.

    From ShuffleNet (Zhang et al., CVPR 2018). A reshape-transpose-reshape, so it traces and
    exports everywhere (unlike the native ``channel_shuffle`` op in some exporters).

    Example::

        >>> ChannelShuffle(2)(torch.arange(4.0).view(1, 4, 1, 1)).flatten().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        (self.groups,) = check_positive_ints("ChannelShuffle", groups=groups)

    def config(self) -> dict[str, Any]:
        return {"groups": self.groups}

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        if channels % self.groups:
            raise ValueError(f"ChannelShuffle: {channels} channels are not divisible by groups={self.groups}")
        return (
            x.view(batch, self.groups, channels // self.groups, height, width)
            .transpose(1, 2)
            .reshape(batch, channels, height, width)
        )

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
