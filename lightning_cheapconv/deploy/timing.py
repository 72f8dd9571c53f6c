"""Timing candidates against each other (:func:`time_interleaved`, :class:`Latency`), and the
input each layer sees (shape, dtype, memory format) for timing it alone on a random input."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import _channels_last, _first_inputs


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True, repr=False)
class Latency:
    """Per-call latency samples of one candidate, in milliseconds; its repr summarizes them (``samples_ms`` holds
    every one).

    Example::

        >>> Latency((1.0, 1.2, 0.9)).median_ms
        1.0
        >>> Latency((1.0, 1.2, 0.9))
        Latency(median 1 ms, IQR 30%, 3 samples)
    """

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        """The median sample: the number every comparison here uses."""
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        """The fastest sample."""
        return min(self.samples_ms)

    @property
    def spread(self) -> float:
        """Interquartile range of the samples over their median: how noisy the machine was."""
        if len(self.samples_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4)
        return (q[2] - q[0]) / self.median_ms if self.median_ms > 0 else 0.0

    def __repr__(self) -> str:
        count = len(self.samples_ms)
        return f"Latency(median {self.median_ms:.4g} ms, IQR {self.spread:.0%}, {count} sample{'s' * (count != 1)})"


def time_interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    repeats: int = 7,
    min_time: float = 0.005,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Latency]:
    """Time callables against each other: warm-up, then ``repeats`` round-robin samples each, under inference mode.

    Each sample repeats its callable enough times to last about ``min_time`` seconds (calibrated
    per candidate after warm-up) and reports the time per call; the order rotates every
    repetition, so a noisy shared machine slows all candidates alike. With a CUDA ``device`` the
    GPU is synchronized around every sample. Compare ``median_ms`` values measured in one call.

    Example::

        >>> x = torch.randn(8, 16, 32, 32)
        >>> conv = nn.Conv2d(16, 16, 3, padding=1)
        >>> t = time_interleaved({"conv": lambda: conv(x), "relu": lambda: x.relu()}, repeats=3)
        >>> t["conv"].median_ms > 0
        True
    """
    if repeats < 1 or warmup < 0 or min_time < 0:
        raise ValueError(
            f"time_interleaved: need repeats >= 1, warmup >= 0, min_time >= 0; got {repeats}, {warmup}, {min_time}"
        )
    sync = _sync(torch.device(device) if device is not None else torch.device("cpu"))
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    number: dict[str, int] = {}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                candidates[name]()
        sync()
        for name in names:
            start = time.perf_counter()
            candidates[name]()
            sync()
            elapsed = time.perf_counter() - start
            number[name] = max(1, math.ceil(min_time / max(elapsed, 1e-7))) if min_time > 0 else 1
            number[name] = min(number[name], 10_000)
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                fn, calls = candidates[name], number[name]
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: Latency(tuple(values)) for name, values in samples.items()}


@dataclass(frozen=True)
class _Seen:
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool


def _capture_shapes(model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module]) -> tuple[dict[str, _Seen], Any]:
    """The shape, dtype and memory format of the input each named module sees (its first call), and the output."""
    return _first_inputs(model, x, modules, lambda t: _Seen(tuple(t.shape), t.dtype, _channels_last(t)))


def _random_input(seen: _Seen, device: torch.device) -> Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(seen.shape, generator=generator, device=device, dtype=torch.float32).to(seen.dtype)
    return t.contiguous(memory_format=torch.channels_last) if seen.channels_last else t
