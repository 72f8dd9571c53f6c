"""Depthwise separable convolution (Howard et al., MobileNets, 2017; Chollet, Xception, CVPR 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .record import StructureRecordMixin, check_conv_args, register_kind

__all__ = ["DepthwiseSeparableConv2d"]


@register_kind
class DepthwiseSeparableConv2d(StructureRecordMixin, nn.Module):
    """A depthwise ``k x k`` conv (one filter per input channel) followed by a pointwise 1x1 conv.

    From MobileNets (Howard et al., 2017). Bias-free, it has ``C_in·k² + C_in·C_out`` weights
    against ``C_in·C_out·k²`` for the standard conv: a ratio of ``1/C_out + 1/k²``. Its arguments are
    ``nn.Conv2d``'s (without ``groups``), checked by :func:`~lightning_cheapconv.nn.record.check_conv_args`
    (``ValueError`` for a value ``nn.Conv2d`` could not run with, such as a stride of 0 or a negative padding).

    Example::

        >>> conv = DepthwiseSeparableConv2d(3, 4, 3, padding=1, bias=False)
        >>> sum(p.numel() for p in conv.parameters())   # 27 + 12, against 108 for nn.Conv2d(3, 4, 3)
        39
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        args = check_conv_args(
            owner, in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode
        )
        factory = {"device": device, "dtype": dtype}
        # One bias-free filter per input channel; the pointwise conv carries the bias.
        depthwise = args._replace(out_channels=args.in_channels, groups=args.in_channels, bias=False)
        self.depthwise = nn.Conv2d(*depthwise, **factory)
        self.pointwise = nn.Conv2d(args.in_channels, args.out_channels, 1, bias=args.bias, **factory)

    def config(self) -> dict[str, Any]:
        dw = self.depthwise
        return {
            "in_channels": dw.in_channels,
            "out_channels": self.pointwise.out_channels,
            "kernel_size": dw.kernel_size,
            "stride": dw.stride,
            "padding": dw.padding,
            "dilation": dw.dilation,
            "bias": self.pointwise.bias is not None,
            "padding_mode": dw.padding_mode,
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))
