"""When layers change: stages of layers spread over a range of epochs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .._lightning import MisconfigurationException

__all__ = ["StageSchedule", "Order"]

Order = Literal["deep_first", "shallow_first"]


@dataclass(frozen=True)
class StageSchedule:
    """Layers split into ``len(epochs)`` groups; group ``i`` changes at the start of ``epochs[i]``.

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
