"""Transposed convolutions in cheap forms: structured (a small transposed conv, then a box filter) and Ghost.

**Which channel dimension carries the structure.** A transposed conv's weight ``W`` has shape
``(C_in, C_out/groups, K...)`` and ``conv_transpose(·, W)`` is the adjoint of ``conv(·, W)``, the conv that
maps ``C_out`` channels to ``C_in`` with the same tensor. We structure each ``W[i]`` (one input channel's
``(C_out/groups, K...)`` block) exactly as :class:`~lightning_cheapconv.nn.StructuredConv2d` structures each
output channel's ``(C/groups, K...)`` block: ``W[i] = (A_C ⊗ A_K1 ⊗ ...) alpha[i]``. So the structure maths of
:mod:`lightning_cheapconv.structure` (``project``, ``to_alpha``, ``from_alpha``) apply to the weight as stored,
a weight shared by a structured conv and its transpose (tied autoencoders) keeps one structure, and the
decomposition below is the exact adjoint of the structured conv's (sum-pool, then small conv, becomes small
transposed conv, then "full" sum-pool). The multiplications drop from ``C_in·(C_out/g)·ΠK`` to
``C_in·c·Πn`` per input position.

**Derivation** (one spatial dim; each spatial dim is independent and alike). With stride ``s``, padding
``p``, output padding ``o``, dilation ``d``, per-group output channels ``O``, hidden sizes ``(c, n)``, windows
``w_c = O - c + 1`` and ``w = K - n + 1``, a transposed conv computes, for output channel ``u`` of a group
(``i`` over the group's input channels)::

    y[u, t] = Σ_i Σ_v Σ_j x[i, v] W[i, u, j] [t = v·s - p + j·d],   t < L_out = (L-1)s - 2p + d(K-1) + o + 1

and a structured ``W[i, u, j] = Σ_{a<c, b<n} alpha[i, a, b] [0 <= u-a < w_c] [0 <= j-b < w]``. Writing
``j = b + f`` and ``u = a + e``::

    y[u, t] = Σ_{e<w_c} Σ_{f<w} z[u - e, t + p - f·d],   z[a, τ] = Σ_i Σ_v Σ_b x[i, v] alpha[i, a, b] [τ = v·s + b·d]

``z = conv_transpose(x, alpha, stride s, padding 0, dilation d)`` (length ``(L-1)s + d(n-1) + 1``), and the
double sum is the *full* box filter: the adjoint of a sum-pool, a window sum over ``z`` padded with
``w_c - 1`` zero channels on both sides (``c`` channels grow to ``O``) and ``d(w-1)`` zeros on both sides of
each spatial dim, read from position ``p`` on. Reading from ``p`` on is a crop of ``p`` before the window
sum; the output ends ``o`` past the support's own end, so the right side is padded ``o`` more than the
left: ``y = window_sum_d(pad(z, (d(w-1) - p, d(w-1) - p + o)))`` (a negative pad crops). Where padding is
larger than that needs, the small conv crops ``q = min(p - d(w-1) - (max(s, d) - 1), d(n-1)//2)`` (when
positive) on both sides with its own padding, which keeps the right pad at or below zero for every output
padding (so no cropped value is needed back) and the small conv's output non-empty; the pads become
``(d(w-1) - p + q, d(w-1) - p + q + o)``. ``output_size`` only changes ``o``.
Groups: the small conv keeps ``groups``, each group's ``c`` channels growing to its ``O``. Bias is added
after the box filter (a bias inside it would be summed over windows clipped at the borders).

**Ghost** (Han et al., CVPR 2020): a primary transposed conv makes ``m = ceil(out / ratio)`` intrinsic maps
at the output resolution, a depthwise conv of the same dimension makes ``m·(ratio - 1)`` ghosts from them, and
``out_channels`` of the concatenation are kept (``output_index`` as in
:class:`~lightning_cheapconv.nn.GhostConv2d`). Weights are inherited in kernel space
(:meth:`GhostConvTranspose2d.from_dense` with ``init="inherit"``): the ghost of intrinsic ``i`` is
``upsample_s(x) ⊛ (W_i ⊛ dw)``, a kernel identity for any stride, because a transposed conv's stride acts
before its kernel. So the fit of :func:`~lightning_cheapconv.convert.ghost_from_conv` on the stride-1 conv
with the flipped kernel ``W.transpose(0, 1).flip(spatial)`` carries over unchanged.

Unsupported, and why: ``padding_mode`` other than ``'zeros'`` (``nn.ConvTranspose*`` has no other); grouped
Ghost primaries (a Ghost primary is dense, as for ``GhostConv2d``); BatchNorm folding (the box filter mixes
``c`` hidden channels into every output channel, so a per-output-channel scale has no place in ``alpha`` unless
``c = C_out/groups``; a folded Ghost needs a fused form like ``FusedGhostConv2d``); a Ghost ``to_dense`` (not
exact: the depthwise conv zero-pads the *cropped* primary output, and a dilated primary's composite kernel is
no dilated kernel); Ghost inheritance from activations (a calibration batch), and in the dimensions
``ghost_from_conv`` does not take; the structured sum-pool's ``avg_pool``/``cumsum`` forms (the box filter is
shifted adds in every runtime; ONNX Runtime runs them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..structure import StructureSpec, from_alpha, to_alpha
from ..validation import check_bool, check_choice, short_repr
from .functional import window_sum, window_sum_additions
from .ghost import _GhostConvNd, check_ghost_sizes
from .record import StructureRecordMixin, check_conv_sides, check_positive_ints, register_kind

__all__ = [
    "GhostConvTranspose1d",
    "GhostConvTranspose2d",
    "GhostConvTranspose3d",
    "StructuredConvTranspose1d",
    "StructuredConvTranspose2d",
    "StructuredConvTranspose3d",
    "TransposeArgs",
    "check_transpose_args",
    "transpose_config",
]

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class TransposeArgs(NamedTuple):
    """``nn.ConvTranspose{1,2,3}d``'s constructor arguments, checked and normalized by :func:`check_transpose_args`."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int
    bias: bool
    dilation: tuple[int, ...]
    padding_mode: str


def check_transpose_args(
    owner: str,
    dims: int,
    in_channels: Any,
    out_channels: Any,
    kernel_size: Any,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: Any = 1,
    bias: Any = True,
    dilation: Any = 1,
    padding_mode: Any = "zeros",
) -> TransposeArgs:
    """Check ``nn.ConvTranspose{dims}d``'s constructor arguments by the rules its forward relies on.

    Channels and groups are positive ints and ``groups`` divides both channel counts; kernel size, stride and
    dilation are positive ints or ``dims``-tuples of them; padding and output padding non-negative, with each
    side of ``output_padding`` below ``max(stride, dilation)`` of that side (PyTorch's rule); ``bias`` a bool;
    ``padding_mode`` ``'zeros'`` (the only mode transposed convs have).

    Returns:
        The arguments in ``nn.ConvTranspose2d``'s order, sides as tuples of plain ints.

    Raises:
        ValueError: naming ``owner``, the argument, its value and the valid range.

    Example::

        >>> check_transpose_args("up", 2, 8, 4, 4, stride=2, padding=1).kernel_size
        (4, 4)
    """
    in_channels, out_channels, groups = check_positive_ints(
        owner, in_channels=in_channels, out_channels=out_channels, groups=groups
    )
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{owner}: in_channels={in_channels} and out_channels={out_channels} "
            f"must both be divisible by groups={groups}"
        )
    kernel = check_conv_sides("kernel_size", kernel_size, 1, dims, owner)
    strides = check_conv_sides("stride", stride, 1, dims, owner)
    dilations = check_conv_sides("dilation", dilation, 1, dims, owner)
    pads = check_conv_sides("padding", padding, 0, dims, owner)
    extra = check_conv_sides("output_padding", output_padding, 0, dims, owner)
    limits = tuple(max(s, d) for s, d in zip(strides, dilations, strict=True))
    if any(o >= limit for o, limit in zip(extra, limits, strict=True)):
        raise ValueError(
            f"{owner}: output_padding={short_repr(output_padding)} is out of range; each side must be below "
            f"max(stride, dilation) = {limits}, as nn.ConvTranspose{dims}d requires"
        )
    check_bool("bias", bias, owner=owner)
    check_choice("padding_mode", padding_mode, ("zeros",), owner=owner)
    return TransposeArgs(in_channels, out_channels, kernel, strides, pads, extra, groups, bias, dilations, padding_mode)


def transpose_config(conv: nn.Module) -> dict[str, Any]:
    """The ``nn.ConvTranspose{1,2,3}d`` constructor arguments of a transposed conv or a cheap layer that replaced one.

    Example::

        >>> transpose_config(nn.ConvTranspose1d(4, 2, 3, stride=2))["stride"]
        (2,)
    """
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "output_padding": conv.output_padding,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "dilation": conv.dilation,
        "padding_mode": conv.padding_mode,
    }


def _check_dense(owner: str, dense: object, cls: type[nn.Module]) -> None:
    if not isinstance(dense, cls) or isinstance(dense, LazyModuleMixin):
        raise ValueError(f"{owner} expects an initialized nn.{cls.__name__}, got {type(dense).__name__}")


def _dense_for_record(dims: int, record: dict) -> nn.Module:
    """The ``nn.ConvTranspose{dims}d`` (on the meta device) that a cheap module with this (trusted) record replaced."""
    fields = transpose_config(_CONV_TRANSPOSE[dims](1, 1, 1, device="meta"))
    kwargs = {k: record.get(k, v) for k, v in fields.items()}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return _CONV_TRANSPOSE[dims](**kwargs, device="meta")


class _ReplacesConvTranspose:
    """What the transposed cheap modules share: the dimension ``_dims`` (fixed by each public class) and the dense
    ``nn.ConvTranspose{d}d`` they replace."""

    _dims: ClassVar[int] = 2

    @classmethod
    def dense_layer_for(cls, record: dict) -> nn.Module:
        """The ``nn.ConvTranspose{d}d`` (on the meta device: nothing allocated) that a module with this (trusted)
        structure record replaced: what :func:`~lightning_cheapconv.checkpoint.restructure` rebuilds where a
        checkpoint holds dense weights.

        Example::

            >>> StructuredConvTranspose2d.dense_layer_for(StructuredConvTranspose2d(4, 2, 3).structure_record())
            ConvTranspose2d(4, 2, kernel_size=(3, 3), stride=(1, 1))
        """
        return _dense_for_record(cls._dims, record)


class _StructuredConvTransposeNd(_ReplacesConvTranspose, StructureRecordMixin, nn.Module):
    """Dimension-generic structured transposed conv; the public classes fix ``_dims`` (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        output_padding: int | tuple[int, ...] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, ...] = 1,
        padding_mode: str = "zeros",
        hidden_channels: int | None = None,
        hidden_kernel_size: int | tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner, dims = type(self).__name__, self._dims
        args = check_transpose_args(
            owner, dims, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode,
        )  # fmt: skip
        self.in_channels, self.out_channels, self.groups = args.in_channels, args.out_channels, args.groups
        self.kernel_size, self.stride, self.padding = args.kernel_size, args.stride, args.padding
        self.output_padding, self.dilation, self.padding_mode = args.output_padding, args.dilation, args.padding_mode

        per_group = self.out_channels // self.groups
        if hidden_channels is None:
            hidden_channels = per_group
        if hidden_kernel_size is None:
            hidden_kernel_size = tuple(max(1, k - 1) for k in self.kernel_size)
        hidden_kernel = check_conv_sides("hidden_kernel_size", hidden_kernel_size, 1, dims, owner)
        self.spec = StructureSpec(hidden_channels, hidden_kernel)
        self.spec.validate((per_group, *self.kernel_size), layer=owner)
        self.hidden_channels, self.hidden_kernel_size = hidden_channels, hidden_kernel

        # The small transposed conv crops what it can with its own padding (on both sides, so no more than the
        # right side crops at the largest output padding), the box filter's pads do the rest (module docstring).
        spans = [d * (w - 1) for d, w in zip(self.dilation, self.windows[1:], strict=True)]
        self._small_padding = [
            min(max(0, p - span - max(s, d) + 1), d * (n - 1) // 2)
            for p, span, s, d, n in zip(self.padding, spans, self.stride, self.dilation, hidden_kernel, strict=True)
        ]
        self._left = [span - p + q for span, p, q in zip(spans, self.padding, self._small_padding, strict=True)]
        # Plain lists for forward (TorchScript reads neither properties nor a tuple of unknown length).
        self._stride, self._dilation, self._windows = list(self.stride), list(self.dilation), list(self.windows)
        self._kernel, self._padding, self._output_padding = (
            list(self.kernel_size),
            list(self.padding),
            list(self.output_padding),
        )
        self._owner = owner

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.in_channels, hidden_channels, *hidden_kernel, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **factory)) if args.bias else None
        self.reset_parameters()

    @property
    def windows(self) -> tuple[int, ...]:
        """The box filter's windows: ``(C_out/groups - c + 1, K_1 - n_1 + 1, ...)`` over (channels, spatial dims)."""
        spatial = (k - n + 1 for k, n in zip(self.kernel_size, self.hidden_kernel_size, strict=True))
        return (self.out_channels // self.groups - self.hidden_channels + 1, *spatial)

    # TorchScript compiles a module's properties; forward reads the plain lists set in __init__ instead.
    __jit_unused_properties__ = ["windows"]

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.weight[0].numel()), 1 / math.sqrt(self.weight[0].numel()))

    def config(self) -> dict[str, Any]:
        return {
            **transpose_config(self),
            "hidden_channels": self.hidden_channels,
            "hidden_kernel_size": self.hidden_kernel_size,
        }

    def box_filter(self, z: Tensor, output_padding: list[int]) -> Tensor:
        """The full box filter (adjoint of the sum-pool): ``(B, groups·c, *Z)`` from the small transposed conv to
        ``(B, C_out, *out)``, in ``z``'s dtype (summed in float32 for half-precision inputs).

        Example::

            >>> up = StructuredConvTranspose1d(1, 1, 3, hidden_kernel_size=2)
            >>> up.box_filter(torch.ones(1, 1, 3), [0])
            tensor([[[1., 2., 2., 1.]]])
        """
        in_dtype = z.dtype
        dims = len(self._left)
        pads: list[int] = []
        for i in range(dims - 1, -1, -1):
            pads += [self._left[i], self._left[i] + output_padding[i]]
        if any(p != 0 for p in pads):
            z = F.pad(z, pads)
        windows = self._windows
        for i in range(dims):
            if windows[i + 1] > 1:
                z = window_sum(z, 2 + i, windows[i + 1], self._dilation[i])
        if windows[0] > 1:
            grouped = F.pad(z.unflatten(1, (self.groups, -1)), [0, 0] * dims + [windows[0] - 1, windows[0] - 1])
            z = window_sum(grouped, 2, windows[0]).flatten(1, 2)
        return z.to(in_dtype)

    def forward(self, x: Tensor, output_size: Optional[list[int]] = None) -> Tensor:  # noqa: UP045
        z = torch.convolution(
            x, self.weight, None, self._stride, self._small_padding, self._dilation, True, [0] * len(self._left),
            self.groups,
        )  # fmt: skip
        y = self.box_filter(z, self._call_output_padding(x, output_size))
        if self.bias is not None:
            y = y + self.bias.reshape([-1] + [1] * len(self._left))
        return y

    def _call_output_padding(
        self,
        x: Tensor,
        output_size: Optional[list[int]],  # noqa: UP045 (TorchScript reads the annotation)
    ) -> list[int]:
        """The output padding of one call: the layer's own, or what ``output_size`` (the spatial sizes, or with the
        batch and channel dims) asks for, by ``nn.ConvTranspose*.forward``'s rule.

        Raises:
            ValueError: if ``output_size`` has the wrong length or a size outside the ones the input can give.
        """
        dims = len(self._kernel)
        if output_size is None:
            return self._output_padding
        if len(output_size) == x.dim():
            output_size = output_size[2:]
        if len(output_size) != dims:
            raise ValueError(
                f"{self._owner}: output_size must have {dims} or {x.dim()} elements, got {len(output_size)}"
            )
        extra: list[int] = []
        for i in range(dims):
            smallest = (
                (x.shape[2 + i] - 1) * self._stride[i]
                - 2 * self._padding[i]
                + self._dilation[i] * (self._kernel[i] - 1)
                + 1
            )
            largest = smallest + self._stride[i] - 1
            if output_size[i] < smallest or output_size[i] > largest:
                raise ValueError(
                    f"{self._owner}: requested an output size of {output_size}, but side {i} can only be "
                    f"{smallest}..{largest} for an input of {list(x.shape)}"
                )
            extra.append(output_size[i] - smallest)
        return extra

    def pooling_additions(self, input_shape: Sequence[int]) -> int:
        """Additions of the box filter for an input of shape ``(B, C_in, *L)`` at the layer's own output padding
        (not counted by FLOP counters): the binary-doubling window sums over each spatial dim, then channels.

        Example::

            >>> StructuredConvTranspose1d(1, 1, 3, hidden_kernel_size=2).pooling_additions((1, 1, 2))
            4
        """
        batch, _, *lengths = input_shape
        channels = batch * self.groups * self.hidden_channels
        sizes = [
            (length - 1) * s + d * (n - 1) + 1 - 2 * q + 2 * left + extra
            for length, s, d, n, q, left, extra in zip(
                lengths, self.stride, self.dilation, self.hidden_kernel_size, self._small_padding, self._left,
                self.output_padding, strict=True,
            )
        ]  # fmt: skip
        windows = self.windows
        adds = 0
        for i, (window, d) in enumerate(zip(windows[1:], self.dilation, strict=True)):
            others = channels * math.prod(sizes[:i] + sizes[i + 1 :])
            adds += window_sum_additions(sizes[i], window, d, others=others)
            sizes[i] -= d * (window - 1)
        padded = self.hidden_channels + 2 * (windows[0] - 1)
        return adds + window_sum_additions(padded, windows[0], others=batch * self.groups * math.prod(sizes))

    @classmethod
    def from_dense(
        cls,
        conv: nn.Module,
        hidden_channels: int | None = None,
        hidden_kernel_size: int | tuple[int, ...] | None = None,
    ) -> _StructuredConvTransposeNd:
        """Project ``conv``'s kernel onto the structured subspace and return the decomposed layer. The result equals
        ``conv`` with its weight replaced by the projected kernel (up to float rounding).

        Raises:
            ValueError: for anything but an initialized ``nn.ConvTranspose{d}d`` of this class's dimension, or
                hidden sizes out of range.
        """
        _check_dense(f"{cls.__name__}.from_dense", conv, _CONV_TRANSPOSE[cls._dims])
        weight = conv.weight
        layer = cls(
            **transpose_config(conv),
            hidden_channels=hidden_channels,
            hidden_kernel_size=hidden_kernel_size,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(to_alpha(weight.detach().double(), layer.spec))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def dense_weight(self) -> Tensor:
        """The equivalent dense kernel ``W = A·alpha`` of shape ``(C_in, C_out/groups, *K)`` (differentiable)."""
        return from_alpha(self.weight, (self.out_channels // self.groups, *self.kernel_size))

    def to_dense(self) -> nn.Module:
        """Fold back into an equivalent ``nn.ConvTranspose{d}d`` (same configuration, kernel ``A·alpha``)."""
        conv = _CONV_TRANSPOSE[self._dims](**transpose_config(self), device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(
                from_alpha(self.weight.detach().double(), (self.out_channels // self.groups, *self.kernel_size))
            )
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        for name, default in (("padding", 0), ("output_padding", 0), ("dilation", 1), ("groups", 1)):
            value = getattr(self, name)
            if value != (default,) * self._dims and value != default:
                s += f", {name}={value}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", hidden_channels={self.hidden_channels}, hidden_kernel_size={self.hidden_kernel_size}"


@register_kind
class StructuredConvTranspose1d(_StructuredConvTransposeNd):
    """Structured ``nn.ConvTranspose1d`` in decomposed form: a small transposed conv, then a box filter.

    From Bhalgat et al., NeurIPS 2020 (arXiv 2008.02454), transposed (see the module docstring for the derivation):
    equals ``nn.ConvTranspose1d`` with the structured kernel ``W = A·alpha`` (:meth:`to_dense`). Args mirror
    ``nn.ConvTranspose1d`` (``forward`` takes ``output_size`` too); ``hidden_channels`` is ``c`` per group of
    *output* channels (default ``C_out/groups``: spatial structure only), ``hidden_kernel_size`` is ``n`` (default
    ``K - 1``, at least 1). Raises ``ValueError`` naming the argument, its value and the valid range
    (:func:`check_transpose_args`, hidden sizes outside ``1..C_out/groups`` and ``1..K``).

    Example::

        >>> up = StructuredConvTranspose1d.from_dense(nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1))
        >>> up(torch.randn(1, 16, 50)).shape
        torch.Size([1, 8, 100])
    """

    _dims = 1


@register_kind
class StructuredConvTranspose2d(_StructuredConvTransposeNd):
    """Structured ``nn.ConvTranspose2d`` (U-Net decoders, segmentation upsampling) in decomposed form: a small
    transposed conv, then a box filter over (output channels per group, H, W).

    From Bhalgat et al., NeurIPS 2020 (arXiv 2008.02454), transposed (see the module docstring for the derivation):
    equals ``nn.ConvTranspose2d`` with the structured kernel ``W = A·alpha`` (:meth:`to_dense`), with
    ``C_in·c·n_h·n_w`` instead of ``C_in·(C_out/g)·K_h·K_w`` multiplications per input position; the box filter's
    additions are :meth:`pooling_additions`. Arguments and errors as :class:`StructuredConvTranspose1d`, sides
    being ints or pairs.

    Example::

        >>> up = StructuredConvTranspose2d(64, 32, 4, stride=2, padding=1, hidden_channels=16)
        >>> up(torch.randn(1, 64, 8, 8)).shape
        torch.Size([1, 32, 16, 16])
    """

    _dims = 2


@register_kind
class StructuredConvTranspose3d(_StructuredConvTransposeNd):
    """Structured ``nn.ConvTranspose3d`` (video, volumes) in decomposed form: a small transposed conv, then a box
    filter over (output channels per group, D, H, W).

    From Bhalgat et al., NeurIPS 2020 (arXiv 2008.02454), transposed (see the module docstring). Arguments and
    errors as :class:`StructuredConvTranspose1d`, sides being ints or 3-tuples.

    Example::

        >>> up = StructuredConvTranspose3d(8, 4, 2, stride=2, hidden_kernel_size=1)
        >>> up(torch.randn(1, 8, 2, 4, 4)).shape
        torch.Size([1, 4, 4, 8, 8])
    """

    _dims = 3


class _GhostConvTransposeNd(_ReplacesConvTranspose, StructureRecordMixin, nn.Module):
    """Dimension-generic Ghost transposed conv; the public classes fix ``_dims`` and ``_name``.

    The output-index rules, the state check and the concatenation are :class:`GhostConv2d`'s own methods (borrowed,
    not copied: they read only ``out_channels``, ``ratio``, ``intrinsic_channels``, ``output_index`` and ``_name``).
    """

    _name: ClassVar[str] = "GhostConvTranspose2d"

    # TorchScript compiles a module's properties; forward does not use these two.
    __jit_unused_properties__ = ["primary", "cheap"]

    set_output_index = _GhostConvNd.set_output_index
    _check_output_index = _GhostConvNd._check_output_index
    check_state = _GhostConvNd.check_state
    _assemble = _GhostConvNd._assemble

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        output_padding: int | tuple[int, ...] = 0,
        bias: bool = False,
        dilation: int | tuple[int, ...] = 1,
        ratio: int = 2,
        dw_size: int = 3,
        permuted: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner, dims = self._name, self._dims
        args = check_transpose_args(
            owner, dims, in_channels, out_channels, kernel_size, stride, padding, output_padding, 1, bias, dilation
        )
        check_bool("permuted", permuted, owner=owner)
        self.ratio, self.dw_size = check_ghost_sizes(ratio, dw_size, owner=owner)
        self.in_channels, self.out_channels = args.in_channels, args.out_channels
        self.intrinsic_channels = m = math.ceil(args.out_channels / self.ratio)
        factory = {"device": device, "dtype": dtype}
        self.primary_conv = _CONV_TRANSPOSE[dims](
            args.in_channels, m, args.kernel_size, args.stride, args.padding, args.output_padding, 1, args.bias,
            args.dilation, **factory,
        )  # fmt: skip
        self.cheap_operation = _CONV[dims](
            m, m * (self.ratio - 1), self.dw_size, 1, self.dw_size // 2, 1, m, args.bias, **factory
        )
        self.output_index: Tensor | None
        if permuted:
            self.register_buffer("output_index", torch.arange(args.out_channels, device=device))
        else:
            self.output_index = None

    @property
    def primary(self) -> nn.Module:
        """The primary ``nn.ConvTranspose{d}d`` (making the intrinsic maps)."""
        return self.primary_conv

    @property
    def cheap(self) -> nn.Module:
        """The depthwise ``nn.Conv{d}d`` that makes the ghosts."""
        return self.cheap_operation

    def config(self) -> dict[str, Any]:
        conv = self.primary_conv
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,
            "output_padding": conv.output_padding,
            "bias": conv.bias is not None,
            "dilation": conv.dilation,
            "ratio": self.ratio,
            "dw_size": self.dw_size,
            "permuted": self.output_index is not None,
        }

    def forward(self, x: Tensor, output_size: Optional[list[int]] = None) -> Tensor:  # noqa: UP045
        intrinsic = self.primary_conv(x, output_size)
        return self._assemble(intrinsic, self.cheap_operation(intrinsic))

    @classmethod
    def from_dense(
        cls, conv: nn.Module, ratio: int = 2, dw_size: int = 3, init: str = "random", name: str = "conv"
    ) -> _GhostConvTransposeNd:
        """The Ghost module that replaces the transposed conv ``conv`` (same configuration, ``groups=1``).

        ``init="random"`` starts from fresh weights; ``init="inherit"`` maps ``conv``'s trained filters onto it in
        kernel space (module docstring): ``m`` filters become the primary conv unchanged, the others are fitted as
        depthwise ghosts, and the channel order is kept with ``output_index``. The fit is
        :func:`~lightning_cheapconv.convert.ghost_from_conv`'s on the equivalent conv, so it covers the
        dimensions that function does. The new parameters take ``requires_grad`` from ``conv``'s.

        Raises:
            ValueError: naming ``name``, for anything but an initialized ``nn.ConvTranspose{d}d`` of this dimension,
                a grouped conv, an unknown ``init``, or what the fit refuses (NaN/inf weights, too few channels).

        Example::

            >>> up = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, bias=False)
            >>> GhostConvTranspose2d.from_dense(up, init="inherit")(torch.randn(1, 32, 8, 8)).shape
            torch.Size([1, 16, 16, 16])
        """
        check_choice("init", init, ("inherit", "random"), owner=name)
        _check_dense(f"{name}: {cls.__name__}.from_dense", conv, _CONV_TRANSPOSE[cls._dims])
        if conv.groups != 1:
            raise ValueError(f"{name}: groups={conv.groups}; a Ghost primary transposed conv is dense (groups=1)")
        weight = conv.weight
        config = {k: v for k, v in transpose_config(conv).items() if k not in ("groups", "padding_mode")}
        try:
            ghost = cls(**config, ratio=ratio, dw_size=dw_size, device=weight.device, dtype=weight.dtype)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        if init == "inherit":
            ghost._inherit(conv, name)
        for key, param in ghost.named_parameters():
            source = conv.bias if key.endswith("bias") and conv.bias is not None else weight
            param.requires_grad_(source.requires_grad)
        return ghost

    def _inherit(self, conv: nn.Module, name: str) -> None:
        """Copy the Ghost fit of the equivalent conv (kernel ``W.transpose(0, 1)`` flipped, stride 1) into this
        module: the primary weight transposed and flipped back, the cheap conv and ``output_index`` as they are."""
        from ..convert import ghost_from_conv  # convert builds on this package: import when used

        spatial = tuple(range(2, 2 + self._dims))
        equivalent = _CONV[self._dims](
            conv.in_channels, conv.out_channels, conv.kernel_size, dilation=conv.dilation, bias=conv.bias is not None,
            device="meta",
        )  # fmt: skip
        equivalent.weight = nn.Parameter(conv.weight.detach().transpose(0, 1).flip(spatial))
        equivalent.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach())
        fitted, _ = ghost_from_conv(equivalent, self.ratio, self.dw_size, init="inherit", name=name)
        with torch.no_grad():
            self.primary_conv.weight.copy_(fitted.primary.weight.flip(spatial).transpose(0, 1))
            self.cheap_operation.weight.copy_(fitted.cheap.weight)
            if conv.bias is not None:
                self.primary_conv.bias.copy_(fitted.primary.bias)
                self.cheap_operation.bias.copy_(fitted.cheap.bias)
        self.set_output_index(fitted.output_index)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, ratio={self.ratio}, dw_size={self.dw_size}, "
            f"intrinsic_channels={self.intrinsic_channels}, permuted={self.output_index is not None}"
        )


@register_kind
class GhostConvTranspose1d(_GhostConvTransposeNd):
    """Ghost module for ``nn.ConvTranspose1d``: a primary ``nn.ConvTranspose1d`` makes ``m = ceil(out / ratio)``
    intrinsic maps at the output resolution, a depthwise ``nn.Conv1d`` of size ``dw_size`` makes ``m·(ratio - 1)``
    ghosts from them, and ``out_channels`` of the concatenation are kept (optionally reordered by ``output_index``).

    From Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020, for a transposed conv. Conv-only
    (no BatchNorm or activation inside), ``groups=1``. Raises ``ValueError`` naming the argument, its value and
    the valid range (:func:`check_transpose_args`, a ``ratio`` below 2 or an even ``dw_size``).

    Example::

        >>> up = GhostConvTranspose1d(16, 8, 4, stride=2, padding=1)
        >>> up(torch.randn(1, 16, 50)).shape
        torch.Size([1, 8, 100])
    """

    _dims = 1
    _name = "GhostConvTranspose1d"


@register_kind
class GhostConvTranspose2d(_GhostConvTransposeNd):
    """Ghost module for ``nn.ConvTranspose2d`` (U-Net decoders, segmentation upsampling): a primary
    ``nn.ConvTranspose2d`` makes ``m = ceil(out / ratio)`` intrinsic maps, a depthwise ``dw_size x dw_size``
    ``nn.Conv2d`` makes the ghosts from them, ``out_channels`` of the concatenation are kept.

    From Han et al., CVPR 2020, for a transposed conv. Arguments and errors as :class:`GhostConvTranspose1d`,
    sides being ints or pairs; weight inheritance in :meth:`from_dense`.

    Example::

        >>> up = GhostConvTranspose2d(64, 32, 4, stride=2, padding=1)
        >>> up(torch.randn(1, 64, 8, 8)).shape
        torch.Size([1, 32, 16, 16])
    """

    _dims = 2
    _name = "GhostConvTranspose2d"


@register_kind
class GhostConvTranspose3d(_GhostConvTransposeNd):
    """Ghost module for ``nn.ConvTranspose3d`` (video, volumes): a primary ``nn.ConvTranspose3d``, a depthwise
    ``nn.Conv3d`` cheap operation on its output, ``out_channels`` of the concatenation kept.

    From Han et al., CVPR 2020, for a transposed conv. Arguments and errors as :class:`GhostConvTranspose1d`,
    sides being ints or 3-tuples.

    Example::

        >>> up = GhostConvTranspose3d(8, 4, 2, stride=2)
        >>> up(torch.randn(1, 8, 2, 4, 4)).shape
        torch.Size([1, 4, 4, 8, 8])
    """

    _dims = 3
    _name = "GhostConvTranspose3d"
