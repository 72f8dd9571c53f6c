"""Argument checks shared by the plain API (``convert.py``, ``inherit.py``, ``structure.py``, ``complexity.py``), the
callbacks and the modules under ``nn/`` (whose constructors also check structure records from checkpoints): one
function per rule, so every message has the same shape. Plain Python and PyTorch only (no ``nn`` or Lightning import).

Each check returns the value it accepted (normalized: an ``int`` for integral numbers, a ``float`` for real ones, a
tuple of patterns) and otherwise raises ``error`` (``ValueError`` unless the caller passes its own class, as the
callbacks do with ``MisconfigurationException``) with a message that names the argument, repeats the value and
states the valid range, prefixed by ``owner`` when given::

    >>> check_int("ratio", 1, 2, owner="convert_to_ghost")
    Traceback (most recent call last):
    ValueError: convert_to_ghost: ratio=1 is out of range; valid range is >= 2 (an int)
    >>> check_int("ratio", 2.0, 2)
    Traceback (most recent call last):
    ValueError: ratio=2.0 is not an int; valid range is >= 2 (an int), got a float
    >>> check_bool("skip_first", "yes")
    Traceback (most recent call last):
    ValueError: skip_first='yes' is not a bool; valid values are True and False

Bools are refused wherever a number is expected (``True`` is an ``int`` to Python, never a ratio here), and numbers
wherever a bool is expected.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "is_int",
    "check_bool",
    "check_int",
    "check_int_pair",
    "check_finite_number",
    "check_choice",
    "check_patterns",
    "check_finite_tensor",
    "check_instance",
    "short_repr",
]

ErrorType = type[Exception]

_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxstring = _REPR.maxother = 80


def short_repr(value: Any) -> str:
    """``repr`` cut short for messages (a list of a million patterns shows its first 8)."""
    return _REPR.repr(value)


def _raise(error: ErrorType, owner: str | None, message: str) -> None:
    raise error(f"{owner}: {message}" if owner else message)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integral number (``int``, ``numpy.int64``, ...) but not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _problem(typed: bool, value: Any, expected: str) -> tuple[str, str]:
    """What is wrong with ``value`` and the message's tail: out of range where its type is right (``typed``), else
    not ``expected`` and, after the valid range, the type it has (``a float``, ``a bool``, ``None``)."""
    if typed:
        return "is out of range", ""
    name = type(value).__name__
    got = "None" if value is None else f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    return f"is not {expected}", f", got {got}"


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{minimum}..{maximum}"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return "unbounded"


def check_bool(name: str, value: Any, *, owner: str | None = None, error: ErrorType = ValueError) -> bool:
    """``value`` itself if it is a ``bool``; anything else (``"yes"``, ``1``, ``None``) raises ``error``."""
    if not isinstance(value, bool):
        _raise(error, owner, f"{name}={short_repr(value)} is not a bool; valid values are True and False")
    return value


def check_int(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    odd: bool = False,
    owner: str | None = None,
    error: ErrorType = ValueError,
) -> int:
    """``int(value)`` for an integral, non-bool ``value`` in ``minimum..maximum`` (either bound optional; odd only
    with ``odd=True``). Floats, even ``2.0``, raise ``error``."""
    valid = is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not valid or (odd and value % 2 == 0):
        kind = "an odd int" if odd else "an int"
        problem, got = _problem(is_int(value), value, "an int")
        bounds = _bounds(minimum, maximum)
        _raise(error, owner, f"{name}={short_repr(value)} {problem}; valid range is {bounds} ({kind}){got}")
    return int(value)


def check_int_pair(
    name: str,
    value: Any,
    minimum: int = 1,
    maximum: int | None = None,
    *,
    owner: str | None = None,
    error: ErrorType = ValueError,
) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of ints, each in ``minimum..maximum`` (``maximum`` optional): a kernel size,
    a stride."""
    pair = (value, value) if is_int(value) else value
    typed = isinstance(pair, Sequence) and len(pair) == 2 and all(is_int(v) for v in pair)
    if not typed or min(pair) < minimum or (maximum is not None and max(pair) > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        problem, got = _problem(typed, value, "an int or a pair of ints")
        _raise(
            error,
            owner,
            f"{name}={short_repr(value)} {problem}; each side must be {bounds} (an int, or a pair of ints){got}",
        )
    return (int(pair[0]), int(pair[1]))


def check_finite_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
    owner: str | None = None,
    error: ErrorType = ValueError,
) -> float:
    """``float(value)`` for a finite real, non-bool ``value`` within the bounds (``exclusive_minimum`` makes the
    lower one strict: ``(0, 1]``)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    valid = number and math.isfinite(value)
    if valid and minimum is not None:
        valid = value > minimum if exclusive_minimum else value >= minimum
    if valid and maximum is not None:
        valid = value <= maximum
    if not valid:
        if minimum is not None and maximum is not None:
            bounds = f"{'(' if exclusive_minimum else '['}{minimum}, {maximum}]"
        elif minimum is not None:
            bounds = f"{'>' if exclusive_minimum else '>='} {minimum}"
        else:
            bounds = _bounds(None, maximum)
        problem, got = _problem(number, value, "a number")
        _raise(error, owner, f"{name}={short_repr(value)} {problem}; valid range is {bounds} (a finite number){got}")
    return float(value)


def check_choice(
    name: str, value: Any, choices: Sequence[Any], *, owner: str | None = None, error: ErrorType = ValueError
) -> Any:
    """``value`` if it equals one of ``choices`` and has its type (so ``True`` never passes for ``1``)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        listed = " and ".join(filter(None, [", ".join(repr(c) for c in choices[:-1]), repr(choices[-1])]))
        _raise(error, owner, f"{name}={short_repr(value)} is not valid; valid values are {listed}")
    return value


def check_patterns(
    name: str, value: Any, *, owner: str | None = None, error: ErrorType = ValueError
) -> tuple[str, ...] | None:
    """``None``, or the glob patterns of a non-empty string or a sequence of them, as a tuple."""
    patterns = (value,) if isinstance(value, str) else value
    if value is None:
        return None
    if not (isinstance(patterns, Sequence) and patterns and all(isinstance(p, str) and p for p in patterns)):
        _raise(
            error,
            owner,
            f"{name}={short_repr(value)} is not valid; valid values are None, a glob pattern (a non-empty str) or "
            "a sequence of them",
        )
    return tuple(patterns)


def check_finite_tensor(name: str, value: Any, *, owner: str | None = None, error: ErrorType = ValueError) -> Tensor:
    """``value`` if it is a tensor without NaN or inf entries (a weight, a calibration batch)."""
    if not isinstance(value, Tensor):
        _raise(error, owner, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    finite = torch.isfinite(value.detach()) if value.is_floating_point() or value.is_complex() else None
    if finite is not None and not bool(finite.all()):
        bad = value.numel() - int(finite.sum())
        _raise(
            error,
            owner,
            f"{name} (shape {tuple(value.shape)}) has {bad} non-finite value(s) (NaN or inf) of {value.numel()}; "
            "valid values are finite",
        )
    return value


def check_instance(
    name: str, value: Any, types: type | tuple[type, ...], *, owner: str | None = None, error: ErrorType = ValueError
) -> Any:
    """``value`` if it is an instance of ``types`` (a model that must be an ``nn.Module``, say)."""
    if not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        _raise(error, owner, f"{name} must be a {wanted}, got {type(value).__name__}")
    return value
