"""What both callbacks share: layer selection, compression logging, the fit-end report, and state."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._lightning import Callback, LightningModule, MisconfigurationException, Trainer, rank_zero_info, rank_zero_warn
from ..calls import ModelCall
from ..checkpoint import install_restructure_hook
from ..complexity import count_complexity
from ..convert import DENSE_TYPES, PREDICTION_KEPT, LayerPlan
from ..heads import find_prediction_layers
from ..report import compression_report
from ..reuse import find_weight_reuse
from ..validation import check_bool, check_choice, check_finite_number, check_int, check_patterns
from .distill import Distiller, check_distill_arguments
from .optimizer_state import align_saved_state, parameter_names
from .schedule import Order, StageSchedule, Unit
from .surgery import broadcast_module, refuse_incompatible_callbacks
from .tracking import CompressionTracker

__all__ = ["CheapConvCallback"]

Patterns = str | Sequence[str] | None


def _choices(plan: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A :class:`~lightning_cheapconv.budget.BudgetPlan`'s choice for each of ``names`` as primitive values (for the
    callback state and the broadcast): ``{"method": "dense"}``, ``{"method": "ghost", "ratio": s}`` or
    ``{"method": "structured", "channels": c, "kernel_size": [n_h, n_w]}``; a layer the plan left out stays dense."""
    chosen = {layer.name: layer.choice for layer in plan.layers}
    result: dict[str, dict[str, Any]] = {}
    for name in names:
        choice = chosen.get(name)
        if choice is None or choice.method == "dense":
            result[name] = {"method": "dense"}
        elif choice.method == "ghost":
            result[name] = {"method": "ghost", "ratio": int(choice.ratio)}
        else:
            kernel = [int(n) for n in choice.kernel_size]
            result[name] = {"method": "structured", "channels": int(choice.channels), "kernel_size": kernel}
    return result


_PLAN_DEFAULTS: dict[str, Any] = {"channel_multiple": 1, "latency_runtime": "pytorch"}
"""The planning options of the budget callbacks (passed to :func:`lightning_cheapconv.plan_budget`), by default."""


def _budget_arguments(budgets: dict[str, float], options: dict[str, Any]) -> str:
    """The budget arguments as a callback is given them (planning options where not the default), for messages."""
    asked = [f"target_{k}={v:g}" for k, v in budgets.items()]
    return ", ".join(asked + [f"{k}={v!r}" for k, v in options.items() if v != _PLAN_DEFAULTS.get(k)])


def _loss_factor(trainer: Trainer) -> float:
    """What Lightning applied to the user's loss before ``backward``: the fp16 GradScaler's scale (1 without one) over
    ``accumulate_grad_batches`` (automatic optimization only; manual optimization does not divide)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    module = trainer.lightning_module
    automatic = module is None or module.automatic_optimization
    return scale / (trainer.accumulate_grad_batches if automatic else 1)


def _copy(value: Any) -> Any:
    """A detached copy of one state-dict entry: tensors copied to host memory (no second copy of the model on an
    accelerator during the first batch), structure records and other extra state deep-copied."""
    return value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else copy.deepcopy(value)


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
        self._evaluating: str | None = None  # the validate/test/predict stage set up since the last fit
        self._trainer: Trainer | None = None
        self.distiller: Distiller | None = None
        self.budgets: dict[str, float] = {}
        self.budget_plan: dict[str, dict[str, Any]] | None = None  # layer -> chosen candidate, in the state
        self._window: tuple[int, int, int] | None = None
        self._budget_checked = False  # an unreachable MACs/params budget was looked for in this fit
        self._state_before: dict[str, Any] | None = None  # the module as fit received it, while a refusal may come
        self._batches_seen = 0  # training batches of this fit

    def _init_budget(
        self, target_macs: Any, target_params: Any, target_latency_ms: Any, channel_multiple: Any, latency_runtime: Any
    ) -> None:
        """Check the budget arguments: ``target_macs``/``target_params`` fractions in ``(0, 1]``, ``target_latency_ms``
        > 0 (each optional), ``channel_multiple`` an int >= 1, ``latency_runtime`` ``"pytorch"`` or
        ``"onnxruntime"`` (only with ``target_latency_ms``; ONNX Runtime installed)."""
        from ..budget import LATENCY_RUNTIMES  # noqa: PLC0415 - budget imports the deploy timing code
        from ..deploy.onnx_runtime import require_onnxruntime  # noqa: PLC0415

        who, error = type(self).__name__, MisconfigurationException
        self.target_macs, self.target_params, self.target_latency_ms = target_macs, target_params, target_latency_ms
        self.channel_multiple = check_int("channel_multiple", channel_multiple, 1, owner=who, error=error)
        self.latency_runtime = check_choice(
            "latency_runtime", latency_runtime, LATENCY_RUNTIMES, owner=who, error=error
        )
        for key, value in (("macs", target_macs), ("params", target_params)):
            if value is not None:
                maximum = 1.0
                self.budgets[key] = check_finite_number(
                    f"target_{key}", value, 0.0, maximum, exclusive_minimum=True, owner=who, error=error
                )
        if target_latency_ms is not None:
            self.budgets["latency_ms"] = check_finite_number(
                "target_latency_ms", target_latency_ms, 0.0, exclusive_minimum=True, owner=who, error=error
            )
        if self.channel_multiple != 1 and not self.budgets:
            rank_zero_warn(
                f"{who}: channel_multiple={self.channel_multiple} has no effect without a budget (target_macs, "
                "target_params or target_latency_ms): it restricts the channel counts a budget plan may choose"
            )
        if self.latency_runtime != "pytorch":
            if "latency_ms" not in self.budgets:
                raise MisconfigurationException(
                    f"{who}: latency_runtime={self.latency_runtime!r} is where target_latency_ms is measured, and no "
                    "target_latency_ms was given; pass target_latency_ms (> 0) or leave latency_runtime='pytorch'"
                )
            require_onnxruntime(f"{who}(latency_runtime='onnxruntime')")

    def _plan_options(self) -> dict[str, Any]:
        """The planning options given to :func:`lightning_cheapconv.plan_budget` (see :data:`_PLAN_DEFAULTS`)."""
        return {"channel_multiple": self.channel_multiple, "latency_runtime": self.latency_runtime}

    def _budget_arguments(self) -> str:
        return _budget_arguments(self.budgets, self._plan_options())

    def _init_distill(self, distill: Any, weight: Any, logits: Any, temperature: Any) -> None:
        """Check the distillation arguments and keep them (see :mod:`lightning_cheapconv.callbacks.distill`)."""
        who = type(self).__name__
        self.distill, self.distill_weight, self.distill_logits, self.distill_temperature = check_distill_arguments(
            who, distill, weight, logits, temperature, MisconfigurationException
        )
        self.distiller = None
        if distill:
            self.distiller = Distiller(self.distill_weight, self.distill_logits, self.distill_temperature)

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

    def _budget_methods(self) -> tuple[str, ...]:
        """The methods a budget plan chooses from (default: this callback's own)."""
        return (self.method,)

    def _set_choice(self, name: str, choice: dict[str, Any]) -> None:
        """Take a budget plan's choice for ``name`` (a converted layer's hyper-parameters)."""
        raise NotImplementedError

    # -- budgets ----------------------------------------------------------------------------------
    def _plan_budget(self, trainer: Trainer, pl_module: LightningModule, example: ModelCall | None, when: str) -> None:
        """Plan per-layer choices for :attr:`budgets` on ``example`` (rank 0; the plan or the refusal broadcast to
        every rank) and apply them to the plan, the schedule and the tracker. The model is not changed.

        Raises:
            MisconfigurationException: the budget cannot be met (the message gives the smallest reachable value).
        """
        from ..budget import plan_budget  # budget imports the deploy timing code; only runs with a budget

        who = type(self).__name__
        choices: dict[str, dict[str, Any]] | None = None
        message, table = None, None
        if trainer.global_rank == 0:
            if example is None:
                message = (
                    f"{who}: cannot plan {self._budget_arguments()}: {type(pl_module).__name__}.forward was not called "
                    "during training_step and no example_input_array is set"
                )
            else:
                try:
                    plan = plan_budget(
                        pl_module,
                        example.to(pl_module.device),
                        methods=self._budget_methods(),
                        include=list(self.todo),
                        skip_first=False,
                        skip_last=False,
                        **self._plan_options(),
                        **{k: v for k, v in self.budgets.items()},
                    )
                    choices = _choices(plan, self.todo)
                    table = str(plan)
                except ValueError as err:
                    message = f"{who}: {when}: {err}"
        choices, message = trainer.strategy.broadcast((choices, message), src=0)
        if message is not None:
            raise self._refusal(pl_module, message)
        assert choices is not None
        self._apply_choices(pl_module, choices)
        if self.verbose and table is not None:
            rank_zero_info(f"{who}: {when}: budget plan ({self._budget_arguments()}):\n{table}")

    def _check_budget_at_setup(self, pl_module: LightningModule) -> None:
        """Refuse an unreachable MACs/params budget at setup when ``example_input_array`` is set (the smallest reachable
        MACs and parameters do not depend on the data); otherwise :meth:`_check_budget_early` refuses it after the
        first training batch, on its recorded input, before anything changes."""
        example = self._example_input_array(pl_module)
        if example is not None:
            self._check_budget(pl_module, example, "at setup")

    def _check_budget_early(self, pl_module: LightningModule, when: str) -> None:
        """Once per fit, at the end of the first training batch while the plan is still to come (a stage after epoch
        0): refuse an unreachable MACs/params budget on the recorded input, instead of at the first stage."""
        if self._budget_checked or not self.budgets or self.budget_plan is not None or self._example is None:
            return
        self._budget_checked = True
        self._check_budget(pl_module, self._example.to(pl_module.device), when)

    def _may_refuse_after_first_batch(self) -> bool:
        """Whether the end of this fit's first batch may refuse the budget: the MACs/params check of
        :meth:`_check_budget_early` is still to run (no ``example_input_array`` let setup run it)."""
        return not self._budget_checked and any(key != "latency_ms" for key in self.budgets)

    def _check_budget(self, pl_module: LightningModule, example: ModelCall, when: str) -> None:
        from ..budget import check_budget_reachable

        budgets = {k: v for k, v in self.budgets.items() if k != "latency_ms"}
        if not budgets or not self.todo:
            return
        try:
            check_budget_reachable(
                pl_module,
                example,
                methods=self._budget_methods(),
                include=list(self.todo),
                skip_first=False,
                skip_last=False,
                channel_multiple=self.channel_multiple,
                **budgets,
            )
        except ValueError as err:
            raise self._refusal(pl_module, f"{type(self).__name__}: {when}: {err}") from err
        self._budget_checked = True

    def _refusal(self, pl_module: LightningModule, message: str) -> MisconfigurationException:
        """The error refusing a budget, saying what became of the model: nothing changed (at setup); restored to what
        fit received (refused after this fit's first batch, whose recorded input the check needed: that batch's
        training step and BatchNorm statistics are undone); or, later in the fit, trained as usual with no layer
        converted."""
        if self._state_before is not None:
            pl_module.load_state_dict(self._state_before)
            self._state_before = None
            return MisconfigurationException(
                f"{message}; the model is unchanged (restored to what fit received: the first training batch, whose "
                "input the plan needed, was undone)"
            )
        if self._batches_seen == 0:
            return MisconfigurationException(f"{message}; the model is unchanged")
        return MisconfigurationException(f"{message}; no layer was converted (the training so far is kept)")

    def _apply_choices(self, pl_module: LightningModule, choices: dict[str, dict[str, Any]]) -> None:
        """Layers the plan keeps dense leave :attr:`todo`; the others take their hyper-parameters; the schedule and
        the tracker follow."""
        self.budget_plan = choices
        for entry in self.plan:
            if entry.action != "convert":
                continue
            choice = choices.get(entry.name, {"method": "dense"})
            if choice["method"] == "dense":
                entry.action, entry.reason = "skip", f"kept dense by the budget plan ({self._budget_arguments()})"
            else:
                self._set_choice(entry.name, choice)
        self.tracker = CompressionTracker(pl_module, self.targets, self._make_cheap_twin)
        if self._window is not None and self.todo:
            start, end, stages = self._window
            self.schedule = StageSchedule.build(self.todo, start, end, stages, self.order)
        elif not self.todo:
            self.schedule = None

    def _distilled_layers(self, pl_module: LightningModule) -> list[str]:
        """The layers whose outputs are distilled now: those in their converted form (default: cheap now)."""
        return sorted(self._cheap_now(pl_module))

    # -- distillation ---------------------------------------------------------------------------
    def _snapshot_teacher(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before the first change to the network: keep it as the teacher (rank 0's, on every rank)."""
        if self.distiller is None or self.distiller.teacher is not None:
            return
        self.distiller.snapshot(pl_module)
        assert self.distiller.teacher is not None
        broadcast_module(self.distiller.teacher)  # before DDP wraps the model, ranks may hold different weights

    def _start_distilling(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hook the converted layers (and the network, for logits) for this training batch."""
        if self.distiller is None:
            return
        self.distiller.attach(pl_module, self._distilled_layers(pl_module), lambda: _loss_factor(trainer))

    def _stop_distilling(self, pl_module: LightningModule) -> None:
        if self.distiller is None:
            return
        self.distiller.detach()
        total = self.distiller.take_losses()
        if total is None:
            return
        pl_module.log("train/distill", total, on_step=True, on_epoch=True, prog_bar=False, sync_dist=True)
        if self.distiller.diverged(float(total)):
            rank_zero_warn(
                f"{type(self).__name__}: distillation is diverging: the distillation loss of a step reached "
                f"{float(total):.3g} (its first step: {self.distiller.first_loss:.3g}). Known to happen when the "
                "feature term meets small converted layers (structured layers with few hidden channels, say) at the "
                "task's learning rate: lower distill_weight or the learning rate, clip gradients "
                "(gradient_clip_val), or train without distill."
            )

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
        self._trainer, self._evaluating = trainer, None
        self._example, self._calls, self._warned_no_input = None, [], False  # nothing from an earlier fit
        self._budget_checked, self._state_before, self._batches_seen = False, None, 0
        self.plan = self._select(pl_module)
        self.done = [
            p.name
            for p in self.plan
            if p.action == "skip" and isinstance(pl_module.get_submodule(p.name), self.cheap_types)
        ]
        if not self.targets:
            reasons = "; ".join(f"{p.name}: {p.reason}" for p in self.plan) or "the model has no conv layers"
            raise MisconfigurationException(
                f"{who}: no layer of {type(pl_module).__name__} matches the selection "
                f"(include={self.include!r}, exclude={self.exclude!r}): {reasons}"
            )
        install_restructure_hook(pl_module)
        self.tracker = CompressionTracker(pl_module, self.targets, self._make_cheap_twin)
        if self.verbose:
            skipped = [p for p in self.plan if p.action == "skip" and p.name not in self.done]
            done = f", {len(self.done)} already converted" if self.done else ""
            named = short_list([f"{p.name}: {p.reason}" for p in skipped], most=4)
            rank_zero_info(
                f"{who}: {len(self.todo)} layer(s) selected{done}, {len(skipped)} skipped"
                + (f" ({named})" if skipped and self.verbose == 1 else "")
                + "".join(f"\n  skip {p.name}: {p.reason}" for p in skipped if self.verbose > 1)
            )

    # -- schedule -------------------------------------------------------------------------------
    def _build_schedule(self, start: int, end: int, stages: int) -> None:
        self._window = (start, end, stages)
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
    def _remember_forms(self, pl_module: LightningModule, stage: str) -> None:
        """Before validate/test/predict (``stage``): install the restructure hook (a checkpoint of any stage then loads
        into a fresh model), and note the form of each layer in this callback's cheap forms, to tell if loading takes
        it out of that form (a dense layer taking the checkpoint's cheap form is what loading a checkpoint into a fresh
        model does; a callback that has not run a fit knows no targets, so every such module counts)."""
        self._evaluating = str(getattr(stage, "value", stage))  # "validate": Lightning passes a str enum
        install_restructure_hook(pl_module)
        self._forms = {n: type(m) for n, m in pl_module.named_modules() if isinstance(m, self.cheap_types)}

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
        """``names`` less the layers the recorded forward shows must stay (a model no tracer could read at setup):
        those whose weights are used outside them, and (with ``skip_last``) the prediction layers, which setup finds
        only with ``example_input_array`` or a ``torch.fx`` trace. Those are skipped from now on, with the reason in
        :attr:`plan`."""
        if self._example is None or not names:
            return list(names)
        example = self._example.to(pl_module.device)
        try:
            reused = find_weight_reuse(pl_module, names, example)
            heads = self._late_prediction_layers(pl_module, names, example)
        except ValueError:  # the forward fails on the recorded input: the checks made at setup stand
            return list(names)
        for entry in self.plan:
            if entry.name in reused:
                entry.action, entry.reason = "skip", reused[entry.name]
            elif entry.name in heads:
                entry.action, entry.reason = "skip", PREDICTION_KEPT
        if reused:
            rank_zero_warn(
                f"{type(self).__name__}: {len(reused)} layer(s) stay as they are, their weights are used outside them: "
                + "; ".join(f"{n}: {r}" for n, r in reused.items())
            )
        if heads and self.verbose:
            rank_zero_info(f"{type(self).__name__}: prediction layers found on the recorded input, kept: {heads}")
        return [n for n in names if n not in reused and n not in heads]

    def _late_prediction_layers(
        self, pl_module: LightningModule, names: Sequence[str], example: ModelCall
    ) -> list[str]:
        """Those of ``names`` that are prediction layers on the recorded input (with ``skip_last``, which the
        prediction rule follows): setup finds them only with ``example_input_array`` or a ``torch.fx`` trace."""
        if not self.skip_last:
            return []
        found = set(find_prediction_layers(pl_module, example) or ())
        return [name for name in names if name in found]

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
        # A budget refused at the end of this fit's first batch, on its recorded input, leaves the model as fit
        # received it: keep the module's state until then where such a refusal may come.
        first = self._batches_seen == 0 and self.budget_plan is None and self._may_refuse_after_first_batch()
        self._state_before = {k: _copy(v) for k, v in pl_module.state_dict().items()} if first else None
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
        self._stop_distilling(pl_module)
        self._batches_seen += 1
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
        if self.distiller is not None:
            self.distiller.detach()

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
        """Those of ``names`` still plain layers in the live model (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
        ``nn.Linear``: :data:`~lightning_cheapconv.convert.DENSE_TYPES`)."""
        return [n for n in names if isinstance(pl_module.get_submodule(n), DENSE_TYPES)]

    def _cheap_now(self, pl_module: LightningModule) -> set[str]:
        """Target layers whose module is already in cheap form in the live model."""
        return set(self.targets).difference(self._dense(pl_module, self.targets))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # No tracker outside fit (``trainer.validate`` before any fit): nothing to log.
        if trainer.sanity_checking or self.tracker is None:
            return
        # Logged synced (values equal on every rank, as the model's structure is), so every rank must log them: a
        # rank whose recorded input failed to run stops all from logging instead of leaving the others in the sync.
        if not trainer.strategy.reduce_boolean_decision(self._measure(pl_module), all=True):
            return
        assert self.tracker is not None
        pl_module.log_dict(self.tracker.metrics(self._cheap_layers(pl_module)), on_epoch=True, sync_dist=True)

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
        if self.distiller is not None:
            state["teacher"] = self.distiller.state()
        if self.budgets:
            state["budget_plan"] = self.budget_plan
            state["budgets"] = dict(self.budgets)
            state["budget_methods"] = list(self._budget_methods())
            state["plan_options"] = self._plan_options()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        choices = state_dict.get("budget_plan")
        if self.budgets and choices is not None:
            methods = list(self._budget_methods())
            saved_budgets = state_dict.get("budgets", self.budgets)
            saved_methods = state_dict.get("budget_methods", methods)
            saved_options = {**_PLAN_DEFAULTS, **state_dict.get("plan_options", {})}
            changed = (saved_budgets, saved_methods, saved_options) != (self.budgets, methods, self._plan_options())
            made_for = f"the checkpoint's budget plan, made for {_budget_arguments(saved_budgets, saved_options)}, "
            asks = f"{self._budget_arguments()}, methods={methods}"
            if self._evaluating is not None:
                self.budget_plan = choices  # the plan evaluated (the next fit's setup starts it afresh)
                if changed:
                    rank_zero_warn(
                        f"{type(self).__name__}: {self._evaluating} runs {made_for}methods={saved_methods}, as the "
                        f"checkpoint's layers are; this callback's {asks} apply to its next trainer.fit."
                    )
            elif self._trainer is not None and self.plan:
                self._apply_choices(self._trainer.lightning_module, choices)  # the plan of the run that saved it
                if changed:
                    rank_zero_warn(
                        f"{type(self).__name__}: {made_for}methods={saved_methods}, continues; this run asks {asks}. "
                        "Layers converted by it stay as they are; to plan anew, start from a checkpoint saved before "
                        "the first stage."
                    )
        saved = state_dict.get("targets")
        if saved is not None and self.plan and list(saved) != self.targets:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was saved with target layers {saved}, but this run selects "
                f"{self.targets}; the schedule follows this run's selection."
            )
        self._saved_optimizer_params = state_dict.get("optimizer_params")
        if self.distiller is not None:
            self.distiller.load_state(state_dict.get("teacher"))

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
