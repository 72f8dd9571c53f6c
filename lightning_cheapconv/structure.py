"""Composite-kernel maths of structured convolutions (Bhalgat et al., NeurIPS 2020, arXiv 2008.02454).

A kernel of shape ``(C, N_h, N_w)`` is *structured* with hidden sizes ``(c, n_h, n_w)`` when
``vec(W) = A @ alpha`` with the 0/1 matrix ``A = A_C ⊗ A_H ⊗ A_W``, where ``A_L`` (``L x l``) has
ones at rows ``j .. j + L - l`` of column ``j``. Everything here works mode by mode on those
small factors; the dense ``(C·N²)²`` projector is never built.

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

from .validation import check_finite_number, check_instance, check_int, check_int_pair, is_int

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
    ``(n_h, n_w)``. A Linear layer uses ``kernel_size=(1, 1)``.

    Example::

        >>> spec = StructureSpec(channels=16, kernel_size=(2, 2))
        >>> spec.validate((32, 3, 3), layer="layer1.0.conv1")
        >>> spec.num_weights
        64
    """

    channels: int
    kernel_size: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        kernel = _pair(self.kernel_size)
        object.__setattr__(self, "kernel_size", kernel)

    @property
    def num_weights(self) -> int:
        """Weights per output channel: ``c · n_h · n_w``."""
        return self.channels * self.kernel_size[0] * self.kernel_size[1]

    def validate(self, dense_shape: Sequence[int], layer: str = "layer") -> None:
        """Check ``1 <= c <= C`` and ``1 <= n <= N`` against a dense per-output kernel shape ``(C, N_h, N_w)``.

        Raises:
            ValueError: naming ``layer``, the offending value and the valid range.
        """
        big_c, big_h, big_w = _kernel_dims(dense_shape)
        checks = (
            ("channels (c)", self.channels, big_c),
            ("kernel height (n_h)", self.kernel_size[0], big_h),
            ("kernel width (n_w)", self.kernel_size[1], big_w),
        )
        for what, value, limit in checks:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{layer}: structured {what} must be an int, got {value!r}")
            if not 1 <= value <= limit:
                raise ValueError(f"{layer}: structured {what}={value} is out of range; valid range is 1..{limit}")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    """A spec's kernel size: an int or a pair of ints (range checks are :meth:`StructureSpec.validate`'s)."""
    if is_int(value):
        return (int(value), int(value))
    pair = tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) != 2 or not all(is_int(v) for v in pair):
        raise ValueError(f"kernel_size={value!r}: expected an int or a pair of ints")
    return (int(pair[0]), int(pair[1]))


def _kernel_dims(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, N_h, N_w)`` from a per-output kernel shape of 1 (Linear) or 3 (Conv2d) dims of positive ints."""
    shape = tuple(shape) if isinstance(shape, Sequence) else (shape,)
    if len(shape) in (1, 3) and all(is_int(d) and d >= 1 for d in shape):
        return (int(shape[0]), 1, 1) if len(shape) == 1 else tuple(int(d) for d in shape)  # type: ignore[return-value]
    raise ValueError(f"expected a kernel shape (C,) or (C, N_h, N_w) of positive ints, got {shape}")


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


def _mode_products(weight: Tensor, factors: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Apply one matrix per kernel mode: ``out[o, i, j, k] = F_C[i, a] F_H[j, b] F_W[k, c] w[o, a, b, c]``."""
    f_c, f_h, f_w = factors
    compute = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    out = torch.einsum("ia,oabc->oibc", f_c, compute)
    out = torch.einsum("jb,oibc->oijc", f_h, out)
    out = torch.einsum("kc,oijc->oijk", f_w, out)
    return out.to(weight.dtype)


def _as_4d(weight: Tensor) -> Tensor:
    check_instance("weight", weight, Tensor)
    if weight.dim() == 2:
        return weight[:, :, None, None]
    if weight.dim() == 4:
        return weight
    raise ValueError(f"expected a Linear (O, C) or Conv2d (O, C, N_h, N_w) weight, got shape {tuple(weight.shape)}")


def project(weight: Tensor, spec: StructureSpec) -> Tensor:
    """Orthogonal projection of each output channel's kernel onto the structured subspace.

    Works on Linear ``(O, C)`` and Conv2d ``(O, C, N_h, N_w)`` weights (C per group), is
    differentiable, and returns a tensor of the weight's shape and dtype.
    """
    w4 = _as_4d(weight)
    _, big_c, big_h, big_w = w4.shape
    check_instance("spec", spec, StructureSpec).validate((big_c, big_h, big_w))
    n_h, n_w = spec.kernel_size
    factors = (
        _factor("projector", big_c, spec.channels, w4),
        _factor("projector", big_h, n_h, w4),
        _factor("projector", big_w, n_w, w4),
    )
    return _mode_products(w4, factors).reshape(weight.shape)


def to_alpha(weight: Tensor, spec: StructureSpec) -> Tensor:
    """``alpha = A⁺ W`` of shape ``(O, c, n_h, n_w)`` (or ``(O, c)`` for a Linear weight)."""
    w4 = _as_4d(weight)
    _, big_c, big_h, big_w = w4.shape
    check_instance("spec", spec, StructureSpec).validate((big_c, big_h, big_w))
    n_h, n_w = spec.kernel_size
    factors = (
        _factor("pinv", big_c, spec.channels, w4),
        _factor("pinv", big_h, n_h, w4),
        _factor("pinv", big_w, n_w, w4),
    )
    alpha = _mode_products(w4, factors)
    return alpha.flatten(1) if weight.dim() == 2 else alpha


def from_alpha(alpha: Tensor, dense_shape: Sequence[int]) -> Tensor:
    """``W = A alpha``: the dense kernel of per-output shape ``(C, N_h, N_w)`` (or ``(C,)``) that ``alpha`` spans."""
    big_c, big_h, big_w = _kernel_dims(dense_shape)
    a4 = _as_4d(alpha)
    _, small_c, n_h, n_w = a4.shape
    factors = (
        _factor("basis", big_c, small_c, a4),
        _factor("basis", big_h, n_h, a4),
        _factor("basis", big_w, n_w, a4),
    )
    dense = _mode_products(a4, factors)
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
    """Expected residual of an i.i.d. random kernel: ``sqrt(1 - c·n_h·n_w / (C·N_h·N_w))``."""
    big_c, big_h, big_w = _kernel_dims(dense_shape)
    check_instance("spec", spec, StructureSpec, owner="random_residual").validate((big_c, big_h, big_w))
    return math.sqrt(1.0 - spec.num_weights / (big_c * big_h * big_w))


def check_structure_ratios(
    channel_ratio: object, kernel_reduction: object, kernel_size: object, owner: str | None = None
) -> tuple[float, int | None, tuple[int, int] | None]:
    """The ratios of :func:`spec_from_ratios`, checked: ``channel_ratio`` in ``(0, 1]``; ``kernel_size`` ``None`` or an
    int or pair of ints >= 1; ``kernel_reduction`` an int >= 0 (``None`` allowed only with a ``kernel_size``).

    Raises:
        ValueError: naming the argument, its value and the valid range (prefixed by ``owner``).
    """
    ratio = check_finite_number("channel_ratio", channel_ratio, 0, 1, exclusive_minimum=True, owner=owner)
    size = None if kernel_size is None else check_int_pair("kernel_size", kernel_size, 1, owner=owner)
    reduction = None
    if kernel_reduction is not None or size is None:
        reduction = check_int("kernel_reduction", kernel_reduction, 0, owner=owner)
    return ratio, reduction, size


def spec_from_ratios(
    dense_shape: Sequence[int],
    channel_ratio: float = 1.0,
    kernel_reduction: int | None = 1,
    kernel_size: int | tuple[int, int] | None = None,
    layer: str = "layer",
) -> StructureSpec:
    """Pick hidden sizes from ratios: ``c = round(C · channel_ratio)`` (at least 1), ``n = N - kernel_reduction``
    (at least 1), or an explicit ``kernel_size`` (clamped to the layer's kernel, so 1x1 layers keep 1x1).

    Raises:
        ValueError: naming ``layer`` and the argument out of range (see :func:`check_structure_ratios`).

    Example::

        >>> spec_from_ratios((64, 3, 3), channel_ratio=0.5)
        StructureSpec(channels=32, kernel_size=(2, 2))
    """
    big_c, big_h, big_w = _kernel_dims(dense_shape)
    channel_ratio, kernel_reduction, size = check_structure_ratios(channel_ratio, kernel_reduction, kernel_size, layer)
    channels = min(big_c, max(1, round(big_c * channel_ratio)))
    if size is not None:
        n_h, n_w = min(size[0], big_h), min(size[1], big_w)
    else:
        n_h, n_w = max(1, big_h - kernel_reduction), max(1, big_w - kernel_reduction)
    spec = StructureSpec(channels=channels, kernel_size=(n_h, n_w))
    spec.validate((big_c, big_h, big_w), layer=layer)
    return spec
