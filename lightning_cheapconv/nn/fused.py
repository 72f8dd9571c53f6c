"""Inference forms with structure records: a conv or a Ghost module with a BatchNorm folded in, and what
stands where the BatchNorm was. Made by :func:`lightning_cheapconv.deploy.fold_batchnorm`; they live among the
operators so that :func:`lightning_cheapconv.restructure` knows their kinds without importing deploy."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..validation import check_bool
from .ghost import GhostConv2d, check_ghost_sizes
from .record import StructureRecordMixin, check_conv_args, check_positive_ints, conv_config, register_kind

__all__ = ["FusedConv2d", "FusedGhostConv2d", "FoldedBatchNorm"]


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
class FusedGhostConv2d(GhostConv2d):
    """A conv-only :class:`~lightning_cheapconv.nn.GhostConv2d` into which the BatchNorm that followed it was
    folded exactly (for inference), with an ``intrinsic_bias`` that the depthwise branch does not see.

    A BatchNorm ``y = a·out + b`` after a Ghost module (Han et al., CVPR 2020) folds into its weights
    as follows: the primary conv is scaled by the intrinsic channels' ``a`` (``z' = a·z``, no shift),
    the depthwise kernel of each ghost by ``a_ghost / a_intrinsic`` and its bias takes the ghost's shift,
    so ``cheap(z')`` is exactly the normalized ghost, zero padding included. The intrinsic channels'
    shift ``b`` cannot go into the primary conv's bias (the depthwise conv would see it, and at
    zero-padded borders it sums fewer taps), so it is added to the intrinsic maps after the depthwise
    conv has read them: ``out = cat(z' + intrinsic_bias, cheap(z'))``, then the output permutation as
    in ``GhostConv2d``. The added cost is one elementwise add over ``intrinsic_channels`` maps (an
    ``Add`` node in ONNX) instead of a BatchNorm over all ``out_channels``; ``intrinsic_bias`` is in
    intrinsic-channel order, so an output permutation can still move into the next layer.

    :func:`lightning_cheapconv.deploy.fold_batchnorm` makes it where the plain Ghost fold would be
    inexact (a depthwise kernel larger than 1x1 and a non-zero intrinsic shift). Both convs have a bias;
    there is no norm or activation inside. Arguments are ``GhostConv2d``'s but ``bias``,
    ``norm_layer`` and ``act_layer``, checked by the same rules (``ValueError`` naming the argument,
    its value and the valid range); its structure record lets :func:`lightning_cheapconv.restructure`
    rebuild it in a fresh model.

    Example::

        >>> fused = FusedGhostConv2d(16, 32, 3, padding=1, ratio=2, dw_size=3)
        >>> fused.intrinsic_bias.shape, fused(torch.randn(1, 16, 8, 8)).shape
        (torch.Size([16]), torch.Size([1, 32, 8, 8]))
    """

    record_version = 1  # its own record history, not GhostConv2d's
    record_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        ratio: int = 2,
        dw_size: int = 3,
        padding_mode: str = "zeros",
        permuted: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        owner = "FusedGhostConv2d"  # checked here too, so that errors name this class
        check_conv_args(owner, in_channels, out_channels, kernel_size, stride, padding, dilation, 1, True, padding_mode)
        check_ghost_sizes(ratio, dw_size, owner=owner)
        check_bool("permuted", permuted, owner=owner)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            bias=True,
            ratio=ratio,
            dw_size=dw_size,
            padding_mode=padding_mode,
            permuted=permuted,
            device=device,
            dtype=dtype,
        )
        self.intrinsic_bias = nn.Parameter(torch.zeros(self.intrinsic_channels, device=device, dtype=dtype))

    def config(self) -> dict[str, Any]:
        config = super().config()
        for key in ("bias", "norm_layer", "act_layer"):
            del config[key]
        return config

    def forward(self, x: Tensor) -> Tensor:
        intrinsic = self.primary_conv(x)
        ghosts = self.cheap_operation(intrinsic)  # reads the intrinsic maps before their shift
        return self._assemble(intrinsic + self.intrinsic_bias.view(1, -1, 1, 1), ghosts)


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
