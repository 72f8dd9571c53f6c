"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..validation import check_finite_number
from .functional import make_divisible
from .record import StructureRecordMixin, check_positive_ints, register_kind

__all__ = ["SqueezeExcite"]


@register_kind
class SqueezeExcite(StructureRecordMixin, nn.Module):
    """Channel attention: global average pool, 1x1 conv down to ``channels·se_ratio``, activation,
    1x1 conv back up, gate, and rescale the input.

    From Hu et al., CVPR 2018 (``se_ratio = 1/r``, r = 16 there); it adds ``2·C²·se_ratio``
    weights plus biases. GhostNet uses ``se_ratio=0.25``, ``divisor=4`` and a hard-sigmoid gate.

    Example::

        >>> se = SqueezeExcite(64, se_ratio=0.25)
        >>> se(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        se_ratio: float = 1 / 16,
        divisor: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        (channels,) = check_positive_ints("SqueezeExcite", channels=channels)
        check_finite_number("se_ratio", se_ratio, 0, 1, exclusive_minimum=True, owner="SqueezeExcite")
        if divisor > 1:
            reduced = make_divisible(channels * se_ratio, divisor)
        else:
            reduced = max(1, round(channels * se_ratio))
        self.channels, self.se_ratio, self.divisor, self.reduced_channels = channels, se_ratio, divisor, reduced
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = act_layer(inplace=True) if act_layer in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish) else act_layer()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = gate_layer()

    def config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "se_ratio": self.se_ratio,
            "divisor": self.divisor,
            "act_layer": type(self.act).__name__,
            "gate_layer": type(self.gate).__name__,
        }

    def forward(self, x: Tensor) -> Tensor:
        scale = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(scale)

    def extra_repr(self) -> str:
        return f"{self.channels}, reduced_channels={self.reduced_channels}"
