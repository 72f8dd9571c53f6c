"""Structured convolutions in decomposed form: sum-pooling, then a smaller layer.

Bhalgat et al., "Structured Convolutions for Efficient Neural Network Design", NeurIPS 2020
(arXiv 2008.02454). A conv whose kernels are structured with hidden sizes ``(c, n_h, n_w)``
equals a stride-1 sum-pool with window ``(C - c + 1, N_h - n_h + 1, N_w - n_w + 1)`` over
(channels per group, H, W) of the *padded* input, followed by a ``(c, n_h, n_w)`` conv with the
original stride and dilation and no padding. The same holds with one spatial dimension fewer or
more (the basis is a Kronecker product per mode, :mod:`lightning_cheapconv.structure`): one
implementation (:class:`_StructuredConvNd`) serves :class:`StructuredConv1d`, :class:`StructuredConv2d`
and :class:`StructuredConv3d`.

The sum-pool has several exact operator forms (:data:`POOLINGS`), because the fastest one depends on the
runtime: shifted adds in PyTorch eager, one average pool (its window volume moved into the small conv's
weight) in ONNX Runtime and other graph runtimes, where the shifted adds become long Slice/Add chains.
``benchmarks/pooling.py`` measures them; ``pooling="auto"`` picks by its findings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..structure import StructureSpec, from_alpha, to_alpha
from ..validation import check_bool, check_choice
from .functional import window_sum, window_sum_additions, window_sum_cumsum
from .record import (
    StructureRecordMixin,
    check_conv_args,
    check_conv_sides,
    check_positive_ints,
    conv_config,
    register_kind,
)

__all__ = ["POOLINGS", "POOLINGS_3D", "StructuredConv1d", "StructuredConv2d", "StructuredConv3d", "StructuredLinear"]

POOLINGS = ("auto", "adds", "avg_pool", "cumsum")
"""The operator forms of :class:`StructuredConv2d`'s sum-pool, all exact (same output up to float rounding):

- ``"adds"``: shifted adds by binary doubling (:func:`~lightning_cheapconv.nn.functional.window_sum`) over
  channels, H and W: the fastest form in PyTorch eager, forward and backward;
- ``"avg_pool"``: one average pool over (channels per group, H, W) (``avg_pool3d``; ``avg_pool2d`` without a
  channel window), the window volume multiplied into the small conv's weight in ``forward`` (graph runtimes
  and ``torch.compile`` freezing fold that constant). Few nodes, but 3-D pooling is slow on CPUs (10x slower
  than the other forms in ONNX Runtime on every channel-window shape measured);
- ``"cumsum"``: the channel window as a cumulative-sum difference
  (:func:`~lightning_cheapconv.nn.functional.window_sum_cumsum`), then ``avg_pool2d`` over (H, W); the same
  graph as ``"avg_pool"`` when there is no channel window (``hidden_channels`` = channels per group);
- ``"auto"``: ``"cumsum"`` while the module is traced, scripted or exported (ONNX, ``torch.export``), else
  ``"adds"`` (eager PyTorch and ``torch.compile``) (:meth:`StructuredConv2d.active_pooling`).

Average pools cannot dilate: a dilated spatial window is summed with shifted adds in every form. Padding is
the pool's own zero padding where that is the same (zero mode, symmetric, at most half the window), else an
explicit ``F.pad`` as in ``"adds"``.

:class:`StructuredConv1d` has the same forms (``avg_pool2d`` over (channels per group, L), ``avg_pool1d`` over L);
:class:`StructuredConv3d` has ``"auto"``, ``"adds"`` and ``"cumsum"`` (``avg_pool3d`` over (D, H, W)): an average
pool over (channels, D, H, W) would be 4-D, which PyTorch does not have (:data:`POOLINGS_3D`).
"""

POOLINGS_3D = ("auto", "adds", "cumsum")
"""The operator forms of :class:`StructuredConv3d`'s sum-pool (see :data:`POOLINGS`)."""

_Layer = TypeVar("_Layer", bound=nn.Module)


def _explicit_padding(
    padding: str | tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """``(before, after)`` per spatial dimension, the last dimension first, as :func:`torch.nn.functional.pad`
    takes it (2-d: ``(left, right, top, bottom)``); ``'same'`` puts the odd pixel after (right/bottom), as
    PyTorch's own ``padding='same'`` does."""
    if padding == "valid":
        sides = [(0, 0) for _ in kernel]
    elif padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        sides = [(total // 2, total - total // 2) for total in totals]
    else:
        sides = [(pad, pad) for pad in padding]
    return tuple(value for pair in reversed(sides) for value in pair)


def _check_dense(owner: str, dense: object, cls: type[nn.Module]) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``dense`` is an initialized (not lazy) ``cls``."""
    if not isinstance(dense, cls) or isinstance(dense, LazyModuleMixin):
        raise ValueError(f"{owner} expects an initialized nn.{cls.__name__}, got {type(dense).__name__}")


def _copy_weights(layer: _Layer, weight: Tensor, bias: Tensor | None) -> _Layer:
    """``layer`` with ``weight`` (cast to its dtype) and, when given, ``bias`` copied in."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class _StructuredConvNd(StructureRecordMixin, nn.Module):
    """The decomposed structured convolution of any dimension (``_dims`` spatial dimensions; the public classes set
    it): sum-pool over (channels per group, spatial dims), then a small ``F.conv{_dims}d``. See
    :class:`StructuredConv2d` for the arguments, rules and errors.
    """

    _dims: ClassVar[int] = 2
    _conv_type: ClassVar[type[nn.Module]] = nn.Conv2d
    poolings: ClassVar[tuple[str, ...]] = POOLINGS
    """The operator forms this class offers (:data:`POOLINGS`, :data:`POOLINGS_3D`)."""
    record_adopted: ClassVar[tuple[str, ...]] = ("pooling",)
    # TorchScript compiles a module's properties; forward reads ``_windows`` (a list) instead of this tuple.
    __jit_unused_properties__ = ["windows"]
    __constants__ = ["_dims"]  # a class attribute; TorchScript reads module attributes from instances or constants

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        hidden_channels: int | None = None,
        hidden_kernel_size: int | tuple[int, ...] | None = None,
        pooling: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner, dims = type(self).__name__, self._dims
        self.pooling: str = check_choice("pooling", pooling, self.poolings, owner=owner)
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode = check_conv_args(
            owner, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, dims
        )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.padding_mode = padding_mode
        self._pad = _explicit_padding(self.padding, self.kernel_size, self.dilation)
        # Per spatial dimension in order (``_pad`` lists the last dimension first): TorchScript reads these lists.
        self._pad_before = list(self._pad[-2::-2])
        self._pad_after = list(self._pad[::-2])

        channels_per_group = in_channels // groups
        if hidden_channels is None:
            hidden_channels = channels_per_group
        if hidden_kernel_size is None:
            hidden_kernel_size = tuple(max(1, k - 1) for k in self.kernel_size)
        hidden_kernel_size = check_conv_sides("hidden_kernel_size", hidden_kernel_size, 1, dims, owner)
        self.spec = StructureSpec(hidden_channels, hidden_kernel_size)
        self.spec.validate((channels_per_group, *self.kernel_size), layer=owner)
        self.hidden_channels = hidden_channels
        self.hidden_kernel_size = self.spec.kernel_size
        self._windows = [
            channels_per_group - hidden_channels + 1,
            *(k - n + 1 for k, n in zip(self.kernel_size, self.hidden_kernel_size, strict=True)),
        ]

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, hidden_channels, *self.hidden_kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    # The pooling windows: (channels, H, W) (channels and each spatial dimension in 1-d and 3-d).
    @property
    def windows(self) -> tuple[int, ...]:
        return tuple(self._windows)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def config(self) -> dict[str, Any]:
        return {
            **conv_config(self),
            "hidden_channels": self.hidden_channels,
            "hidden_kernel_size": self.hidden_kernel_size,
            "pooling": self.pooling,
        }

    def set_pooling(self, pooling: str) -> None:
        """Switch the sum-pool's operator form (one of :data:`POOLINGS`); weights and outputs stay as they are.

        Raises ``ValueError`` naming ``pooling``, its value and the valid values, leaving the module unchanged.

        Example::

            >>> layer = StructuredConv2d(16, 16, 3, padding=1)
            >>> layer.set_pooling("avg_pool")
            >>> layer.pooling
            'avg_pool'
        """
        self.pooling = check_choice("pooling", pooling, self.poolings, owner=type(self).__name__)

    def adopt(self, field: str, value: Any) -> None:
        """Loading a state dict whose record differs from this layer's only in ``pooling`` switches to its form."""
        if field != "pooling":
            raise ValueError(f"{type(self).__name__}: {field!r} is not a field a loaded record may set")
        self.set_pooling(value)

    def active_pooling(self) -> str:
        """The form :meth:`forward` runs now: :attr:`pooling`, or for ``"auto"`` the rule measured by
        ``benchmarks/pooling.py``: ``"cumsum"`` while traced (``torch.jit.trace``), scripted or exported
        (``torch.onnx.export``, ``torch.export``), for the graph runtimes these feed (ONNX Runtime:
        1.4-2.8x the dense conv's speed where the shifted adds reach 0.9-2.7x), else ``"adds"`` (eager
        PyTorch and ``torch.compile``, where the shifted adds were the fastest form).

        Example::

            >>> StructuredConv2d(16, 16, 3, padding=1).active_pooling()
            'adds'
        """
        if self.pooling != "auto":
            return self.pooling
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return "cumsum"
        else:
            exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
            return "cumsum" if exporting else "adds"  # eager, and torch.compile: inductor fuses the shifted adds

    def pool(self, x: Tensor) -> Tensor:
        """The sum-pooling stage (in the :meth:`active_pooling` form): ``(B, C, H, W)`` to
        ``(B, groups·c, H + pads - d_h·(w_h - 1), W + pads - d_w·(w_w - 1))``, in ``x``'s dtype (one spatial
        dimension fewer or more in 1-d and 3-d).

        Example::

            >>> StructuredConv2d(4, 4, 3, padding=1).pool(torch.ones(1, 4, 5, 5))[0, 0, 0]
            tensor([1., 2., 2., 2., 2., 1.])
        """
        pooled, scale = self._pooled(x, self.active_pooling())
        return pooled if scale == 1 else pooled * scale

    def _pooled(self, x: Tensor, form: str) -> tuple[Tensor, int]:
        """``(pooled, scale)`` with ``pooled · scale`` the sum-pool: ``scale`` is the volume of the windows
        that an average pool summed (1 for ``"adds"``), which :meth:`forward` multiplies into the weight."""
        if form == "adds":
            return self._pooled_by_adds(x), 1
        window_c = self._windows[0]
        in_dtype = x.dtype
        if in_dtype == torch.float16 or in_dtype == torch.bfloat16:
            x = x.float()
        # Average pools cannot dilate: a dilated window stays with the shifted adds below.
        avg: list[int] = []
        for i in range(self._dims):
            avg.append(self._windows[i + 1] if self.dilation[i] == 1 else 1)
        avg_c = window_c if form == "avg_pool" else 1
        if window_c > 1 and form == "cumsum":
            x = window_sum_cumsum(x.unflatten(1, (self.groups, -1)), 2, window_c).flatten(1, 2)
        # The pool's own zero padding equals F.pad's where symmetric and at most half the window (PyTorch's limit).
        own_padding = self.padding_mode == "zeros"
        for i in range(self._dims):
            before, after = self._pad_before[i], self._pad_after[i]
            if avg[i] != self._windows[i + 1] or before != after or before > avg[i] // 2:
                own_padding = False
        if any(self._pad) and not own_padding:
            x = F.pad(x, self._pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        padding = self._pad_before if own_padding else [0] * self._dims
        volume = avg_c
        for size in avg:
            volume *= size
        if avg_c > 1:
            x = self._avg_pool(x.unflatten(1, (self.groups, -1)), [avg_c] + avg, [0] + padding, self._dims + 1)
            x = x.flatten(1, 2)
        elif volume > 1:
            x = self._avg_pool(x, avg, padding, self._dims)
        for i in range(self._dims):
            if self._windows[i + 1] > avg[i]:
                x = window_sum(x, 2 + i, self._windows[i + 1], self.dilation[i])
        return x.to(in_dtype), volume

    @staticmethod
    def _avg_pool(x: Tensor, window: list[int], padding: list[int], dims: int) -> Tensor:
        """``avg_pool{dims}d`` at stride 1 (``count_include_pad``: padded zeros count, so ``· volume`` is the sum)."""
        if dims == 1:
            return F.avg_pool1d(x, window, 1, padding)
        if dims == 2:
            return F.avg_pool2d(x, window, 1, padding)
        return F.avg_pool3d(x, window, 1, padding)

    def _pooled_by_adds(self, x: Tensor) -> Tensor:
        """The ``"adds"`` form: channel windows per group, explicit padding, then each spatial window."""
        window_c = self._windows[0]
        in_dtype = x.dtype
        if window_c > 1:
            if self.groups > 1:
                x = window_sum(x.unflatten(1, (self.groups, -1)), 2, window_c).flatten(1, 2)
            else:
                x = window_sum(x, 1, window_c)
        # Padding acts on each channel alike, so it commutes with channel pooling; pad the smaller tensor.
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        for i in range(self._dims):
            if self._windows[i + 1] > 1:
                x = window_sum(x, 2 + i, self._windows[i + 1], self.dilation[i])
        return x.to(in_dtype)

    def forward(self, x: Tensor) -> Tensor:
        pooled, scale = self._pooled(x, self.active_pooling())
        weight = self.weight if scale == 1 else self.weight * scale
        if self._dims == 1:
            return F.conv1d(pooled, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        if self._dims == 2:
            return F.conv2d(pooled, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv3d(pooled, weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def pooling_additions(self, input_shape: Sequence[int]) -> int:
        """Additions of the sum-pool for an input of shape ``(B, C, H, W)`` (``(B, C, L)``, ``(B, C, D, H, W)``;
        not counted by FLOP counters).

        Counts the operation, not the form: the additions of the ``"adds"`` form (binary doubling), whatever
        :attr:`pooling` is, so MAC and addition counts do not change with the operator form.
        """
        batch, _, *sizes = input_shape
        window_c, *spatial = self.windows
        per_group = self.in_channels // self.groups
        adds = window_sum_additions(per_group, window_c, others=batch * self.groups * math.prod(sizes))
        padded = zip(sizes, self._pad_before, self._pad_after, strict=True)
        sizes = [size + before + after for size, before, after in padded]
        channels = self.groups * self.hidden_channels
        for axis, (window, dilation) in enumerate(zip(spatial, self.dilation, strict=True)):
            others = batch * channels * math.prod(sizes[:axis]) * math.prod(sizes[axis + 1 :])
            adds += window_sum_additions(sizes[axis], window, dilation, others=others)
            sizes[axis] -= dilation * (window - 1)
        return adds

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        hidden_channels: int | None = None,
        hidden_kernel_size: int | tuple[int, ...] | None = None,
        pooling: str = "auto",
    ) -> _StructuredConvNd:
        """Project ``conv``'s kernel onto the structured subspace and return the decomposed layer
        (its sum-pool in the operator form ``pooling``, one of :data:`POOLINGS`).

        The result equals ``conv`` with its weight replaced by the projected kernel (exactly, up to
        float rounding); how far the weight moved is :func:`~lightning_cheapconv.structure.structural_residual`.
        ``conv`` is an ``nn.Conv2d`` for :class:`StructuredConv2d` (``nn.Conv1d``, ``nn.Conv3d`` for the others).

        Raises:
            ValueError: for another layer type, or hidden sizes and ``pooling`` the constructor refuses.
        """
        _check_dense(f"{cls.__name__}.from_dense", conv, cls._conv_type)
        weight = conv.weight
        layer = cls(
            **conv_config(conv),
            hidden_channels=hidden_channels,
            hidden_kernel_size=hidden_kernel_size,
            pooling=pooling,
            device=weight.device,
            dtype=weight.dtype,
        )
        return _copy_weights(layer, to_alpha(weight.detach().double(), layer.spec), conv.bias)

    def dense_weight(self) -> Tensor:
        """The equivalent dense kernel ``W = A·alpha`` of shape ``(O, C/groups, k_h, k_w)`` (``(O, C/groups, k)``,
        ``(O, C/groups, k_d, k_h, k_w)``; differentiable)."""
        return from_alpha(self.weight, (self.in_channels // self.groups, *self.kernel_size))

    def to_dense(self) -> nn.Conv2d:
        """Fold back into an equivalent ``nn.Conv2d`` (``nn.Conv1d``, ``nn.Conv3d``; same configuration, kernel
        ``A·alpha``)."""
        conv = self._conv_type(**conv_config(self), device=self.weight.device, dtype=self.weight.dtype)
        dense = from_alpha(self.weight.detach().double(), (self.in_channels // self.groups, *self.kernel_size))
        return _copy_weights(conv, dense, self.bias)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0,) * self._dims, "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        s += f", hidden_channels={self.hidden_channels}, hidden_kernel_size={self.hidden_kernel_size}"
        return s if self.pooling == "auto" else s + f", pooling={self.pooling!r}"


@register_kind
class StructuredConv2d(_StructuredConvNd):
    """Decomposed structured convolution: sum-pool over (channels per group, H, W), then a small conv.

    From Bhalgat et al., NeurIPS 2020 (arXiv 2008.02454). It computes exactly what an
    ``nn.Conv2d`` with the structured kernel ``W = A·alpha`` computes (see :meth:`to_dense`),
    with ``O·c·n_h·n_w`` instead of ``O·C·N_h·N_w`` multiplications per output position. The
    sum-pool's additions are shared by all output channels (:meth:`pooling_additions`).

    Args mirror ``nn.Conv2d``; ``hidden_channels`` is ``c`` per group (default ``C``: spatial
    structure only) and ``hidden_kernel_size`` is ``(n_h, n_w)`` (default ``k - 1``, at least 1).
    Padding modes other than ``'zeros'`` pad explicitly before pooling. ``pooling`` picks the sum-pool's
    operator form, one of :data:`POOLINGS` (default ``"auto"``: shifted adds in eager PyTorch and
    ``torch.compile``; when traced or exported, ``"cumsum"``: a cumulative-sum difference over channels and
    an average pool over H and W, whose window area lives in the small conv's weight); every form gives the
    same output up to float rounding, and it is part of the structure record. Half-precision inputs are pooled
    in float32 and the pooled map cast back before the small conv, in every form.

    Raises ``ValueError`` naming the argument, its value and the valid range for a conv argument that
    ``nn.Conv2d`` could not run with (:func:`~lightning_cheapconv.nn.record.check_conv_args`), hidden
    sizes outside ``1..C/groups`` and ``1..k``, or a ``pooling`` not in :data:`POOLINGS`.

    Example::

        >>> conv = nn.Conv2d(64, 64, 3, padding=1)
        >>> layer = StructuredConv2d.from_dense(conv, hidden_channels=32, hidden_kernel_size=2)
        >>> layer(torch.randn(1, 64, 8, 8)).shape
        torch.Size([1, 64, 8, 8])
    """

    # Version 2 added ``pooling``; version-1 records (no ``pooling``) load with the default.
    record_version = 2
    record_defaults: ClassVar[dict[str, Any]] = {"pooling": "auto"}
    _dims = 2
    _conv_type = nn.Conv2d


@register_kind
class StructuredConv1d(_StructuredConvNd):
    """Decomposed structured ``nn.Conv1d`` (audio, time series): sum-pool over (channels per group, L), then a
    small conv.

    From Bhalgat et al., NeurIPS 2020 (arXiv 2008.02454), with one spatial mode: the kernel ``(C, N)`` is
    ``(A_C ⊗ A_N)·alpha``. Computes exactly what an ``nn.Conv1d`` with that kernel computes (:meth:`to_dense`) with
    ``O·c·n`` instead of ``O·C·N`` multiplications per output position. Arguments, rules and errors are
    :class:`StructuredConv2d`'s, sides being ints or 1-tuples; ``pooling`` one of :data:`POOLINGS`.

    Example::

        >>> conv = nn.Conv1d(32, 32, 5, padding=2)
        >>> layer = StructuredConv1d.from_dense(conv, hidden_channels=16, hidden_kernel_size=3)
        >>> layer(torch.randn(1, 32, 50)).shape
        torch.Size([1, 32, 50])
    """

    _dims = 1
    _conv_type = nn.Conv1d


@register_kind
class StructuredConv3d(_StructuredConvNd):
    """Decomposed structured ``nn.Conv3d`` (video, volumes): sum-pool over (channels per group, D, H, W), then a
    small conv.

    From Bhalgat et al., NeurIPS 2020 (arXiv 2008.02454), with three spatial modes: the kernel ``(C, N_d, N_h, N_w)``
    is ``(A_C ⊗ A_D ⊗ A_H ⊗ A_W)·alpha``. Computes exactly what an ``nn.Conv3d`` with that kernel computes
    (:meth:`to_dense`) with ``O·c·n_d·n_h·n_w`` instead of ``O·C·N_d·N_h·N_w`` multiplications per output position.
    Arguments, rules and errors are :class:`StructuredConv2d`'s, sides being ints or 3-tuples; ``pooling`` one of
    :data:`POOLINGS_3D` (no ``"avg_pool"``: it would need a 4-D average pool).

    Example::

        >>> conv = nn.Conv3d(16, 16, 3, padding=1)
        >>> layer = StructuredConv3d.from_dense(conv, hidden_channels=8, hidden_kernel_size=2)
        >>> layer(torch.randn(1, 16, 4, 8, 8)).shape
        torch.Size([1, 16, 4, 8, 8])
    """

    _dims = 3
    _conv_type = nn.Conv3d
    poolings = POOLINGS_3D


@register_kind
class StructuredLinear(StructureRecordMixin, nn.Module):
    """Decomposed structured Linear layer: a 1-D sum-pool over input features, then ``Linear(c -> out)``.

    From Bhalgat et al., NeurIPS 2020 (arXiv 2008.02454): the Linear case of a structured kernel
    (C = in_features, N = 1). Equals ``nn.Linear`` with weight ``A_C·alpha`` (see :meth:`to_dense`).
    Raises ``ValueError`` for feature counts below 1, a non-bool ``bias`` or ``hidden_features`` outside
    ``1..in_features``.

    Example::

        >>> fc = nn.Linear(512, 10)
        >>> layer = StructuredLinear.from_dense(fc, hidden_features=256)
        >>> layer(torch.randn(4, 512)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        hidden_features: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features = check_positive_ints(
            "StructuredLinear", in_features=in_features, out_features=out_features
        )
        check_bool("bias", bias, owner="StructuredLinear")
        if hidden_features is None:
            hidden_features = in_features
        self.spec = StructureSpec(hidden_features, (1, 1))
        self.spec.validate((in_features,), layer="StructuredLinear")
        self.in_features, self.out_features, self.hidden_features = in_features, out_features, hidden_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, hidden_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @property
    def window(self) -> int:
        return self.in_features - self.hidden_features + 1

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.hidden_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "hidden_features": self.hidden_features,
        }

    def forward(self, x: Tensor) -> Tensor:
        if self.window > 1:
            x = window_sum(x, -1, self.window).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def pooling_additions(self, input_shape: Sequence[int]) -> int:
        """Additions of the sum-pool for an input of shape ``(..., in_features)``."""
        return window_sum_additions(self.in_features, self.window, others=math.prod(input_shape[:-1]))

    @classmethod
    def from_dense(cls, linear: nn.Linear, hidden_features: int | None = None) -> StructuredLinear:
        """Project ``linear``'s weight onto the structured subspace and return the decomposed layer."""
        _check_dense("StructuredLinear.from_dense", linear, nn.Linear)
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            hidden_features=hidden_features,
            device=weight.device,
            dtype=weight.dtype,
        )
        return _copy_weights(layer, to_alpha(weight.detach().double(), layer.spec), linear.bias)

    def dense_weight(self) -> Tensor:
        """The equivalent dense weight ``A_C·alpha`` of shape ``(out_features, in_features)``."""
        return from_alpha(self.weight, (self.in_features,))

    def to_dense(self) -> nn.Linear:
        """Fold back into an equivalent ``nn.Linear``."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return _copy_weights(linear, from_alpha(self.weight.detach().double(), (self.in_features,)), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"hidden_features={self.hidden_features}, bias={self.bias is not None}"
        )
