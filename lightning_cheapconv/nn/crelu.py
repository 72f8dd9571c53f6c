"""Concatenated ReLU (Shang et al., ICML 2016)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..validation import check_int
from .record import StructureRecordMixin, register_kind

__all__ = ["CReLU"]


@register_kind
class CReLU(StructureRecordMixin, nn.Module):
    """``cat([relu(x), relu(-x)], dim)``: the output has twice the channels of the input.

    From Shang et al., "Understanding and Improving CNNs via Concatenated ReLUs", ICML 2016:
    early filters come in negated pairs, so half of them can be had for free.

    Example::

        >>> CReLU()(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, owner="CReLU")

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.cat([x, -x], dim=self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
