"""What both callbacks share: layer selection, compression logging, the fit-end report, and state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._lightning import Callback, LightningModule, MisconfigurationException, Trainer, rank_zero_info, rank_zero_warn
from ..calls import ModelCall
from ..checkpoint import install_restructure_hook
from ..complexity import count_complexity
from ..convert import LayerPlan
from ..report import compression_report
from ..reuse import find_weight_reuse
from ..validation import check_bool, check_choice, check_patterns
from .optimizer_state import align_saved_state, parameter_names
from .schedule import Order, StageSchedule, Unit
from .surgery import refuse_incompatible_callbacks
from .tracking import CompressionTracker

__all__ = ["CheapConvCallback"]

Patterns = str | Sequence[str] | None


def short_list(names: Sequence[str], most: int = 6) -> str:
    """``names`` joined, the first ``most`` of them and a count of the rest."""
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


class CheapConvCallback(Callback):
    """Base of :class:`StructuredConvCallback` and :class:`GhostConvCallback`: subclasses decide *how*
    a layer becomes cheap; this class selects layers, records what the network's ``forward`` receives,
    keeps the stage schedule, logs ``compression/*`` at each validation epoch end, prints the report at
    fit end, and lines up optimizer state by parameter name on resume."""

    method: str = ""
    unit: Unit = "epoch"
    cheap_types: tuple[type[nn.Module], ...] = ()  # modules that count as already converted

    def __init__(
        self,
        include: Patterns,
        exclude: Patterns,
        skip_first: bool,
        skip_last: bool,
        order: Order,
        verbose: int,
        order_argument: str = "order",
    ) -> None:
        who = type(self).__name__
        check_patterns("include", include, owner=who, error=MisconfigurationException)
        check_patterns("exclude", exclude, owner=who, error=MisconfigurationException)
        check_bool("skip_first", skip_first, owner=who, error=MisconfigurationException)
        check_bool("skip_last", skip_last, owner=who, error=MisconfigurationException)
        check_choice(order_argument, order, ("deep_first", "shallow_first"), owner=who, error=MisconfigurationException)
        check_choice("verbose", verbose, (0, 1, 2), owner=who, error=MisconfigurationException)
        self.include, self.exclude = include, exclude
        self.skip_first, self.skip_last = skip_first, skip_last
        self.order: Order = order
        self.verbose = verbose
        self.plan: list[LayerPlan] = []
        self.done: list[str] = []  # targets that were already cheap when fit started (a second fit)
        self.schedule: StageSchedule | None = None
        self.tracker: CompressionTracker | None = None
        self._example: ModelCall | None = None
        self._calls: list[ModelCall] = []
        self._recorder: list[RemovableHandle] = []
        self._open_calls: list[list] = []  # [call, called the module again inside] per open forward
        self._warned_no_input = False
        self._loaded_checkpoint: dict[str, Any] | None = None
        self._saved_optimizer_params: list | None = None
        self._forms: dict[str, type[nn.Module]] = {}
        self._trainer: Trainer | None = None

    # -- subclass interface -------------------------------------------------------------------
    def _select(self, pl_module: LightningModule) -> list[LayerPlan]:
        raise NotImplementedError

    def _make_cheap_twin(self, name: str, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _cheap_layers(self, pl_module: LightningModule) -> set[str]:
        """Target layers that count as cheap now (default: those in cheap form)."""
        return self._cheap_now(pl_module)

    def _calibration_wanted(self) -> int:
        """How many training forward calls to keep for calibration now (default: none)."""
        return 0

    def _integer_buffers(self) -> bool:
        """Whether the cheap modules carry integer buffers (default: no)."""
        return False

    # -- shared -----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, include=self.include, exclude=self.exclude)

    @property
    def targets(self) -> list[str]:
        """Layers this callback makes cheap: those still to convert (in model order), then :attr:`done`."""
        return self.todo + self.done

    @property
    def todo(self) -> list[str]:
        """Layers planned for conversion in this fit, in model order."""
        return [p.name for p in self.plan if p.action == "convert"]

    def _setup_plan(self, trainer: Trainer, pl_module: LightningModule) -> None:
        who = type(self).__name__
        refuse_incompatible_callbacks(trainer, who, self._integer_buffers())
        self._trainer = trainer
        self._example, self._calls, self._warned_no_input = None, [], False  # nothing from an earlier fit
        self.plan = self._select(pl_module)
        self.done = [
            p.name
            for p in self.plan
            if p.action == "skip" and isinstance(pl_module.get_submodule(p.name), self.cheap_types)
        ]
        if not self.targets:
            reasons = "; ".join(f"{p.name}: {p.reason}" for p in self.plan) or "the model has no Conv2d layers"
            raise MisconfigurationException(
                f"{who}: no layer of {type(pl_module).__name__} matches the selection "
                f"(include={self.include!r}, exclude={self.exclude!r}): {reasons}"
            )
        install_restructure_hook(pl_module)
        self.tracker = CompressionTracker(pl_module, self.targets, self._make_cheap_twin)
        if self.verbose:
            skipped = [p for p in self.plan if p.action == "skip" and p.name not in self.done]
            done = f", {len(self.done)} already converted" if self.done else ""
            rank_zero_info(
                f"{who}: {len(self.todo)} layer(s) selected{done}, {len(skipped)} skipped"
                + "".join(f"\n  skip {p.name}: {p.reason}" for p in skipped if self.verbose > 1)
            )

    # -- schedule -------------------------------------------------------------------------------
    def _build_schedule(self, start: int, end: int, stages: int) -> None:
        self.schedule = StageSchedule.build(self.todo, start, end, stages, self.order)
        if self.verbose > 1:
            for at, group in zip(self.schedule.epochs, self.schedule.groups, strict=True):
                rank_zero_info(f"  {self.unit} {at}: {', '.join(group)}")

    def _now(self, trainer: Trainer) -> int:
        """The schedule's clock: the current epoch, or the optimizer steps taken so far."""
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    def _when(self, trainer: Trainer) -> str:
        return f"{self.unit} {self._now(trainer)}"

    def _last_reached(self, trainer: Trainer) -> int | None:
        """The last epoch (or optimizer step) this fit reaches by ``max_epochs``/``max_steps``; None if unbounded."""
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        bounds = []
        if self.unit == "epoch":
            bounds += [max_epochs - 1] if max_epochs is not None else []
            bounds += [math.ceil(max_steps / per_epoch) - 1] if max_steps is not None and per_epoch else []
        else:
            bounds += [max_steps - 1] if max_steps is not None else []
            bounds += [max_epochs * per_epoch - 1] if max_epochs is not None and per_epoch else []
        return min(bounds) if bounds else None

    def _warn_unreachable(self, trainer: Trainer, consequence: str) -> None:
        """Warn when stages lie beyond what this fit reaches (by max_epochs, max_steps and the epoch length)."""
        last = self._last_reached(trainer)
        if self.schedule is None or last is None or self.schedule.last_epoch <= last:
            return
        stages = zip(self.schedule.epochs, self.schedule.groups, strict=True)
        late = [name for at, group in stages if at > last for name in group]
        rank_zero_warn(
            f"{type(self).__name__}: stages at {self.unit}s {list(self.schedule.epochs)} are not all reached: the last "
            f"{self.unit} this fit starts is {last} (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, "
            f"{trainer.num_training_batches} batches per epoch); {len(late)} layer(s) {consequence}: "
            f"{short_list(late)}."
        )

    # -- validate/test/predict with a checkpoint ---------------------------------------------------
    def _remember_forms(self, pl_module: LightningModule) -> None:
        """Before validate/test/predict: install the restructure hook (a checkpoint of any stage then loads into a
        fresh model), and note the form of each layer this callback converted, to tell if loading changes it."""
        install_restructure_hook(pl_module)
        self._forms = {n: type(pl_module.get_submodule(n)) for n in self.targets}

    def _restore_forms(self, pl_module: LightningModule, changed: list[str]) -> list[str]:
        """Put ``changed`` layers back in their form where that is exact; return those that stay changed."""
        return changed

    def _check_forms(self, pl_module: LightningModule) -> None:
        forms, self._forms = self._forms, {}
        changed = [n for n, kind in forms.items() if type(pl_module.get_submodule(n)) is not kind]
        if changed:
            changed = self._restore_forms(pl_module, changed)
        if changed:
            moves = [f"{n} ({forms[n].__name__} -> {type(pl_module.get_submodule(n)).__name__})" for n in changed]
            rank_zero_warn(
                f"{type(self).__name__}: loading the checkpoint changed the structure of {len(changed)} layer(s) "
                f"to the checkpoint's: {', '.join(moves)}."
            )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_forms(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_forms(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_forms(pl_module)

    def _skip_reused(self, pl_module: LightningModule, names: Sequence[str]) -> list[str]:
        """``names`` less the layers whose weights the recorded forward uses outside them (a model no tracer
        could read at setup): those are skipped from now on, with the reason in :attr:`plan`."""
        if self._example is None or not names:
            return list(names)
        try:
            reused = find_weight_reuse(pl_module, names, self._example.to(pl_module.device))
        except ValueError:  # the forward fails on the recorded input: the checks made at setup stand
            return list(names)
        for entry in self.plan:
            if entry.name in reused:
                entry.action, entry.reason = "skip", reused[entry.name]
        if reused:
            rank_zero_warn(
                f"{type(self).__name__}: {len(reused)} layer(s) stay as they are, their weights are used outside them: "
                + "; ".join(f"{n}: {r}" for n, r in reused.items())
            )
        return [n for n in names if n not in reused]

    # -- what forward receives ------------------------------------------------------------------
    def _enter_forward(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._open_calls:
            self._open_calls[-1][1] = True  # the enclosing call was not the network's own forward
        self._open_calls.append([ModelCall(args, dict(kwargs)).detached(), False])

    def _leave_forward(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Keep calls that did not call the module again inside: under DDP, Lightning routes ``training_step``
        itself through ``module(batch, batch_idx)``, and only the calls inside it are the network's input."""
        if not self._open_calls:
            return
        call, nested = self._open_calls.pop()
        if nested:
            return
        if self._example is None:
            self._example = call.first(1)
        if len(self._calls) < self._calibration_wanted():
            self._calls.append(call)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        wanted = self._example is None or len(self._calls) < self._calibration_wanted()
        if not self._recorder and wanted:
            self._open_calls = []
            self._recorder = [
                pl_module.register_forward_pre_hook(self._enter_forward, with_kwargs=True),
                pl_module.register_forward_hook(self._leave_forward, with_kwargs=True, always_call=True),
            ]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_recording()
        if self._example is None:
            self._example = self._example_input_array(pl_module)
        if self._example is None and not self._warned_no_input:
            self._warned_no_input = True
            rank_zero_warn(
                f"{type(self).__name__}: {type(pl_module).__name__}.forward was not called during training_step, "
                "so the network's input is unknown: compression/* metrics and the report need "
                "`example_input_array` set on the module"
                + (", and calibration needs forward to be called." if self._calibration_wanted() else ".")
            )

    def _stop_recording(self) -> None:
        for handle in self._recorder:
            handle.remove()
        self._recorder = []

    @staticmethod
    def _example_input_array(pl_module: LightningModule) -> ModelCall | None:
        """Lightning's convention: a tensor is one argument, a tuple positional arguments, a dict keywords."""
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, Tensor):
            return ModelCall((example,))
        if isinstance(example, tuple):
            return ModelCall(example)
        if isinstance(example, dict):
            return ModelCall((), example)
        return None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop_recording()

    def _measure(self, pl_module: LightningModule) -> bool:
        assert self.tracker is not None
        if self.tracker.measured:
            return True
        if self._example is None:
            return False
        try:
            self.tracker.measure(pl_module, self._example.to(pl_module.device), self._cheap_now(pl_module))
        except Exception as err:  # noqa: BLE001 - any failure of the user's forward: warn, never stop the fit
            rank_zero_warn(
                f"{type(self).__name__}: cannot count MACs: {type(pl_module).__name__} failed on the recorded "
                f"input ({type(err).__name__}: {err}); set `example_input_array` on the module."
            )
            self._example = None
            return False
        return True

    @staticmethod
    def _dense(pl_module: LightningModule, names: Sequence[str]) -> list[str]:
        """Those of ``names`` still plain ``nn.Conv2d``/``nn.Linear`` layers in the live model."""
        return [n for n in names if isinstance(pl_module.get_submodule(n), (nn.Conv2d, nn.Linear))]

    def _cheap_now(self, pl_module: LightningModule) -> set[str]:
        """Target layers whose module is already in cheap form in the live model."""
        return set(self.targets).difference(self._dense(pl_module, self.targets))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # No tracker outside fit (``trainer.validate`` before any fit): nothing to log.
        if trainer.sanity_checking or self.tracker is None or not self._measure(pl_module):
            return
        assert self.tracker is not None
        pl_module.log_dict(self.tracker.metrics(self._cheap_layers(pl_module)), on_epoch=True, sync_dist=False)

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

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": 1, "targets": list(self.targets)}
        if self._trainer is not None and self._trainer.lightning_module is not None:
            state["optimizer_params"] = parameter_names(self._trainer.optimizers, self._trainer.lightning_module)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("targets")
        if saved is not None and self.plan and list(saved) != self.targets:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was saved with target layers {saved}, but this run selects "
                f"{self.targets}; the schedule follows this run's selection."
            )
        self._saved_optimizer_params = state_dict.get("optimizer_params")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._loaded_checkpoint = checkpoint  # its optimizer state is restored after on_fit_start

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint, names = self._loaded_checkpoint, self._saved_optimizer_params
        self._loaded_checkpoint, self._saved_optimizer_params = None, None
        if checkpoint is None or not names:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        rewritten = align_saved_state(checkpoint, names, trainer.optimizers, schedulers, pl_module)
        if rewritten and self.verbose > 1:
            rank_zero_info(
                f"{type(self).__name__}: optimizer state of optimizer(s) {rewritten} restored by parameter name "
                "(the converted model's optimizer has another group layout than the saved one)"
            )
