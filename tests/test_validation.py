"""The shared argument checks (lightning_cheapconv/validation.py): accepted values, messages, error classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_cheapconv.validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_finite_tensor,
    check_instance,
    check_int,
    check_int_pair,
    check_patterns,
    is_int,
    short_repr,
)


class CallbackError(Exception):
    """Stands for the exception class a caller passes (the callbacks pass MisconfigurationException)."""


@pytest.mark.parametrize(
    "call,expected",
    [
        (lambda: check_bool("flag", True), True),
        (lambda: check_bool("flag", False), False),
        (lambda: check_int("n", 3, 2), 3),
        (lambda: check_int("n", np.int64(4), 1, 4), 4),
        (lambda: check_int("d", 5, 1, odd=True), 5),
        (lambda: check_int("n", -7), -7),
        (lambda: check_int_pair("k", 3), (3, 3)),
        (lambda: check_int_pair("k", (1, 2)), (1, 2)),
        (lambda: check_int_pair("k", [0, 0], 0), (0, 0)),
        (lambda: check_int_pair("k", (np.int64(2), 8), 1, 8), (2, 8)),
        (lambda: check_finite_number("r", 1, 0, 1, exclusive_minimum=True), 1.0),
        (lambda: check_finite_number("r", 0.0, 0), 0.0),
        (lambda: check_finite_number("r", np.float32(0.5), maximum=1), 0.5),
        (lambda: check_choice("init", "random", ("inherit", "random")), "random"),
        (lambda: check_choice("verbose", 2, (0, 1, 2)), 2),
        (lambda: check_patterns("include", None), None),
        (lambda: check_patterns("include", "layer1.*"), ("layer1.*",)),
        (lambda: check_patterns("include", ["a", "b"]), ("a", "b")),
        (lambda: check_instance("model", nn.ReLU(), nn.Module).__class__, nn.ReLU),
    ],
)
def test_accepted_values_come_back_normalized(call, expected):
    result = call()
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda **kw: check_bool("skip_first", "yes", **kw),
            "skip_first='yes' is not a bool; valid values are True and False",
        ),
        (lambda **kw: check_bool("skip_first", 1, **kw), "skip_first=1 is not a bool; valid values are True and False"),
        (lambda **kw: check_int("ratio", 1, 2, **kw), "ratio=1 is out of range; valid range is >= 2 (an int)"),
        (
            lambda **kw: check_int("ratio", 2.0, 2, **kw),
            "ratio=2.0 is not an int; valid range is >= 2 (an int), got a float",
        ),
        (
            lambda **kw: check_int("ratio", True, 1, **kw),
            "ratio=True is not an int; valid range is >= 1 (an int), got a bool",
        ),
        (lambda **kw: check_int("n", 9, 1, 8, **kw), "n=9 is out of range; valid range is 1..8 (an int)"),
        (lambda **kw: check_int("n", 9, maximum=8, **kw), "n=9 is out of range; valid range is <= 8 (an int)"),
        (
            lambda **kw: check_int("dw_size", 2, 1, odd=True, **kw),
            "dw_size=2 is out of range; valid range is >= 1 (an odd int)",
        ),
        (
            lambda **kw: check_int_pair("kernel_size", 2.0, **kw),
            "kernel_size=2.0 is not an int or a pair of ints; each side must be >= 1 (an int, or a pair of ints), "
            "got a float",
        ),
        (
            lambda **kw: check_int_pair("kernel_size", (1, 2, 3), **kw),
            "kernel_size=(1, 2, 3) is not an int or a pair of ints; each side must be >= 1 (an int, or a pair of "
            "ints), got a tuple",
        ),
        (lambda **kw: check_int_pair("kernel_size", (0, 2), **kw), "kernel_size=(0, 2) is out of range"),
        (
            lambda **kw: check_int_pair("stride", (1, 9), 1, 8, **kw),
            "stride=(1, 9) is out of range; each side must be in 1..8 (an int, or a pair of ints)",
        ),
        (
            lambda **kw: check_int_pair("padding", -1, 0, 8, **kw),
            "padding=-1 is out of range; each side must be in 0..8 (an int, or a pair of ints)",
        ),
        (
            lambda **kw: check_finite_number("channel_ratio", 0, 0, 1, exclusive_minimum=True, **kw),
            "channel_ratio=0 is out of range; valid range is (0, 1] (a finite number)",
        ),
        (
            lambda **kw: check_finite_number("lam", -1, 0, **kw),
            "lam=-1 is out of range; valid range is >= 0 (a finite number)",
        ),
        (
            lambda **kw: check_finite_number("eps", 0.0, 0, exclusive_minimum=True, **kw),
            "eps=0.0 is out of range; valid range is > 0 (a finite number)",
        ),
        (lambda **kw: check_finite_number("x", float("inf"), **kw), "x=inf is out of range"),
        (
            lambda **kw: check_finite_number("x", True, **kw),
            "x=True is not a number; valid range is unbounded (a finite number), got a bool",
        ),
        (
            lambda **kw: check_finite_number("x", "0.5", **kw),
            "x='0.5' is not a number; valid range is unbounded (a finite number), got a str",
        ),
        (
            lambda **kw: check_choice("init", "kaiming", ("inherit", "random"), **kw),
            "init='kaiming' is not valid; valid values are 'inherit' and 'random'",
        ),
        (
            lambda **kw: check_choice("verbose", True, (0, 1, 2), **kw),
            "verbose=True is not valid; valid values are 0, 1 and 2",
        ),
        (lambda **kw: check_patterns("include", 5, **kw), "include=5 is not valid; valid values are None, a glob"),
        (lambda **kw: check_patterns("include", ["a", 1], **kw), "include=['a', 1] is not valid"),
        (lambda **kw: check_patterns("include", "", **kw), "include='' is not valid"),
        (lambda **kw: check_patterns("include", (), **kw), "include=() is not valid"),
        (lambda **kw: check_finite_tensor("calibration", [1.0], **kw), "calibration must be a torch.Tensor, got list"),
        (
            lambda **kw: check_finite_tensor("w", torch.tensor([1.0, float("nan"), float("-inf")]), **kw),
            "w (shape (3,)) has 2 non-finite value(s) (NaN or inf) of 3; valid values are finite",
        ),
        (lambda **kw: check_instance("model", 3, nn.Module, **kw), "model must be a Module, got int"),
        (lambda **kw: check_instance("x", 3, (str, bytes), **kw), "x must be a str or bytes, got int"),
    ],
)
def test_messages_name_argument_value_and_range_with_owner_and_error_class(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message)
    with pytest.raises(CallbackError) as info:
        call(owner="GhostConvCallback", error=CallbackError)
    assert str(info.value).startswith(f"GhostConvCallback: {message}")


def test_is_int_means_integral_but_not_bool():
    assert is_int(3) and is_int(np.int64(-1)) and is_int(10**30)
    assert not any(is_int(v) for v in (True, np.bool_(True), 2.0, "3", None, torch.tensor(3)))


def test_finite_tensors_pass_whatever_their_dtype():
    for value in (torch.zeros(2, 3), torch.arange(4), torch.ones(2, dtype=torch.bool)):
        assert check_finite_tensor("x", value) is value


def test_short_repr_cuts_long_values():
    assert short_repr("yes") == "'yes'"
    assert short_repr(list(range(100))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"
    assert len(short_repr("x" * 10_000)) < 100
    with pytest.raises(ValueError) as info:
        check_patterns("include", list(range(1000)))
    assert len(str(info.value)) < 200
