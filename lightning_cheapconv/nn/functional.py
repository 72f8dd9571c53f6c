"""Functional helpers shared by the cheap operators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_sum", "window_sum_cumsum", "window_sum_additions", "make_divisible"]


def window_sum(x: Tensor, dim: int, window: int, dilation: int = 1) -> Tensor:
    """Sliding-window sum at stride 1 along ``dim``: ``out[u] = sum_{t < window} x[u + dilation * t]``.

    Built from shifted adds by binary doubling (windows of 1, 2, 4, ... combined by the bits of
    ``window``), so a window of 2 is one add and a window of 33 is six. Measured here to be as fast
    as or faster than ``cumsum`` differences and 0/1-kernel convolutions, and exact (no
    cancellation of large prefix sums). Half-precision inputs are summed in float32; the result
    keeps float32 so the caller decides when to cast back.

    Example::

        >>> window_sum(torch.arange(5.0), dim=0, window=2)
        tensor([1., 3., 5., 7.])
    """
    if window < 1 or dilation < 1:
        raise ValueError(f"window_sum needs window >= 1 and dilation >= 1, got window={window}, dilation={dilation}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    length = x.shape[dim] - dilation * (window - 1)
    if length < 1:
        raise ValueError(
            f"window_sum: a window of {window} (dilation {dilation}) does not fit a dimension of size {x.shape[dim]}"
        )
    result: Tensor | None = None
    start = 0
    block, size, remaining = x, 1, window
    while remaining:
        if remaining & 1:
            part = block.narrow(dim, start * dilation, length)
            result = part if result is None else result + part
            start += size
        remaining >>= 1
        if remaining:
            shift = size * dilation
            keep = block.shape[dim] - shift
            block = block.narrow(dim, 0, keep) + block.narrow(dim, shift, keep)
            size *= 2
    assert result is not None
    return result


def window_sum_cumsum(x: Tensor, dim: int, window: int) -> Tensor:
    """Sliding-window sum at stride 1 along ``dim`` as a cumulative-sum difference:
    ``out[u] = S[u + window] - S[u]`` with ``S`` the prefix sums of ``x`` after a zero (``S[0] = 0``).

    The same values as :func:`window_sum` (no dilation) in five operators whatever the window (ONNX: Pad,
    CumSum, two Slices, Sub), where the shifted adds take about ``2·log2(window)``; the structured layers
    use it for wide channel windows in exported graphs (``benchmarks/pooling.py`` measured it in ONNX
    Runtime). Rounding: an output's error is about ``eps`` times the prefix sum it is read from, not its
    own window's sum, so it grows with the position along ``dim`` (exact in float64 to ~1e-15 relative;
    in float32 to ~1e-6 relative over a few hundred channels). Half-precision inputs are summed in float32
    and the result keeps float32, as :func:`window_sum`'s does.

    Raises ``ValueError`` for ``window < 1`` or a window longer than the dimension.

    Example::

        >>> window_sum_cumsum(torch.arange(5.0), dim=0, window=2)
        tensor([1., 3., 5., 7.])
    """
    if window < 1:
        raise ValueError(f"window_sum_cumsum needs window >= 1, got window={window}")
    dim = dim % x.dim()
    length = x.shape[dim] - window + 1
    if length < 1:
        raise ValueError(f"window_sum_cumsum: a window of {window} does not fit a dimension of size {x.shape[dim]}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    # F.pad lists (before, after) pairs from the last dimension backwards: one zero before position 0 of dim.
    sums = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [1, 0]).cumsum(dim)
    return sums.narrow(dim, window, length) - sums.narrow(dim, 0, length)


def window_sum_additions(length: int, window: int, dilation: int = 1, others: int = 1) -> int:
    """Additions :func:`window_sum` performs along a dimension of ``length``, times ``others`` positions."""
    adds, size, remaining, used, block_len = 0, 1, window, 0, length
    out_len = length - dilation * (window - 1)
    while remaining:
        if remaining & 1:
            adds += out_len if used else 0
            used += 1
        remaining >>= 1
        if remaining:
            block_len -= size * dilation
            adds += block_len
            size *= 2
    return adds * others


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going below ``round_limit · value``
    (the channel rounding of MobileNet/GhostNet)."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded
