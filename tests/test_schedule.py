"""StageSchedule (lightning_cheapconv/callbacks/schedule.py): layers split into stages over a range of epochs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning_fabric.utilities.exceptions import MisconfigurationException

from lightning_cheapconv.callbacks.schedule import StageSchedule

LAYERS = ["a", "b", "c", "d"]


def test_docstring_example() -> None:
    s = StageSchedule.build(LAYERS, start_epoch=2, end_epoch=4, stages=2)
    assert s.epochs == (2, 4)
    assert s.groups == (("d", "c"), ("b", "a"))
    assert s.due_by(3) == ("d", "c")
    assert s.due_at(3) == ()
    assert s.due_at(4) == ("b", "a")
    assert s.due_by(1) == ()
    assert s.due_by(10) == ("d", "c", "b", "a")
    assert s.last_epoch == 4


def test_shallow_first_keeps_model_order() -> None:
    s = StageSchedule.build(LAYERS, start_epoch=0, end_epoch=1, stages=2, order="shallow_first")
    assert s.groups == (("a", "b"), ("c", "d"))
    assert s.layers == ("a", "b", "c", "d")


def test_single_stage_converts_everything_at_start_epoch() -> None:
    s = StageSchedule.build(LAYERS, start_epoch=3, end_epoch=7, stages=1)
    assert s.epochs == (3,)
    assert s.groups == (("d", "c", "b", "a"),)
    assert s.due_at(3) == s.layers
    assert s.due_by(2) == ()
    assert s.last_epoch == 3


def test_epochs_spread_evenly_and_uneven_groups() -> None:
    s = StageSchedule.build(["l0", "l1", "l2", "l3", "l4"], start_epoch=0, end_epoch=4, stages=3)
    assert s.epochs == (0, 2, 4)
    assert [len(g) for g in s.groups] == [2, 2, 1]  # the first groups take the remainder
    assert s.groups == (("l4", "l3"), ("l2", "l1"), ("l0",))


def test_more_stages_than_layers_is_clamped() -> None:
    s = StageSchedule.build(["x", "y"], start_epoch=1, end_epoch=5, stages=4)
    assert s.epochs == (1, 5)
    assert s.groups == (("y",), ("x",))


def test_stages_closer_than_one_epoch_share_an_epoch() -> None:
    s = StageSchedule.build(LAYERS, start_epoch=0, end_epoch=1, stages=4)
    assert s.epochs[0] == 0 and s.epochs[-1] == 1
    assert list(s.epochs) == sorted(s.epochs)
    assert s.due_by(0) + s.due_at(1) == s.layers
    assert len(s.due_at(0)) + len(s.due_at(1)) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": 0}, "stages"),
        ({"stages": -1}, "stages"),
        ({"start_epoch": 3, "end_epoch": 2}, "before start epoch"),
        ({"order": "random"}, "order"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"start_epoch": 0, "end_epoch": 2, "stages": 2, **kwargs}
    with pytest.raises(MisconfigurationException, match=match):
        StageSchedule.build(LAYERS, **args)


@settings(max_examples=60, deadline=None)
@given(
    n_layers=st.integers(1, 12),
    start=st.integers(0, 5),
    span=st.integers(0, 6),
    stages=st.integers(1, 8),
    deep_first=st.booleans(),
)
def test_schedule_properties(n_layers: int, start: int, span: int, stages: int, deep_first: bool) -> None:
    layers = [f"layer{i}" for i in range(n_layers)]
    order = "deep_first" if deep_first else "shallow_first"
    s = StageSchedule.build(layers, start, start + span, stages, order)
    n_stages = min(stages, n_layers)
    assert len(s.epochs) == len(s.groups) == n_stages
    # Every layer exactly once, in the requested order.
    assert s.layers == tuple(reversed(layers) if deep_first else layers)
    # Balanced groups, none empty.
    sizes = [len(g) for g in s.groups]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    # Epochs in range, non-decreasing, from start to end.
    assert list(s.epochs) == sorted(s.epochs)
    assert s.epochs[0] == start
    assert s.last_epoch == (start + span if n_stages > 1 else start)
    # due_by accumulates due_at.
    seen: tuple[str, ...] = ()
    for epoch in range(start + span + 2):
        seen = seen + s.due_at(epoch)
        assert s.due_by(epoch) == seen
    assert seen == s.layers
