"""Inference forms with structure records: a conv with a BatchNorm folded in, and what stands where
the BatchNorm was. Made by :func:`lightning_cheapconv.deploy.fold_batchnorm`; they live among the
operators so that :func:`lightning_cheapconv.restructure` knows their kinds without importing deploy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .record import StructureRecordMixin, check_conv_args, check_positive_ints, conv_config, register_kind

__all__ = ["FusedConv2d", "FoldedBatchNorm"]


@register_kind
class FusedConv2d(StructureRecordMixin, nn.Conv2d):
    """An ``nn.Conv2d`` into which the BatchNorm that followed it was folded (for inference).

    It computes exactly what ``nn.Conv2d`` computes; it differs only in describing itself in
    checkpoints, so that :func:`lightning_cheapconv.restructure` can rebuild it (with its bias) in a
    fresh model whose conv has none. :func:`lightning_cheapconv.deploy.fold_batchnorm` makes it and
    puts a :class:`FoldedBatchNorm` where the BatchNorm was. Its arguments are ``nn.Conv2d``'s, checked
    by :func:`~lightning_cheapconv.nn.record.check_conv_args` (``ValueError`` for a value ``nn.Conv2d``
    could not run with, such as a stride of 0).

    Example::

        >>> fused = FusedConv2d(16, 32, 3, padding=1)
        >>> fused(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        args = check_conv_args(
            "FusedConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode
        )
        super().__init__(*args, device=device, dtype=dtype)

    def config(self) -> dict[str, Any]:
        return conv_config(self)


@register_kind
class FoldedBatchNorm(StructureRecordMixin, nn.Module):
    """The identity that stands where a BatchNorm was folded into the preceding layer.

    Its record keeps the BatchNorm's size, so :func:`lightning_cheapconv.restructure` replaces the
    BatchNorm of a fresh model by it when loading the state dict of a BN-folded model.

    Example::

        >>> folded = FoldedBatchNorm(32)
        >>> x = torch.randn(1, 32, 4, 4)
        >>> torch.equal(folded(x), x)
        True
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        (self.num_features,) = check_positive_ints("FoldedBatchNorm", num_features=num_features)

    def config(self) -> dict[str, Any]:
        return {"num_features": self.num_features}

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}"
