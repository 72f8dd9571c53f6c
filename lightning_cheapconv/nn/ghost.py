"""Ghost modules (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020).

One implementation (:class:`_GhostConvNd`) serves every dimension: :class:`GhostConv1d`, :class:`GhostConv2d` and
:class:`GhostConv3d` replace ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, with a primary conv and a depthwise
cheap conv of the same dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..validation import check_bool, check_finite_number, check_int, short_repr
from .record import StructureRecordMixin, check_conv_args, register_kind
from .squeeze_excite import SqueezeExcite

__all__ = ["GhostConv1d", "GhostConv2d", "GhostConv3d", "GhostBottleneck", "check_ghost_sizes"]

LayerFactory = Callable[[int], nn.Module]


def check_ghost_sizes(ratio: object, dw_size: object, owner: str | None = None) -> tuple[int, int]:
    """The Ghost hyper-parameters as ints: ``ratio`` (s) an int >= 2, ``dw_size`` (d) an odd int >= 1.

    Raises:
        ValueError: naming the argument, its value and the valid range (prefixed by ``owner``).
    """
    return check_int("ratio", ratio, 2, owner=owner), check_int("dw_size", dw_size, 1, odd=True, owner=owner)


def _layer_name(
    factory: LayerFactory | type[nn.Module] | None, owner: str = "GhostConv2d", dims: int = 2
) -> str | None:
    if factory is None:
        return None
    name = getattr(factory, "__name__", None)
    if name is None or getattr(nn, name, None) is not factory:
        raise ValueError(
            f"{owner}: norm_layer/act_layer must be a torch.nn class (e.g. nn.BatchNorm{dims}d, nn.ReLU) so the "
            f"module can describe itself in checkpoints, got {factory!r}"
        )
    return name


def _make_activation(act_layer: type[nn.Module]) -> nn.Module:
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()


class _GhostConvNd(StructureRecordMixin, nn.Module):
    """The Ghost module of any dimension (``_dims`` spatial dimensions; the public classes set it): a primary
    ``nn.Conv{_dims}d`` makes ``m = ceil(out / ratio)`` intrinsic maps, a depthwise ``nn.Conv{_dims}d`` of size
    ``dw_size`` makes ``m·(ratio-1)`` ghosts, and ``out_channels`` of the concatenation are kept, optionally
    reordered by ``output_index``. See :class:`GhostConv2d` for the arguments and rules.
    """

    _dims: ClassVar[int] = 2
    _conv_type: ClassVar[type[nn.Module]] = nn.Conv2d
    _name: ClassVar[str] = "GhostConv2d"  # names the class in errors (FusedGhostConv2d checks its own first)

    # TorchScript compiles a module's properties; these two index containers it cannot (forward does not use them).
    __jit_unused_properties__ = ["primary", "cheap"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = False,
        ratio: int = 2,
        dw_size: int = 3,
        padding_mode: str = "zeros",
        norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] | None = None,
        permuted: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner, dims, conv_type = self._name, self._dims, self._conv_type
        in_channels, out_channels, kernel_size, stride, padding, dilation, _, bias, padding_mode = check_conv_args(
            owner, in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode, dims
        )
        check_bool("permuted", permuted, owner=owner)
        ratio, dw_size = check_ghost_sizes(ratio, dw_size, owner=owner)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.ratio, self.dw_size = ratio, dw_size
        self.norm_name, self.act_name = _layer_name(norm_layer, owner, dims), _layer_name(act_layer, owner, dims)
        self.intrinsic_channels = math.ceil(out_channels / ratio)
        factory = {"device": device, "dtype": dtype}
        m = self.intrinsic_channels
        primary: list[nn.Module] = [
            conv_type(in_channels, m, kernel_size, stride, padding, dilation, 1, bias, padding_mode, **factory)
        ]
        cheap: list[nn.Module] = [conv_type(m, m * (ratio - 1), dw_size, 1, dw_size // 2, 1, m, bias, **factory)]
        if norm_layer is not None:
            primary.append(norm_layer(m, **factory))
            cheap.append(norm_layer(m * (ratio - 1), **factory))
        if act_layer is not None:
            primary.append(_make_activation(act_layer))
            cheap.append(_make_activation(act_layer))
        self.primary_conv = primary[0] if len(primary) == 1 else nn.Sequential(*primary)
        self.cheap_operation = cheap[0] if len(cheap) == 1 else nn.Sequential(*cheap)
        self.output_index: Tensor | None
        if permuted:
            self.register_buffer("output_index", torch.arange(out_channels, device=device))
        else:
            self.output_index = None

    @property
    def primary(self) -> nn.Conv2d:
        """The primary ``nn.Conv2d`` (``Conv1d``, ``Conv3d``; inside ``primary_conv`` when a norm or activation
        follows it)."""
        return self.primary_conv if isinstance(self.primary_conv, self._conv_type) else self.primary_conv[0]

    @property
    def cheap(self) -> nn.Conv2d:
        """The depthwise ``nn.Conv2d`` (``Conv1d``, ``Conv3d``) that makes the ghosts."""
        return self.cheap_operation if isinstance(self.cheap_operation, self._conv_type) else self.cheap_operation[0]

    def set_output_index(self, index: Sequence[int] | Tensor | None) -> None:
        """Set which concatenated channel feeds each output channel (``None`` or the identity: the first
        ``out_channels``). Indices must be ``out_channels`` distinct ints below ``ratio · ceil(out / ratio)``.

        Raises:
            ValueError: if they are not (the module is left as it was).
        """
        if index is not None:
            index = torch.as_tensor(index, device=self.primary.weight.device)
            self._check_output_index(index, f"{self._name}: output_index")
            index = index.long()
            if torch.equal(index.cpu(), torch.arange(self.out_channels)):
                index = None
        if "output_index" in self._buffers:
            del self._buffers["output_index"]
        # A plain ``output_index = None`` attribute would make register_buffer raise KeyError.
        self.__dict__.pop("output_index", None)
        if index is None:
            self.output_index = None
        else:
            self.register_buffer("output_index", index)

    def _check_output_index(self, index: Any, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` unless ``index`` is an integer tensor of ``out_channels`` distinct
        values in ``0..ratio·ceil(out_channels / ratio) - 1`` (a concatenated channel may be skipped)."""
        total = self.intrinsic_channels * self.ratio
        expected = f"{self.out_channels} distinct indices (an integer tensor of shape ({self.out_channels},))"
        if not isinstance(index, Tensor):
            raise ValueError(f"{name} must hold {expected}, got {type(index).__name__}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool or index.is_meta:
            raise ValueError(f"{name} must hold {expected}, got a {index.dtype} tensor on {index.device}")
        if index.shape != (self.out_channels,):
            raise ValueError(f"{name} must hold {expected}, got shape {tuple(index.shape)}")
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= total:
            raise ValueError(
                f"{name} values must lie in 0..{total - 1} (the concatenated channels), got values {low}..{high}"
            )
        values, counts = index.unique(return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"{name} must hold {expected}, got duplicates {short_repr(values[counts > 1].tolist())}")

    def check_state(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Check the ``output_index`` that a permuted module would load (see :meth:`set_output_index`).

        Raises:
            ValueError: naming the key, if it is not ``out_channels`` distinct ints in range.
        """
        key = prefix + "output_index"
        if self.output_index is not None and key in state_dict:
            self._check_output_index(state_dict[key], f"state dict key {key!r}")

    def config(self) -> dict[str, Any]:
        conv = self.primary
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "bias": conv.bias is not None,
            "ratio": self.ratio,
            "dw_size": self.dw_size,
            "padding_mode": conv.padding_mode,
            "norm_layer": self.norm_name,
            "act_layer": self.act_name,
            "permuted": self.output_index is not None,
        }

    def forward(self, x: Tensor) -> Tensor:
        intrinsic = self.primary_conv(x)
        return self._assemble(intrinsic, self.cheap_operation(intrinsic))

    def _assemble(self, intrinsic: Tensor, ghosts: Tensor) -> Tensor:
        """The output from the intrinsic maps and their ghosts: one concatenation, then a gather only when
        ``output_index`` is set. Unpermuted, only the ghosts that are kept are concatenated (no slice at all when
        ``out_channels == ratio · intrinsic_channels``), so the exported graph is a single Concat."""
        if self.output_index is not None:
            return torch.cat([intrinsic, ghosts], dim=1).index_select(1, self.output_index)
        kept = self.out_channels - self.intrinsic_channels
        if ghosts.shape[1] != kept:
            ghosts = ghosts[:, :kept]
        return torch.cat([intrinsic, ghosts], dim=1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, ratio={self.ratio}, dw_size={self.dw_size}, "
            f"intrinsic_channels={self.intrinsic_channels}, permuted={self.output_index is not None}"
        )


@register_kind
class GhostConv2d(_GhostConvNd):
    """Ghost module: a primary conv makes ``m = ceil(out / ratio)`` intrinsic maps, a depthwise
    ``dw_size`` conv makes ``m·(ratio-1)`` ghosts from them, and ``out_channels`` of the
    concatenation are kept.

    From Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020. Without
    ``norm_layer``/``act_layer`` it is a conv-only drop-in for ``nn.Conv2d``: the host network's
    BatchNorm and activation stay outside (converting a conv that BN+ReLU already follow must
    not add a second BN+ReLU). GhostNet blocks pass ``norm_layer=nn.BatchNorm2d`` and
    ``act_layer=nn.ReLU``, applied after both the primary and the cheap conv.

    Ghost channel ``t`` (of the cheap conv's output) is made from intrinsic ``t // (ratio-1)``.
    The optional ``output_index`` buffer says which of the ``m·ratio`` concatenated channels
    feeds each output channel (weight inheritance keeps the original conv's channel order with
    it); when it is the plain "first ``out_channels``" it is not stored and costs nothing.

    Raises ``ValueError`` naming the argument, its value and the valid range for a conv argument
    that ``nn.Conv2d`` could not run with (:func:`~lightning_cheapconv.nn.record.check_conv_args`),
    a ``ratio`` below 2 or an even ``dw_size`` (:func:`check_ghost_sizes`), or a ``norm_layer``/``act_layer``
    not from ``torch.nn``.

    Example::

        >>> ghost = GhostConv2d(64, 128, 3, padding=1, ratio=2, dw_size=3)
        >>> ghost(torch.randn(1, 64, 16, 16)).shape
        torch.Size([1, 128, 16, 16])
    """

    _dims = 2
    _conv_type = nn.Conv2d
    _name = "GhostConv2d"


@register_kind
class GhostConv1d(_GhostConvNd):
    """Ghost module for ``nn.Conv1d`` (audio, time series): a primary ``nn.Conv1d`` makes ``m = ceil(out / ratio)``
    intrinsic maps, a depthwise ``nn.Conv1d`` of size ``dw_size`` makes the ghosts, and ``out_channels`` of the
    concatenation are kept (optionally reordered by ``output_index``).

    From Han et al., CVPR 2020, whose cheap operation is a depthwise conv; here of the same dimension as the conv
    it replaces. Arguments, rules and errors are :class:`GhostConv2d`'s, sides being ints or 1-tuples
    (``norm_layer=nn.BatchNorm1d``).

    Example::

        >>> ghost = GhostConv1d(16, 32, 5, padding=2, ratio=2, dw_size=3)
        >>> ghost(torch.randn(1, 16, 100)).shape
        torch.Size([1, 32, 100])
    """

    _dims = 1
    _conv_type = nn.Conv1d
    _name = "GhostConv1d"


@register_kind
class GhostConv3d(_GhostConvNd):
    """Ghost module for ``nn.Conv3d`` (video, volumes): a primary ``nn.Conv3d`` makes ``m = ceil(out / ratio)``
    intrinsic maps, a depthwise ``dw_size x dw_size x dw_size`` ``nn.Conv3d`` makes the ghosts, and
    ``out_channels`` of the concatenation are kept (optionally reordered by ``output_index``).

    From Han et al., CVPR 2020, whose cheap operation is a depthwise conv; here of the same dimension as the conv
    it replaces. Arguments, rules and errors are :class:`GhostConv2d`'s, sides being ints or 3-tuples
    (``norm_layer=nn.BatchNorm3d``).

    Example::

        >>> ghost = GhostConv3d(8, 16, 3, padding=1, ratio=2, dw_size=3)
        >>> ghost(torch.randn(1, 8, 4, 8, 8)).shape
        torch.Size([1, 16, 4, 8, 8])
    """

    _dims = 3
    _conv_type = nn.Conv3d
    _name = "GhostConv3d"


class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: Ghost expansion (BN+ReLU), optional strided depthwise conv, optional SE,
    Ghost projection (BN, no activation), plus a shortcut.

    From Han et al., CVPR 2020 (Fig. 3); the layout follows the paper's released code, whose
    parameter and MAC counts REFERENCES.md lists (GhostNet 1.0x: 5.2M / 141M at 224x224).

    Example::

        >>> block = GhostBottleneck(16, 48, 24, dw_kernel_size=3, stride=2, se_ratio=0.25)
        >>> block(torch.randn(1, 16, 32, 32)).shape
        torch.Size([1, 24, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        stride = check_int("stride", stride, 1, 2, owner="GhostBottleneck")
        se_ratio = check_finite_number("se_ratio", se_ratio, 0, 1, owner="GhostBottleneck")
        self.stride = stride
        self.ghost1 = GhostConv2d(in_channels, mid_channels, 1, norm_layer=nn.BatchNorm2d, act_layer=act_layer)
        if stride > 1:
            self.conv_dw = nn.Conv2d(
                mid_channels,
                mid_channels,
                dw_kernel_size,
                stride,
                (dw_kernel_size - 1) // 2,
                groups=mid_channels,
                bias=False,
            )
            self.bn_dw = nn.BatchNorm2d(mid_channels)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = (
            SqueezeExcite(mid_channels, se_ratio=se_ratio, divisor=4, gate_layer=nn.Hardsigmoid)
            if se_ratio > 0
            else None
        )
        self.ghost2 = GhostConv2d(mid_channels, out_channels, 1, norm_layer=nn.BatchNorm2d)
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(
                    in_channels,
                    in_channels,
                    dw_kernel_size,
                    stride,
                    (dw_kernel_size - 1) // 2,
                    groups=in_channels,
                    bias=False,
                ),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = self.shortcut(x)
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        return self.ghost2(x) + residual
