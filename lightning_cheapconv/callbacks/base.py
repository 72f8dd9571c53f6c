"""What both callbacks share: layer selection, compression logging, the fit-end report, and state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .._lightning import Callback, LightningModule, MisconfigurationException, Trainer, rank_zero_info, rank_zero_warn
from ..checkpoint import install_restructure_hook
from ..complexity import count_complexity
from ..convert import LayerPlan
from ..report import compression_report
from .schedule import Order, StageSchedule
from .tracking import CompressionTracker, first_tensor

__all__ = ["CheapConvCallback"]

Patterns = str | Sequence[str] | None


def _check_patterns(name: str, value: Patterns) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise MisconfigurationException(f"{name} must be a glob pattern or a list of them, got {value!r}")


def _check_epoch(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise MisconfigurationException(f"{name}={value!r} is out of range; valid range is an int >= 0")


class CheapConvCallback(Callback):
    """Base of :class:`StructuredConvCallback` and :class:`GhostConvCallback`: subclasses decide *how*
    a layer becomes cheap; this class selects layers, keeps the stage schedule, logs
    ``compression/*`` at each validation epoch end, and prints the report at fit end."""

    method: str = ""

    def __init__(
        self,
        include: Patterns,
        exclude: Patterns,
        skip_first: bool,
        skip_last: bool,
        order: Order,
        verbose: int,
    ) -> None:
        _check_patterns("include", include)
        _check_patterns("exclude", exclude)
        if order not in ("deep_first", "shallow_first"):
            raise MisconfigurationException(f"order={order!r}; valid values are 'deep_first' and 'shallow_first'")
        if verbose not in (0, 1, 2):
            raise MisconfigurationException(f"verbose={verbose!r}; valid values are 0, 1 and 2")
        self.include, self.exclude = include, exclude
        self.skip_first, self.skip_last = skip_first, skip_last
        self.order: Order = order
        self.verbose = verbose
        self.plan: list[LayerPlan] = []
        self.schedule: StageSchedule | None = None
        self.tracker: CompressionTracker | None = None
        self._example: Tensor | None = None

    # -- subclass interface -------------------------------------------------------------------
    def _select(self, pl_module: LightningModule) -> list[LayerPlan]:
        raise NotImplementedError

    def _make_cheap_twin(self, name: str, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _cheap_layers(self) -> set[str]:
        """Target layers that count as cheap now."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, include=self.include, exclude=self.exclude)

    @property
    def targets(self) -> list[str]:
        return [p.name for p in self.plan if p.action == "convert"]

    def _setup_plan(self, pl_module: LightningModule) -> None:
        self._example = None  # a callback reused for another fit must not count MACs on the last fit's input
        self.plan = self._select(pl_module)
        if not self.targets:
            reasons = "; ".join(f"{p.name}: {p.reason}" for p in self.plan) or "the model has no Conv2d layers"
            raise MisconfigurationException(
                f"{type(self).__name__}: no layer of {type(pl_module).__name__} matches the selection "
                f"(include={self.include!r}, exclude={self.exclude!r}): {reasons}"
            )
        install_restructure_hook(pl_module)
        self.tracker = CompressionTracker(pl_module, self.targets, self._make_cheap_twin)
        if self.verbose:
            skipped = [p for p in self.plan if p.action == "skip"]
            rank_zero_info(
                f"{type(self).__name__}: {len(self.targets)} layer(s) selected, {len(skipped)} skipped"
                + "".join(f"\n  skip {p.name}: {p.reason}" for p in skipped if self.verbose > 1)
            )

    def _build_schedule(self, start: int, end: int, stages: int) -> None:
        self.schedule = StageSchedule.build(self.targets, start, end, stages, self.order)
        if self.verbose > 1:
            for epoch, group in zip(self.schedule.epochs, self.schedule.groups, strict=True):
                rank_zero_info(f"  epoch {epoch}: {', '.join(group)}")

    def _remember_example(self, pl_module: LightningModule, batch: Any) -> None:
        if self._example is not None:
            return
        example = getattr(pl_module, "example_input_array", None)
        if not isinstance(example, Tensor):
            example = first_tensor(batch)
        if isinstance(example, Tensor) and example.dim() >= 2:
            self._example = example[:1].detach().clone()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        self._remember_example(pl_module, batch)

    def _measure(self, pl_module: LightningModule) -> bool:
        assert self.tracker is not None
        if self.tracker.measured:
            return True
        if self._example is None:
            return False
        try:
            self.tracker.measure(pl_module, self._example.to(pl_module.device), self._cheap_now(pl_module))
        except Exception as err:  # a forward() that does not take the batch's first tensor
            rank_zero_warn(
                f"{type(self).__name__}: cannot count MACs: {type(pl_module).__name__}(example of shape "
                f"{tuple(self._example.shape)}) failed ({err}); set `example_input_array` on the module."
            )
            self._example = None
            return False
        return True

    def _cheap_now(self, pl_module: LightningModule) -> set[str]:
        """Target layers whose module is already in cheap form in the live model."""
        return {name for name in self.targets if not isinstance(pl_module.get_submodule(name), (nn.Conv2d, nn.Linear))}

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # No tracker outside fit (``trainer.validate`` before any fit): nothing to log.
        if trainer.sanity_checking or self.tracker is None or not self._measure(pl_module):
            return
        assert self.tracker is not None
        pl_module.log_dict(self.tracker.metrics(self._cheap_layers()), on_epoch=True, sync_dist=False)

    def _report(self, pl_module: LightningModule, title: str) -> None:
        """Rich table of the original vs the current model, on rank 0."""
        if not self.verbose or self._example is None or pl_module.trainer.global_rank != 0:
            return
        # Without a validation loop nothing has measured the model yet.
        if self.tracker is None or not self._measure(pl_module) or self._example is None:
            return
        example = self._example.to(pl_module.device)
        after = count_complexity(pl_module, example_input=example)
        before = self.tracker.original_complexity(after, self._cheap_now(pl_module))
        compression_report(before, after, title=title, changed_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "targets": list(self.targets)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("targets")
        if saved is not None and self.plan and list(saved) != self.targets:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was saved with target layers {saved}, but this run selects "
                f"{self.targets}; the schedule follows this run's selection."
            )
