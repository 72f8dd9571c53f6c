"""Functional helpers shared by the cheap operators."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["window_sum", "window_sum_additions", "make_divisible"]


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
