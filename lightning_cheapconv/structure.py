"""Composite-kernel maths of structured convolutions (Bhalgat et al., NeurIPS 2020, arXiv 2008.02454).

A kernel of shape ``(C, N_h, N_w)`` is *structured* with hidden sizes ``(c, n_h, n_w)`` when
``vec(W) = A @ alpha`` with the 0/1 matrix ``A = A_C ⊗ A_H ⊗ A_W``, where ``A_L`` (``L x l``) has
ones at rows ``j .. j + L - l`` of column ``j``. Everything here works mode by mode on those
small factors; the dense ``(C·N²)²`` projector is never built.

The same holds for every kernel rank by one more or one fewer mode product: a Conv1d kernel
``(C, N)`` has ``A = A_C ⊗ A_N``, a Conv3d kernel ``(C, N_d, N_h, N_w)`` has
``A = A_C ⊗ A_D ⊗ A_H ⊗ A_W`` (and a Linear weight ``(C,)`` is the 2-d case with ``N = n = 1``).
A spec's ``kernel_size`` has one entry per spatial dimension of the kernel it describes.

Example::

    >>> spec = StructureSpec(channels=32, kernel_size=(2, 2))
    >>> w = torch.randn(64, 64, 3, 3)
    >>> w_s = project(w, spec)                  # nearest structured kernel
    >>> alpha = to_alpha(w_s, spec)             # (64, 32, 2, 2)
    >>> torch.allclose(from_alpha(alpha, (64, 3, 3)), w_s, atol=1e-5)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .validation import check_finite_number, check_instance, check_int, check_int_pair, is_int, short_repr

__all__ = [
    "StructureSpec",
    "composite_basis",
    "basis_pinv",
    "projector",
    "project",
    "to_alpha",
    "from_alpha",
    "structural_residual",
    "spec_from_ratios",
    "check_structure_ratios",
    "random_residual",
]


@dataclass(frozen=True)
class StructureSpec:
    """Hidden sizes ``(c, n_h, n_w)`` of a structured kernel.

    ``channels`` is ``c`` (per group for grouped convolutions) and ``kernel_size`` is
    ``(n_h, n_w)``. A Linear layer uses ``kernel_size=(1, 1)``. For Conv1d and Conv3d kernels
    ``kernel_size`` is ``(n,)`` and ``(n_d, n_h, n_w)``; an int means a 2-d ``(n, n)``.

    Example::

        >>> spec = StructureSpec(channels=16, kernel_size=(2, 2))
        >>> spec.validate((32, 3, 3), layer="layer1.0.conv1")
        >>> spec.num_weights
        64
    """

    channels: int
    kernel_size: tuple[int, ...] = (1, 1)

    def __post_init__(self) -> None:
        kernel = _kernel_tuple(self.kernel_size)
        object.__setattr__(self, "kernel_size", kernel)

    @property
    def num_weights(self) -> int:
        """Weights per output channel: ``c · n_h · n_w`` (``c · n`` in 1-d, ``c · n_d · n_h · n_w`` in 3-d)."""
        return self.channels * math.prod(self.kernel_size)

    def validate(self, dense_shape: Sequence[int], layer: str = "layer") -> None:
        """Check ``1 <= c <= C`` and ``1 <= n <= N`` against a dense per-output kernel shape ``(C, N_h, N_w)``
        (``(C, N)`` for Conv1d, ``(C, N_d, N_h, N_w)`` for Conv3d, ``(C,)`` for Linear).

        Raises:
            ValueError: naming ``layer``, the offending value and the valid range, or a kernel of another rank.
        """
        big_c, *big_n = _kernel_dims(dense_shape)
        if len(big_n) != len(self.kernel_size):
            raise ValueError(
                f"{layer}: structured kernel_size={self.kernel_size} has {len(self.kernel_size)} sides; the layer's "
                f"kernel {tuple(big_n)} has {len(big_n)}"
            )
        names = _SIDE_NAMES[len(big_n)]
        checks = (
            ("channels (c)", self.channels, big_c),
            *((f"kernel {name}", n, big) for name, n, big in zip(names, self.kernel_size, big_n, strict=True)),
        )
        for what, value, limit in checks:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{layer}: structured {what} must be an int, got {value!r}")
            if not 1 <= value <= limit:
                raise ValueError(f"{layer}: structured {what}={value} is out of range; valid range is 1..{limit}")


# What validate() calls each side of a kernel, by the number of spatial dimensions.
_SIDE_NAMES = {1: ("size (n)",), 2: ("height (n_h)", "width (n_w)"), 3: ("depth (n_d)", "height (n_h)", "width (n_w)")}


def _kernel_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    """A spec's kernel size: an int (2-d), or a tuple of 1, 2 or 3 ints (range checks are
    :meth:`StructureSpec.validate`'s)."""
    if is_int(value):
        return (int(value), int(value))
    sides = tuple(value) if isinstance(value, Sequence) else ()
    if len(sides) not in _SIDE_NAMES or not all(is_int(v) for v in sides):
        raise ValueError(
            f"kernel_size={value!r}: expected an int or a pair of ints (Conv2d), or a tuple of 1 or 3 ints "
            "(Conv1d, Conv3d)"
        )
    return tuple(int(v) for v in sides)


def _kernel_dims(shape: Sequence[int]) -> tuple[int, ...]:
    """``(C, N...)`` from a per-output kernel shape of positive ints: ``(C,)`` (Linear, read as ``(C, 1, 1)``),
    ``(C, N)`` (Conv1d), ``(C, N_h, N_w)`` (Conv2d) or ``(C, N_d, N_h, N_w)`` (Conv3d)."""
    shape = tuple(shape) if isinstance(shape, Sequence) else (shape,)
    if 1 <= len(shape) <= 4 and all(is_int(d) and d >= 1 for d in shape):
        return (int(shape[0]), 1, 1) if len(shape) == 1 else tuple(int(d) for d in shape)
    raise ValueError(
        f"expected a kernel shape (C,) or (C, N_h, N_w) (or (C, N), (C, N_d, N_h, N_w)) of positive ints, got {shape}"
    )


def _check_sizes(big: object, small: object) -> None:
    if not (is_int(big) and is_int(small) and 1 <= small <= big):
        raise ValueError(f"composite basis needs ints 1 <= small <= big, got small={small!r}, big={big!r}")


def composite_basis(big: int, small: int) -> Tensor:
    """``A_L`` of shape ``(big, small)`` in float64: column ``j`` has ones at rows ``j .. j + big - small``.

    Raises:
        ValueError: unless ``big`` and ``small`` are ints with ``1 <= small <= big``.
    """
    _check_sizes(big, small)
    rows = torch.arange(big).unsqueeze(1)
    cols = torch.arange(small).unsqueeze(0)
    return ((rows >= cols) & (rows <= cols + big - small)).to(torch.float64)


@lru_cache(maxsize=256)
def _pinv_cpu64(big: int, small: int) -> Tensor:
    # A_L has full column rank, so A⁺ = (AᵀA)⁻¹Aᵀ: a small solve instead of an SVD of a big matrix.
    basis = composite_basis(big, small)
    return torch.linalg.solve(basis.T @ basis, basis.T)


@lru_cache(maxsize=256)
def _projector_cpu64(big: int, small: int) -> Tensor:
    return composite_basis(big, small) @ _pinv_cpu64(big, small)


@lru_cache(maxsize=1024)
def _cached(kind: str, big: int, small: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    table = {"basis": composite_basis, "pinv": _pinv_cpu64, "projector": _projector_cpu64}
    return table[kind](big, small).to(device=device, dtype=dtype)


def _factor(kind: str, big: int, small: int, like: Tensor) -> Tensor:
    # Factors are built once in float64 and cached per (shape, dtype, device), so a training step
    # never recomputes a pseudo-inverse or copies a projector to the GPU again.
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return _cached(kind, big, small, dtype, like.device)


def basis_pinv(big: int, small: int) -> Tensor:
    """``A_L⁺`` of shape ``(small, big)`` in float64 (``ValueError`` unless ints ``1 <= small <= big``)."""
    _check_sizes(big, small)
    return _pinv_cpu64(big, small).clone()


def projector(big: int, small: int) -> Tensor:
    """``P_L = A_L A_L⁺`` of shape ``(big, big)`` in float64 (``ValueError`` unless ints ``1 <= small <= big``)."""
    _check_sizes(big, small)
    return _projector_cpu64(big, small).clone()


_MODES = "abcdefgh"  # einsum letters of a kernel's modes (channels, then spatial); "o" is the output channel


def _mode_products(weight: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Apply one matrix per kernel mode, one einsum per mode:
    ``out[o, i, j, k] = F_C[i, a] F_H[j, b] F_W[k, c] w[o, a, b, c]`` for a Conv2d weight (one mode fewer for
    Conv1d, one more for Conv3d)."""
    compute = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    old, new = _MODES[: len(factors)], "ijklmn"[: len(factors)]
    out = compute
    for mode, factor in enumerate(factors):
        before = old[mode:]
        # e.g. "jb,oibc->oijc": mode 1 of (o, i, b, c) goes from b to j; the modes before it are already new.
        subscripts = f"{new[mode]}{old[mode]},o{new[:mode]}{before}->o{new[: mode + 1]}{before[1:]}"
        out = torch.einsum(subscripts, factor, out)
    return out.to(weight.dtype)


def _as_kernel(weight: Tensor) -> Tensor:
    """A weight with its kernel modes: a Linear ``(O, C)`` weight as ``(O, C, 1, 1)``; conv weights as they are."""
    check_instance("weight", weight, Tensor)
    if weight.dim() == 2:
        return weight[:, :, None, None]
    if 3 <= weight.dim() <= 5:
        return weight
    raise ValueError(
        f"expected a Linear (O, C) or Conv2d (O, C, N_h, N_w) weight (or Conv1d (O, C, N), Conv3d "
        f"(O, C, N_d, N_h, N_w)), got shape {tuple(weight.shape)}"
    )


def _factors(kind: str, big: Sequence[int], small: Sequence[int], like: Tensor) -> list[Tensor]:
    return [_factor(kind, b, s, like) for b, s in zip(big, small, strict=True)]


def project(weight: Tensor, spec: StructureSpec) -> Tensor:
    """Orthogonal projection of each output channel's kernel onto the structured subspace.

    Works on Linear ``(O, C)``, Conv1d ``(O, C, N)``, Conv2d ``(O, C, N_h, N_w)`` and Conv3d
    ``(O, C, N_d, N_h, N_w)`` weights (C per group; ``spec.kernel_size`` has one side per spatial
    dimension), is differentiable, and returns a tensor of the weight's shape and dtype.

    Raises:
        ValueError: for a weight of another rank, or a spec that does not fit it (:meth:`StructureSpec.validate`).
    """
    kernel = _as_kernel(weight)
    big = kernel.shape[1:]
    check_instance("spec", spec, StructureSpec).validate(tuple(big))
    factors = _factors("projector", big, (spec.channels, *spec.kernel_size), kernel)
    return _mode_products(kernel, factors).reshape(weight.shape)


def to_alpha(weight: Tensor, spec: StructureSpec) -> Tensor:
    """``alpha = A⁺ W`` of shape ``(O, c, n_h, n_w)`` (``(O, c, n)`` for Conv1d, ``(O, c, n_d, n_h, n_w)`` for
    Conv3d, ``(O, c)`` for a Linear weight)."""
    kernel = _as_kernel(weight)
    big = kernel.shape[1:]
    check_instance("spec", spec, StructureSpec).validate(tuple(big))
    alpha = _mode_products(kernel, _factors("pinv", big, (spec.channels, *spec.kernel_size), kernel))
    return alpha.flatten(1) if weight.dim() == 2 else alpha


def from_alpha(alpha: Tensor, dense_shape: Sequence[int]) -> Tensor:
    """``W = A alpha``: the dense kernel of per-output shape ``(C, N_h, N_w)`` (``(C, N)``, ``(C, N_d, N_h, N_w)``
    or ``(C,)``) that ``alpha`` spans.

    Raises:
        ValueError: if ``dense_shape`` is not a kernel shape of ``alpha``'s rank with sides at least ``alpha``'s.
    """
    big = _kernel_dims(dense_shape)
    kernel = _as_kernel(alpha)
    small = kernel.shape[1:]
    if len(big) != len(small):
        raise ValueError(
            f"from_alpha: expected a kernel shape of {len(small)} dims for alpha of shape {tuple(alpha.shape)}, "
            f"got {tuple(dense_shape)}"
        )
    dense = _mode_products(kernel, _factors("basis", big, small, kernel))
    return dense.flatten(1) if alpha.dim() == 2 else dense


def structural_residual(weight: Tensor, spec: StructureSpec, eps: float = 1e-12) -> Tensor:
    """``‖(I - P) W‖_F / ‖W‖_F``: 0 for a structured kernel, about ``sqrt(1 - c·n²/(C·N²))`` for a random one.

    Differentiable; a scalar in float32 (float64 for float64 weights). ``eps`` (> 0) bounds the denominator.
    """
    check_finite_number("eps", eps, 0, exclusive_minimum=True, owner="structural_residual")
    check_instance("weight", weight, Tensor, owner="structural_residual")
    compute = weight if weight.dtype == torch.float64 else weight.float()
    moved = compute - project(compute, spec)
    return moved.norm() / compute.norm().clamp_min(eps)


def random_residual(dense_shape: Sequence[int], spec: StructureSpec) -> float:
    """Expected residual of an i.i.d. random kernel: ``sqrt(1 - c·n_h·n_w / (C·N_h·N_w))`` (any kernel rank)."""
    big = _kernel_dims(dense_shape)
    check_instance("spec", spec, StructureSpec, owner="random_residual").validate(big)
    return math.sqrt(1.0 - spec.num_weights / math.prod(big))


def _check_kernel_size(value: object, owner: str | None) -> tuple[int, ...]:
    """An int or a pair of ints >= 1 as a pair (:func:`~lightning_cheapconv.validation.check_int_pair`), or a tuple of
    1 or 3 ints >= 1 (Conv1d, Conv3d layers) as it is."""
    if is_int(value) or not isinstance(value, Sequence) or len(value) == 2:
        return check_int_pair("kernel_size", value, 1, owner=owner)
    if len(value) in (1, 3) and all(is_int(v) and v >= 1 for v in value):
        return tuple(int(v) for v in value)
    prefix = f"{owner}: " if owner else ""
    raise ValueError(
        f"{prefix}kernel_size={short_repr(value)} is out of range; each side must be >= 1 (an int, a pair of ints, "
        "or a tuple of 1 or 3 ints for Conv1d or Conv3d layers)"
    )


def check_structure_ratios(
    channel_ratio: object, kernel_reduction: object, kernel_size: object, owner: str | None = None
) -> tuple[float, int | None, tuple[int, ...] | None]:
    """The ratios of :func:`spec_from_ratios`, checked: ``channel_ratio`` in ``(0, 1]``; ``kernel_size`` ``None`` or an
    int or pair of ints >= 1 (a tuple of 1 or 3 for Conv1d/Conv3d layers); ``kernel_reduction`` an int >= 0 (``None``
    allowed only with a ``kernel_size``).

    Raises:
        ValueError: naming the argument, its value and the valid range (prefixed by ``owner``).
    """
    ratio = check_finite_number("channel_ratio", channel_ratio, 0, 1, exclusive_minimum=True, owner=owner)
    size = None if kernel_size is None else _check_kernel_size(kernel_size, owner)
    reduction = None
    if kernel_reduction is not None or size is None:
        reduction = check_int("kernel_reduction", kernel_reduction, 0, owner=owner)
    return ratio, reduction, size


def spec_from_ratios(
    dense_shape: Sequence[int],
    channel_ratio: float = 1.0,
    kernel_reduction: int | None = 1,
    kernel_size: int | tuple[int, ...] | None = None,
    layer: str = "layer",
) -> StructureSpec:
    """Pick hidden sizes from ratios: ``c = round(C · channel_ratio)`` (at least 1), ``n = N - kernel_reduction``
    (at least 1), or an explicit ``kernel_size`` (clamped to the layer's kernel, so 1x1 layers keep 1x1).

    ``dense_shape`` is a per-output kernel shape of any rank (:meth:`StructureSpec.validate`); an int
    ``kernel_size`` applies to every side, a tuple needs one entry per side.

    Raises:
        ValueError: naming ``layer`` and the argument out of range (see :func:`check_structure_ratios`), or a
            ``kernel_size`` tuple with another number of sides than the layer's kernel.

    Example::

        >>> spec_from_ratios((64, 3, 3), channel_ratio=0.5)
        StructureSpec(channels=32, kernel_size=(2, 2))
        >>> spec_from_ratios((64, 3, 3, 3), kernel_size=2)
        StructureSpec(channels=64, kernel_size=(2, 2, 2))
    """
    big_c, *big_n = _kernel_dims(dense_shape)
    channel_ratio, kernel_reduction, size = check_structure_ratios(channel_ratio, kernel_reduction, kernel_size, layer)
    channels = min(big_c, max(1, round(big_c * channel_ratio)))
    if size is not None:
        if is_int(kernel_size):
            size = (int(kernel_size),) * len(big_n)
        if len(size) != len(big_n):
            raise ValueError(
                f"{layer}: kernel_size={short_repr(kernel_size)} is out of range; the layer's kernel {tuple(big_n)} "
                f"has {len(big_n)} sides (pass an int for every side, or a tuple of {len(big_n)})"
            )
        hidden = tuple(min(n, big) for n, big in zip(size, big_n, strict=True))
    else:
        hidden = tuple(max(1, big - kernel_reduction) for big in big_n)
    spec = StructureSpec(channels=channels, kernel_size=hidden)
    spec.validate((big_c, *big_n), layer=layer)
    return spec
