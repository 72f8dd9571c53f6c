"""When layers change: stages of layers spread over a range of epochs or of optimizer steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._lightning import MisconfigurationException
from ..validation import check_int

__all__ = ["StageSchedule", "Order", "Unit", "schedule_window"]

Order = Literal["deep_first", "shallow_first"]
Unit = Literal["epoch", "step"]


def schedule_window(
    who: str, prefix: str, start_epoch: Any, end_epoch: Any, start_step: Any, end_step: Any
) -> tuple[Unit, int | None, int | None]:
    """A window of stages given in epochs or in optimizer steps (``trainer.global_step``), not both.

    Returns ``(unit, start, end)``; ``start``/``end`` are ``None`` where not given.

    Raises:
        MisconfigurationException: a value that is not an int >= 0, both units given, or end before start.
    """
    values = {
        f"{prefix}start_epoch": start_epoch,
        f"{prefix}end_epoch": end_epoch,
        f"{prefix}start_step": start_step,
        f"{prefix}end_step": end_step,
    }
    for name, value in values.items():
        if value is not None:
            check_int(name, value, 0, owner=who, error=MisconfigurationException)
    epochs = start_epoch is not None or end_epoch is not None
    steps = start_step is not None or end_step is not None
    if epochs and steps:
        given = ", ".join(f"{k}={v!r}" for k, v in values.items() if v is not None)
        raise MisconfigurationException(f"{who}: give the schedule in epochs or in steps, not both ({given})")
    unit: Unit = "step" if steps else "epoch"
    start, end = (start_step, end_step) if steps else (start_epoch, end_epoch)
    if start is not None and end is not None and end < start:
        raise MisconfigurationException(
            f"{who}: {prefix}end_{unit}={end!r} is out of range; valid range is >= {prefix}start_{unit}={start}"
        )
    return unit, start, end


@dataclass(frozen=True)
class StageSchedule:
    """Layers split into ``len(epochs)`` groups; group ``i`` changes at the start of ``epochs[i]``.

    The unit is the caller's: epochs, or optimizer steps (then ``epochs`` holds steps).

    ``layers`` come in the model's order; ``order="deep_first"`` puts the deepest layers in the
    first group (the papers' advice: late layers are the most redundant and the cheapest to
    adapt), ``"shallow_first"`` the reverse.

    Example::

        >>> s = StageSchedule.build(["a", "b", "c", "d"], start_epoch=2, end_epoch=4, stages=2)
        >>> s.epochs, s.groups
        ((2, 4), (('d', 'c'), ('b', 'a')))
        >>> s.due_by(3)
        ('d', 'c')
    """

    epochs: tuple[int, ...]
    groups: tuple[tuple[str, ...], ...]

    @classmethod
    def build(
        cls, layers: Sequence[str], start_epoch: int, end_epoch: int, stages: int, order: Order = "deep_first"
    ) -> StageSchedule:
        if stages < 1:
            raise MisconfigurationException(f"stages={stages} is out of range; valid range is >= 1")
        if end_epoch < start_epoch:
            raise MisconfigurationException(f"end epoch {end_epoch} is before start epoch {start_epoch}")
        if order not in ("deep_first", "shallow_first"):
            raise MisconfigurationException(f"order={order!r}; valid values are 'deep_first' and 'shallow_first'")
        ordered = list(reversed(layers)) if order == "deep_first" else list(layers)
        stages = min(stages, len(ordered))
        if stages == 1:
            epochs = (start_epoch,)
        else:
            span = end_epoch - start_epoch
            epochs = tuple(start_epoch + round(i * span / (stages - 1)) for i in range(stages))
        size, extra = divmod(len(ordered), stages)
        groups, at = [], 0
        for i in range(stages):
            n = size + (1 if i < extra else 0)
            groups.append(tuple(ordered[at : at + n]))
            at += n
        return cls(epochs=epochs, groups=tuple(groups))

    def due_at(self, epoch: int) -> tuple[str, ...]:
        """Layers whose stage starts exactly at ``epoch``."""
        return tuple(name for e, group in zip(self.epochs, self.groups, strict=True) if e == epoch for name in group)

    def due_by(self, epoch: int) -> tuple[str, ...]:
        """Layers whose stage starts at or before ``epoch``."""
        return tuple(name for e, group in zip(self.epochs, self.groups, strict=True) if e <= epoch for name in group)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    @property
    def last_epoch(self) -> int:
        return self.epochs[-1]
