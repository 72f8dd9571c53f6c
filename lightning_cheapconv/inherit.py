"""Weight inheritance: map a trained ``nn.Conv2d`` onto a :class:`~lightning_cheapconv.nn.GhostConv2d` (and an
``nn.Conv1d``/``nn.Conv3d`` onto a ``GhostConv1d``/``GhostConv3d``: the same maths with ``d`` or ``d³`` taps).

DESIGN.md section 3. A ghost map is ``dw ∗ (W_i ∗ x)``: a depthwise ``d x d`` kernel applied to
intrinsic map ``i``. So ``m = ceil(O / s)`` of the original filters are kept as the primary conv
(exact), and every other filter ``o`` becomes a ghost of some intrinsic ``i`` whose depthwise
kernel is fitted by least squares:

- in *kernel space* (default): the composite kernel ``sum_q D[q] · shift_q(W_i)`` (offsets
  ``s·q + δ·r`` in input pixels, for stride ``s`` and dilation ``δ``) approximates ``W_o``;
- in *activation space* (with a calibration batch): ``dwconv(y_i, D)`` approximates ``y_o`` on
  the layer's real outputs, which also gets the zero padding at the borders right.

Both reduce to, per candidate intrinsic ``i``, a ``d² x d²`` Gram matrix ``G_i`` and, per pair
``(o, i)``, a cross term ``b_oi``: ``D = G_i⁻¹ b_oi`` and the squared error is
``‖t_o‖² - b_oiᵀ G_i⁻¹ b_oi``. All pairs are computed at once with convolutions, so a
ResNet-50 converts in about a second. Intrinsics and assignments are then chosen greedily:
filters that explain ``s - 1`` others best become intrinsics first and claim those others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.ghost import check_ghost_sizes
from .validation import check_finite_tensor, check_instance, check_int

__all__ = [
    "GhostFit",
    "assign_ghosts",
    "check_ghost_sizes",
    "fit_ghost_from_activations",
    "fit_ghost_from_kernels",
    "ghost_output_errors",
]


@dataclass
class GhostFit:
    """The result of fitting a Ghost module to a conv: which filters are intrinsic, which are ghosts of
    which, their depthwise kernels, and the relative output error of the fit."""

    intrinsics: Tensor  # (m,) original filter indices kept by the primary conv, in slot order
    ghost_of: dict[int, int]  # original filter index -> intrinsic slot (0..m-1)
    kernels: dict[int, Tensor]  # original filter index -> (d, d) depthwise kernel ((d,) in 1-d, (d, d, d) in 3-d)
    bias_shift: dict[int, float]  # original filter index -> bias of its ghost channel
    relative_error: float  # ‖fit - original‖ / ‖original‖ over all output channels


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _check_conv(conv: object, name: str) -> nn.Conv2d:
    """A plain dense conv (1-, 2- or 3-d) with finite weights: what a Ghost module can inherit from."""
    check_instance(name, conv, _CONVS)
    if conv.groups != 1:
        raise ValueError(f"{name}: groups={conv.groups}; Ghost weight inheritance needs a dense conv (groups=1)")
    check_finite_tensor(f"{name}.weight", conv.weight)
    if conv.bias is not None:
        check_finite_tensor(f"{name}.bias", conv.bias)
    return conv


def _correlations(
    kernels: Tensor, filters: Tensor, span: int, stride: tuple[int, ...], dilation: tuple[int, ...], groups: int = 1
) -> Tensor:
    """``F.conv2d(kernels, filters, groups=groups)`` at the pixel displacements ``s·Δ``, ``Δ`` in ``[-span, span]²``, of
    kernels whose taps lie ``δ`` pixels apart (stride ``s``, dilation ``δ``): ``(B, F, 2·span + 1, 2·span + 1)``
    (``F.conv1d``/``F.conv3d`` and one side per dimension for 1-d and 3-d kernels).

    Dilated kernels overlap only where ``s·Δ`` is a multiple of ``δ``: with ``g = gcd(s, δ)`` at ``Δ = (δ/g)·j``, where
    they are ``(s/g)·j`` taps apart. One conv of the compact kernels at stride ``s/g`` gives those entries; the others
    are zero. (Spreading the kernels out to their dilated size instead took ``δ²`` times the memory and time: 5 GB and
    most of a minute for DeepLabV3's dilation-36 ASPP conv.)
    """
    steps = [(d // math.gcd(s, d), s // math.gcd(s, d)) for s, d in zip(stride, dilation, strict=True)]
    reach = [span // step_delta for step_delta, _ in steps]
    taps = _CONV_FNS[len(stride)](
        kernels,
        filters,
        stride=tuple(step_taps for _, step_taps in steps),
        padding=tuple(step_taps * j for (_, step_taps), j in zip(steps, reach, strict=True)),
        groups=groups,
    )
    out = taps.new_zeros(*taps.shape[:2], *(2 * span + 1,) * len(stride))
    sides = [slice(span - delta * j, span + delta * j + 1, delta) for (delta, _), j in zip(steps, reach, strict=True)]
    out[(slice(None), slice(None), *sides)] = taps
    return out


def _ridge(gram: Tensor) -> Tensor:
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return gram + 1e-9 * scale[..., None, None] * eye


class _PairFits:
    """Least-squares fits of every target ``o`` from every candidate intrinsic ``i``.

    ``gram``: ``(I, t, t)``, ``cross``: ``(I, O, t)``, ``target_sq``: ``(O,)``, with ``t`` taps (``d²``; ``d``, ``d³``
    in 1-d, 3-d; or 1 when only the centre tap can fit, as for 1x1 kernels). Errors of all pairs are quadratic
    forms with the inverted Grams; kernels are solved only for the pairs that are kept.
    """

    def __init__(
        self, gram: Tensor, cross: Tensor, target_sq: Tensor, dw_size: int, chunk: int = 128, dims: int = 2
    ) -> None:
        self.inverse = torch.linalg.inv(_ridge(gram.double()))
        self.cross = cross
        self.target_sq = target_sq.double()
        self.dw_size, self.dims = dw_size, dims
        explained = []
        for start in range(0, cross.shape[0], chunk):
            b = cross[start : start + chunk].double()
            explained.append(torch.einsum("ioq,iqp,iop->io", b, self.inverse[start : start + chunk], b))
        self.errors = (self.target_sq[None, :] - torch.cat(explained)).clamp_min(0.0)  # (I, O)

    def kernels(self, intrinsics: Tensor, targets: Tensor) -> Tensor:
        """The ``(len, d, d)`` depthwise kernels that make each ``targets[j]`` from ``intrinsics[j]`` (one ``d`` per
        dimension)."""
        taps = torch.einsum("jqp,jp->jq", self.inverse[intrinsics], self.cross[intrinsics, targets].double())
        if taps.shape[1] == 1:
            full = taps.new_zeros(taps.shape[0], self.dw_size**self.dims)
            full[:, full.shape[1] // 2] = taps[:, 0]
            taps = full
        return taps.reshape(-1, *(self.dw_size,) * self.dims).float()

    def assign(self, ratio: int) -> tuple[list[int], dict[int, int], Tensor, Tensor]:
        """:func:`assign_ghosts` on the normalized pair errors: the intrinsic filters (in the order chosen),
        ``ghost -> intrinsic filter``, and the ``(owners, ghosts)`` index pairs in ghost order."""
        normalized = self.errors / self.target_sq.clamp_min(1e-30)[None, :]
        intrinsics, ghost_of = assign_ghosts(normalized, ratio)
        ghosts = torch.tensor(sorted(ghost_of), dtype=torch.long)
        owners = torch.tensor([ghost_of[g] for g in ghosts.tolist()], dtype=torch.long)
        return intrinsics, ghost_of, owners, ghosts

    def squared_error(self, owners: Tensor, ghosts: Tensor) -> float:
        """The fitted ghosts' squared error over the energy of all targets: the squared relative output error."""
        total = self.errors[owners, ghosts].sum().item() if len(ghosts) else 0.0
        return total / max(self.target_sq.sum().item(), 1e-30)


def assign_ghosts(errors: Tensor, ratio: int) -> tuple[list[int], dict[int, int]]:
    """Choose ``m = ceil(O / ratio)`` intrinsic filters and give each at most ``ratio - 1`` ghosts.

    ``errors[i, o]`` is the normalized error of making filter ``o`` a ghost of filter ``i``. Filters
    whose ``ratio - 1`` best partners fit best become intrinsics first and claim those partners;
    once ``m`` intrinsics exist, the remaining filters go to the best intrinsic with a free slot.
    Returns the intrinsic filters (in the order chosen) and ``ghost -> intrinsic filter``.

    Raises:
        ValueError: if ``errors`` is not a square matrix of finite values, or ``ratio`` is not an int >= 2.
    """
    check_finite_tensor("assign_ghosts: errors", errors)
    if errors.dim() != 2 or errors.shape[0] != errors.shape[1] or errors.shape[0] == 0:
        raise ValueError(
            f"assign_ghosts: errors must be a non-empty square (O, O) matrix, got shape {tuple(errors.shape)}"
        )
    check_int("ratio", ratio, 2, owner="assign_ghosts")
    count = errors.shape[0]
    slots = ratio - 1
    intrinsic_budget = -(-count // ratio)
    errors = errors.clone().double()
    errors.fill_diagonal_(float("inf"))
    k = min(slots, count - 1)
    score = errors.topk(k, dim=1, largest=False).values.sum(1) if k > 0 else torch.zeros(count, dtype=errors.dtype)
    free = torch.ones(count, dtype=torch.bool)
    intrinsics: list[int] = []
    ghost_of: dict[int, int] = {}
    capacity: dict[int, int] = {}
    for candidate in score.argsort().tolist():
        if not free[candidate] or len(intrinsics) == intrinsic_budget:
            continue
        free[candidate] = False
        intrinsics.append(candidate)
        row = errors[candidate].masked_fill(~free, float("inf"))
        take = min(slots, int(free.sum()))
        chosen = row.topk(take, largest=False).indices.tolist() if take else []
        for ghost in chosen:
            free[ghost] = False
            ghost_of[ghost] = candidate
        capacity[candidate] = slots - len(chosen)
    # Left-overs (only when intrinsic_budget ran out while filters were still free).
    for ghost in free.nonzero().flatten().tolist():
        open_ones = [i for i in intrinsics if capacity[i] > 0]
        best = min(open_ones, key=lambda i: errors[i, ghost].item())
        ghost_of[ghost] = best
        capacity[best] -= 1
    return intrinsics, ghost_of


def _finish(fits: _PairFits, ratio: int) -> GhostFit:
    intrinsics, ghost_of, owners, ghosts = fits.assign(ratio)
    slot = {filt: n for n, filt in enumerate(intrinsics)}
    kernels = fits.kernels(owners, ghosts) if len(ghosts) else torch.empty(0)
    return GhostFit(
        intrinsics=torch.tensor(intrinsics, dtype=torch.long),
        ghost_of={g: slot[i] for g, i in ghost_of.items()},
        kernels=dict(zip(ghosts.tolist(), kernels, strict=True)),
        bias_shift={},
        relative_error=fits.squared_error(owners, ghosts) ** 0.5,
    )


def fit_ghost_from_kernels(conv: nn.Conv2d, ratio: int, dw_size: int, name: str = "conv") -> GhostFit:
    """Fit in kernel space (no data needed). Exact away from image borders when a perfect fit exists.

    ``conv`` is a dense ``nn.Conv2d`` (or ``nn.Conv1d``/``nn.Conv3d``; ``groups=1``); ``ratio`` (s) an int >= 2;
    ``dw_size`` (d) an odd int >= 1.

    Raises:
        ValueError: naming ``name`` (the layer) for a grouped conv or NaN/inf weights, or the bad argument.
    """
    check_ghost_sizes(ratio, dw_size, owner=name)
    _check_conv(conv, name)
    weight = conv.weight.detach().float()
    out_channels = weight.shape[0]
    stride, dilation = tuple(conv.stride), tuple(conv.dilation)
    dims = len(stride)
    half = dw_size // 2
    flat = weight.flatten(1)
    target_sq = flat.pow(2).sum(1)
    if all(side == 1 for side in weight.shape[2:]):
        # Shifted copies of a 1x1 kernel never overlap the target: only the centre tap can fit.
        cross = (flat @ flat.T)[:, :, None]
        gram = target_sq[:, None, None]
    else:
        # cross[i, o, q] = <shift_q(W_i), W_o> at offsets s·(q - d//2) pixels; shape (o, i, d, d).
        cross = _correlations(weight, weight, half, stride, dilation).transpose(0, 1).flatten(2)
        # Autocorrelation of each W_i at displacements s·Δ, Δ in [-(d-1), d-1]², gives G_i[q, q'].
        grouped_in = weight.reshape(1, -1, *weight.shape[2:])
        auto = _correlations(grouped_in, weight, dw_size - 1, stride, dilation, groups=out_channels)[0]
        # Taps q in row-major order (as flatten lists them); G_i[q, p] is the autocorrelation at q - p per side.
        taps = torch.cartesian_prod(*[torch.arange(dw_size)] * dims).reshape(-1, dims)
        delta = taps[:, None, :] - taps[None, :, :] + dw_size - 1  # (d^n, d^n, n)
        gram = auto[(slice(None), *delta.unbind(-1))]
    fit = _finish(_PairFits(gram, cross, target_sq, dw_size, dims=dims), ratio)
    if conv.bias is not None:
        bias = conv.bias.detach().float()
        fit.bias_shift = {
            g: float(bias[g] - bias[fit.intrinsics[s]] * fit.kernels[g].sum()) for g, s in fit.ghost_of.items()
        }
    return fit


def fit_ghost_from_activations(
    conv: nn.Conv2d, inputs: Tensor, ratio: int, dw_size: int, max_positions: int = 16384, name: str = "conv"
) -> GhostFit:
    """Fit on the layer's real outputs for ``inputs`` (a calibration batch of the layer's *input*, ``(B, C, H, W)``;
    ``(B, C, L)`` for an ``nn.Conv1d``, ``(B, C, D, H, W)`` for an ``nn.Conv3d``).

    The least squares run over at most ``max_positions`` output positions (batch x height x width), drawn with a
    fixed seed when there are more. Positions are drawn before the ``d x d`` neighbourhoods are gathered, so memory
    beyond the layer's output is ``O x d² x min(B·H·W, max_positions)`` floats, not ``d²`` times the output.

    Raises:
        ValueError: naming ``name`` (the layer) for a grouped conv, NaN/inf weights or inputs, inputs whose shape
            the conv cannot take, or the bad argument.
    """
    check_ghost_sizes(ratio, dw_size, owner=name)
    check_int("max_positions", max_positions, 1, owner=name)
    _check_conv(conv, name)
    check_finite_tensor(f"{name}: inputs", inputs)
    dims = len(conv.kernel_size)
    if inputs.dim() != dims + 2 or inputs.shape[1] != conv.in_channels:
        sides = {1: "L", 2: "H, W", 3: "D, H, W"}[dims]
        raise ValueError(
            f"{name}: inputs of shape {tuple(inputs.shape)} do not fit the conv; valid shapes are "
            f"(B, {conv.in_channels}, {sides})"
        )
    bias = conv.bias.detach().float() if conv.bias is not None else None
    with torch.no_grad():
        # With the bias: the cheap conv sees the biased intrinsic maps, zero-padded at the borders.
        outputs = conv._conv_forward(inputs.float(), conv.weight.float(), bias)
    fits, patch_means, target_means = _activation_fits(outputs, dw_size, bias is not None, max_positions)
    fit = _finish(fits, ratio)
    if bias is not None:
        # The least-squares intercept: tap means differ from the map's mean near the zero-padded borders.
        fit.bias_shift = {
            g: float(target_means[g] - fit.kernels[g].flatten() @ patch_means[fit.intrinsics[s]])
            for g, s in fit.ghost_of.items()
        }
    return fit


def ghost_output_errors(
    outputs: Tensor,
    ratios: Sequence[int],
    dw_size: int = 3,
    bias: bool = False,
    max_positions: int = 16384,
    name: str = "conv",
) -> dict[int, float]:
    """The squared relative output error ``‖y' - y‖² / ‖y‖²`` that weight inheritance on activations
    (:func:`fit_ghost_from_activations`) reaches for each Ghost ratio in ``ratios``, from the layer's outputs ``y``.

    ``outputs``: a conv's outputs ``(B, O, H, W)`` (``(B, O, L)`` or ``(B, O, D, H, W)`` for 1-d and 3-d convs), bias
    included; ``bias``: whether the conv has one (the ghosts then get their own intercepts: targets and features are
    centred, as the fit does). The pair fits are computed once, on at most ``max_positions`` output positions drawn
    with a fixed seed (the same draw as :func:`fit_ghost_from_activations`), and :func:`assign_ghosts` picks
    intrinsics and ghosts for each ratio: a ratio's value is ``fit.relative_error ** 2`` of the fit with those
    positions. Dimensionless, in ``[0, 1]``; intrinsic channels are exact, so only the ghosts contribute.

    Raises:
        ValueError: naming ``name`` for outputs that are not a finite ``(B, O, ...)`` tensor of 1 to 3 spatial
            dimensions, or a ratio, ``dw_size`` or ``max_positions`` out of range.

    Example::

        >>> conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        >>> errors = ghost_output_errors(conv(torch.randn(2, 8, 8, 8)), (2, 4))
        >>> 0 <= errors[2] <= errors[4] <= 1
        True
    """
    check_instance(f"{name}: outputs", outputs, Tensor)
    if not 3 <= outputs.dim() <= 5:
        raise ValueError(
            f"{name}: outputs of shape {tuple(outputs.shape)} are not a conv's outputs; valid shapes are (B, O, L), "
            "(B, O, H, W) and (B, O, D, H, W)"
        )
    check_finite_tensor(f"{name}: outputs", outputs)
    check_int("max_positions", max_positions, 1, owner=name)
    for ratio in ratios:
        check_ghost_sizes(ratio, dw_size, owner=name)
    if not ratios:
        return {}
    fits = _activation_fits(outputs.detach().float(), dw_size, bias, max_positions)[0]
    result = {}
    for ratio in ratios:
        _, _, owners, ghosts = fits.assign(ratio)
        result[ratio] = fits.squared_error(owners, ghosts)
    return result


def _activation_fits(
    outputs: Tensor, dw_size: int, centre: bool, max_positions: int
) -> tuple[_PairFits, Tensor | None, Tensor | None]:
    """The pair fits of every output channel from every other on the outputs ``(B, O, ...)`` of a conv: at most
    ``max_positions`` positions (batch x spatial; drawn with seed 0 when there are more), their ``d``-neighbourhoods
    per spatial side (the cheap conv's zero padding), centred when ``centre`` (a layer with a bias: each ghost gets
    its own intercept). Returns the fits and the patch ``(O, d^n)`` and target ``(O,)`` means (``None`` uncentred)."""
    with torch.no_grad():
        positions = outputs.shape[0] * math.prod(outputs.shape[2:])
        if positions > max_positions:
            keep = torch.randperm(positions, generator=torch.Generator().manual_seed(0))[:max_positions]
        else:
            keep = torch.arange(positions)
        patches, targets = _neighbourhoods(outputs, keep.to(outputs.device), dw_size)
        patch_means = target_means = None
        if centre:
            patch_means, target_means = patches.mean(-1), targets.mean(-1)
            patches = patches - patch_means[..., None]
            targets = targets - target_means[:, None]
        gram = patches @ patches.transpose(1, 2)  # (I, d², d²)
        cross = torch.einsum("iqn,on->ioq", patches, targets)
        target_sq = targets.pow(2).sum(1)
        fits = _PairFits(gram, cross, target_sq, dw_size, dims=outputs.dim() - 2)
    return fits, patch_means, target_means


def _neighbourhoods(outputs: Tensor, keep: Tensor, dw_size: int) -> tuple[Tensor, Tensor]:
    """The ``d x d`` zero-padded neighbourhoods ``(O, d², N)`` and the values ``(O, N)`` of ``outputs`` (B, O, H, W)
    at the flat positions ``keep`` (index ``b·H·W + y·W + x``): what ``F.unfold(outputs, d, padding=d // 2)`` holds
    at those positions, in the same tap order, without unfolding the whole map. One side per spatial dimension
    for 1-d and 3-d maps (``d`` or ``d³`` taps, in row-major order)."""
    sizes = outputs.shape[2:]
    coords = []
    rest = keep
    for size in reversed(sizes):
        coords.append(rest % size)
        rest = rest // size
    b, coords = rest, coords[::-1]
    half = dw_size // 2
    taps = torch.cartesian_prod(*[torch.arange(dw_size)] * len(sizes)).reshape(-1, len(sizes)).tolist()
    patches = outputs.new_empty(outputs.shape[1], len(taps), len(keep))
    for tap, offsets in enumerate(taps):
        moved = [c + o - half for c, o in zip(coords, offsets, strict=True)]
        outside = torch.zeros_like(keep, dtype=torch.bool)
        for m, size in zip(moved, sizes, strict=True):
            outside |= (m < 0) | (m >= size)
        values = outputs[(b, slice(None), *(m.clamp(0, size - 1) for m, size in zip(moved, sizes, strict=True)))]
        values[outside] = 0.0  # (N, O)
        patches[:, tap] = values.T
    return patches, outputs[(b, slice(None), *coords)].T.contiguous()
