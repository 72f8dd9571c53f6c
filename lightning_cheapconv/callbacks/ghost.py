"""GhostConvCallback: progressive conversion into Ghost modules, DDP-safe, resumable."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from .._lightning import LightningModule, MisconfigurationException, Trainer, rank_zero_info, rank_zero_warn
from ..convert import (
    GHOST_TYPES,
    LayerPlan,
    capture_inputs,
    fits_on_activations,
    ghost_from_conv,
    recalibrate_batchnorm,
    replace_modules,
    select_layers,
)
from ..validation import check_choice, check_int
from .base import CheapConvCallback, Patterns, short_list
from .schedule import Order, schedule_window
from .surgery import broadcast_module, check_strategy, follow_in_averaged_copies, rewrap, swap_in_optimizers

__all__ = ["GhostConvCallback"]


class GhostConvCallback(CheapConvCallback):
    r"""Convert a network's convolutions into Ghost modules during ``fit``, all at once or in stages.

    From Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020. Each selected
    ``nn.Conv2d`` becomes a conv-only :class:`GhostConv2d` (the host network's BatchNorm and
    activation stay), with ``ratio`` (s) and ``dw_size`` (d); ``nn.Conv1d``/``nn.Conv3d`` become
    ``GhostConv1d``/``GhostConv3d`` and ``nn.ConvTranspose{d}d`` ``GhostConvTranspose{d}d``
    (:func:`~lightning_cheapconv.convert.select_layers` lists what is skipped and why). With ``init="inherit"``
    the trained filters are mapped onto the Ghost module (``m = ceil(out/s)`` kept exactly, the others fitted
    as depthwise ghosts), by kernel-space least squares or, with ``calibration_batches > 0``, on
    real activations of that many training batches (rank 0 fits; the result is broadcast; transposed convs are
    fitted in kernel space).

    Schedule: the selected layers are split into ``stages`` groups in ``order`` and converted at
    epochs spread evenly from ``start_epoch`` to ``end_epoch`` (default: one stage per epoch).
    Conversion at epoch 0 happens in ``setup``, before DDP wrapping and ``configure_optimizers``.
    Later stages convert at the start of their epoch (or of the batch of their optimizer step; with
    calibration, once ``calibration_batches`` training forwards were recorded): new modules are built
    on the model's device and dtype, made identical on every
    rank, swapped in, the live optimizer is edited in place (old parameters and their state out,
    new ones in the same group at the same position, in the order a fresh ``configure_optimizers``
    would list them, so LR schedulers continue), the copies kept by weight-averaging callbacks (SWA,
    EMA) get the same change, and DDP is wrapped again. New parameters take ``requires_grad`` from
    the weights they replace. A resumed run restores optimizer state by parameter name, whatever
    layout its ``configure_optimizers`` gives the converted model. Layers already Ghost modules (a
    second ``fit``) count as done. Single-device and ``strategy="ddp"`` runs are supported;
    FSDP/DeepSpeed (which shard the weights) and spawn launchers (``ddp_spawn``, which lose
    architecture changes) are refused at setup. To train a Ghost network under FSDP, convert it
    before ``fit`` with :func:`lightning_cheapconv.convert_to_ghost`.

    Logs ``compression/params``, ``compression/macs`` (per example) and their ratios (original /
    compressed) at each validation epoch end, a line per stage with the converted layers and
    their fit errors, and a rich report at fit end (rank 0). Resuming with
    ``trainer.fit(ckpt_path=...)`` rebuilds the checkpoint's structure before its weights load
    (:func:`lightning_cheapconv.install_restructure_hook`) and the remaining stages follow.

    Args:
        include, exclude: glob patterns on qualified layer names.
        ratio: s, an int >= 2 (``m = ceil(out/s)`` intrinsic maps).
        dw_size: d, an odd int >= 1 (the cheap depthwise kernel).
        init: ``"inherit"`` (map the trained weights) or ``"random"``.
        calibration_batches: training batches whose forward inputs (exactly what ``forward`` received in
            ``training_step``) fit the inheritance on real activations and, after the conversion, re-estimate
            the BatchNorm statistics (0: kernel-space fit, statistics left to training).
        start_epoch, end_epoch: first and last conversion epochs (default 0 and ``start_epoch + stages - 1``).
        stages: number of groups converted at different epochs.
        order: ``"deep_first"`` or ``"shallow_first"``.
        skip_first, skip_last: keep the stem and the classifier as they are (the paper's setting).
        verbose: 0 silent, 1 a line per stage and the report, 2 per-layer details.
        start_step, end_step: the schedule in optimizer steps (``trainer.global_step``) instead of epochs;
            give epochs or steps, not both. A stage the fit does not reach warns at the start of training.
        target_macs, target_params: a budget, the fraction of the original model's MACs (per forward of the recorded
            input) or parameters to keep, in ``(0, 1]``; ``target_latency_ms``: the whole model's latency in ms on a
            recorded training batch (its device and batch size). With any of them, per-layer ratios ``s`` are planned by
            :func:`lightning_cheapconv.plan_budget` (``methods=("ghost",)``, among the selected layers; layers the plan
            keeps dense are skipped) when the first stage starts, on the first recorded training batch (so the first
            stage runs on a training batch, not in setup), on rank 0, and broadcast; the plan (:attr:`budget_plan`)
            lives in the callback state, so a resumed run continues with it (after ``validate``/``test``/``predict``
            with a ``ckpt_path``, it is the checkpoint's plan). A budget that cannot be met is refused,
            naming the smallest reachable value, before anything changes: at setup when ``example_input_array`` is set,
            else after the first training batch (MACs/params; a latency budget at the first stage).
        channel_multiple: with a budget, plan only Ghost modules whose intrinsic maps ``ceil(C_out / s)`` are a
            multiple of it (an int >= 1; 1 = every ``s``): 16 suits ONNX Runtime on AVX-512 CPUs, 8 on AVX2 (see
            :func:`lightning_cheapconv.compress_to_budget`).
        latency_runtime: where ``target_latency_ms`` is measured: ``"pytorch"`` (eager) or ``"onnxruntime"`` (each
            candidate form and the whole model exported to ONNX and timed in ONNX Runtime; about a second per exported
            form; needs the ``export`` extra and a ``forward`` that takes one tensor).
        distill: distil from the network as it was right before the first conversion (a frozen copy in eval mode, kept
            in the callback state) for the rest of fit: each converted layer's output is matched to the original layer's
            output on the same input (``‖s - t‖² / ‖t‖²``), and with ``distill_logits`` the network's output (``T² ·
            KL``, Hinton et al. 2015); the gradient enters the backward pass through tensor hooks, scaled as Lightning
            scales the loss (AMP, accumulation), so ``training_step`` stays as it is. Logged as ``train/distill``. See
            :mod:`lightning_cheapconv.callbacks.distill`.
        distill_weight: weight of the distillation terms, > 0.
        distill_logits: also distil the logits (``forward`` must return a tensor of class scores, classes on dim 1).
        distill_temperature: ``T`` of the logit term, > 0.

    Raises:
        MisconfigurationException: an argument out of its range (the message names it, its value and the range);
            at setup, no layer to convert, a sharded strategy or spawn launcher with stages after epoch 0, or
            Lightning's ``ModelPruning`` in the same Trainer.

    Example::

        trainer = Trainer(max_epochs=20, callbacks=[GhostConvCallback(ratio=2, stages=2, end_epoch=4)])
        trainer.fit(model, datamodule=dm)

        # half the MACs, per-layer plan, distilled from the network before conversion
        callback = GhostConvCallback(start_epoch=2, target_macs=0.5, distill=True, distill_logits=True)
    """

    method = "ghost"
    cheap_types = GHOST_TYPES
    form_name = "Ghost"  # what converted layers are called in the log lines and the report

    def __init__(
        self,
        include: Patterns = None,
        exclude: Patterns = None,
        ratio: int = 2,
        dw_size: int = 3,
        init: Literal["inherit", "random"] = "inherit",
        calibration_batches: int = 0,
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        stages: int = 1,
        order: Order = "deep_first",
        skip_first: bool = True,
        skip_last: bool = True,
        verbose: int = 1,
        start_step: int | None = None,
        end_step: int | None = None,
        target_macs: float | None = None,
        target_params: float | None = None,
        target_latency_ms: float | None = None,
        channel_multiple: int = 1,
        latency_runtime: str = "pytorch",
        distill: bool = False,
        distill_weight: float = 1.0,
        distill_logits: bool = False,
        distill_temperature: float = 4.0,
    ) -> None:
        super().__init__(include, exclude, skip_first, skip_last, order, verbose)
        who, error = type(self).__name__, MisconfigurationException
        self._init_budget(target_macs, target_params, target_latency_ms, channel_multiple, latency_runtime)
        self._init_distill(distill, distill_weight, distill_logits, distill_temperature)
        if self.budgets and dw_size != 3:
            raise MisconfigurationException(
                f"{who}: dw_size={dw_size!r} is out of range with a budget ({self._budget_arguments()}); budget plans "
                "use d=3, valid value is 3"
            )
        self.ratio = check_int("ratio", ratio, 2, owner=who, error=error)
        self.dw_size = check_int("dw_size", dw_size, 1, odd=True, owner=who, error=error)
        self.init = check_choice("init", init, ("inherit", "random"), owner=who, error=error)
        self.calibration_batches = check_int("calibration_batches", calibration_batches, 0, owner=who, error=error)
        self.stages = check_int("stages", stages, 1, owner=who, error=error)
        self.unit, start, end = schedule_window(who, "", start_epoch, end_epoch, start_step, end_step)
        self.start = start if start is not None else 0
        self.end = end if end is not None else self.start + self.stages - 1
        if end is not None and self.stages == 1:
            rank_zero_warn(
                f"{who}: end_{self.unit}={end} has no effect with stages=1: every layer converts at "
                f"{self.unit} {self.start}. Give stages > 1 to spread the conversion up to end_{self.unit}."
            )
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.start_step, self.end_step = start_step, end_step
        self.fit_errors: dict[str, float | None] = {}
        self._pending: list[str] = []
        self.ratios: dict[str, int] = {}  # per-layer s from a budget plan

    # -- selection ------------------------------------------------------------------------------
    def _select(self, pl_module: LightningModule) -> list[LayerPlan]:
        return select_layers(
            pl_module,
            "ghost",
            self.include,
            self.exclude,
            self.skip_first,
            self.skip_last,
            ratio=self.ratio,
            dw_size=self.dw_size,
            example_input=self._example_input_array(pl_module),
        )

    def _make_cheap_twin(self, name: str, layer: nn.Module) -> nn.Module:
        return ghost_from_conv(layer, self.ratio_for(name), self.dw_size, "random", name=name)[0]

    def ratio_for(self, name: str) -> int:
        """``s`` of layer ``name``: the budget plan's, else ``ratio``."""
        return self.ratios.get(name, self.ratio)

    def _set_choice(self, name: str, choice: dict[str, Any]) -> None:
        self.ratios[name] = int(choice["ratio"])

    def _calls_needed(self) -> int:
        """Training forwards to record before the next conversion: ``calibration_batches``, and at least one for a
        budget plan still to make."""
        planning = bool(self.budgets) and self.budget_plan is None
        return max(self.calibration_batches, 1 if planning else 0)

    def _calibration_wanted(self) -> int:
        return self._calls_needed() if self._pending else 0

    def _integer_buffers(self) -> bool:
        return self.init == "inherit"  # the inherited channel order, GhostConv2d.output_index

    # -- setup and schedule -----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            self._remember_forms(pl_module, stage)
            return
        self._setup_plan(trainer, pl_module)
        self.fit_errors = {n: None for n in self.done}
        self._pending = []
        self.ratios, self.budget_plan = {}, None
        if self.distiller is not None:
            self.distiller.load_state(None)  # a new fit: the network before this fit's first conversion teaches
        if not self.todo:
            return
        self._build_schedule(self.start, self.end, self.stages)
        assert self.schedule is not None
        mid_fit = self.schedule.last_epoch > 0 or self._calls_needed() > 0
        check_strategy(trainer, type(self).__name__, changes_mid_fit=mid_fit)
        self._check_budget_at_setup(pl_module)
        if self.schedule.epochs[0] == 0 and self._calls_needed() == 0:
            # Before DDP wrapping and configure_optimizers: plain module surgery, any strategy.
            self._convert(trainer, pl_module, list(self.schedule.due_at(0)), "setup", mid_fit=False)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._warn_unreachable(trainer, "will stay dense")

    def _due(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        assert self.schedule is not None
        current = self._cheap_now(pl_module)
        self.fit_errors.update({n: self.fit_errors.get(n) for n in current})  # restored from a checkpoint
        return [n for n in self.schedule.due_by(self._now(trainer)) if n not in current and n in self.todo]

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule is None or self.unit != "epoch":
            return
        self._pending, self._calls = self._due(trainer, pl_module), []
        if self._pending and self._calls_needed() == 0:
            self._convert(trainer, pl_module, self._pending, f"epoch {trainer.current_epoch}", mid_fit=True)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        if self.schedule is not None and self.unit == "step" and not self._pending:
            self._pending, self._calls = self._due(trainer, pl_module), []
        if self._pending and len(self._calls) >= self._calls_needed():
            self._convert(trainer, pl_module, self._pending, self._when(trainer), mid_fit=True)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # records calls for calibration
        self._start_distilling(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._check_budget_early(pl_module, f"{self._when(trainer)} (first training batch)")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._pending and self.unit == "epoch"):
            return
        # The epoch ended before the batch after the recorded forwards: convert now, with the batches it had.
        names, recorded, needed = list(self._pending), len(self._calls), self._calls_needed()
        epoch, last = trainer.current_epoch, self._last_reached(trainer)
        self._convert(trainer, pl_module, self._pending, f"end of epoch {epoch}", mid_fit=True)
        if trainer.should_stop or (last is not None and epoch >= last):
            rank_zero_warn(
                f"{type(self).__name__}: epoch {epoch} ran {recorded} training batch(es); a conversion records "
                f"{needed} forwards (calibration_batches={self.calibration_batches}) and converts at the batch after "
                f"them, which the epoch did not have, so {len(names)} layer(s) were converted at the end of the last "
                f"training epoch and got no fine-tuning: {short_list(names)}. Lower calibration_batches below the "
                "epoch's batches, or start the stage an epoch earlier."
            )

    # -- conversion ---------------------------------------------------------------------------------
    def _convert(
        self, trainer: Trainer, pl_module: LightningModule, names: list[str], when: str, mid_fit: bool
    ) -> None:
        names = self._skip_reused(pl_module, names)
        if names and self.budgets and self.budget_plan is None:
            example = self._calls[0] if self._calls else self._example
            self._plan_budget(trainer, pl_module, example, f"{when} (first stage)")
            due = self.schedule.due_by(self._now(trainer)) if self.schedule is not None else ()
            cheap = self._cheap_now(pl_module)
            names = self._skip_reused(pl_module, [n for n in due if n in self.todo and n not in cheap])
        if not names:
            self._pending, self._calls = [], []
            return
        self._snapshot_teacher(trainer, pl_module)
        names = self._convert_in_place(pl_module, names, when)
        inputs: dict[str, Tensor] = {}
        calls = [call.to(pl_module.device) for call in self._calls]
        fitted = [n for n in names if self._fits_on_inputs(pl_module, n)]
        if calls and fitted:
            inputs = capture_inputs(pl_module, calls, fitted)
        new_modules: dict[str, nn.Module] = {}
        errors: dict[str, float | None] = {}
        for name in names:
            old = pl_module.get_submodule(name)
            new, error = self._build(trainer, name, old, inputs.get(name))
            new.train(old.training)
            new_modules[name], errors[name] = new, error
        if mid_fit:
            for name, new in new_modules.items():
                swap_in_optimizers(trainer.optimizers, pl_module.get_submodule(name), new)
        replace_modules(pl_module, new_modules)
        follow_in_averaged_copies(trainer, new_modules)
        if calls:
            recalibrate_batchnorm(pl_module, calls)
            for norm in pl_module.modules():
                if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                    broadcast_module(norm)  # rank 0's statistics, from rank 0's calibration batches
        if mid_fit and new_modules:
            rewrap(trainer)
        self.fit_errors.update(errors)
        self._pending, self._calls = [], []
        if self.verbose and names:
            fitted = [e for e in errors.values() if e is not None]
            detail = f", mean fit error {sum(fitted) / len(fitted):.3g}" if fitted else f", init={self.init}"
            per_layer = "".join(
                f"\n  {n}: fit error {e:.3g}" if e is not None else f"\n  {n}" for n, e in errors.items()
            )
            rank_zero_info(
                f"{type(self).__name__}: {when}: converted {len(names)} layer(s) "
                f"({self._progress(pl_module)}{detail})" + (per_layer if self.verbose > 1 else "")
            )

    def _progress(self, pl_module: LightningModule) -> str:
        """The stage log lines' count: how many target layers are converted now."""
        return f"{len(self.fit_errors)} of {len(self.targets)} target layers now {self.form_name}"

    def _convert_in_place(self, pl_module: LightningModule, names: list[str], when: str) -> list[str]:
        """Convert those of ``names`` that change in place (none here) and return the others, to be replaced."""
        return names

    def _fits_on_inputs(self, pl_module: LightningModule, name: str) -> bool:
        """Whether layer ``name`` is fitted on its recorded inputs (inheritance on activations; transposed convs are
        fitted in kernel space)."""
        return self.init == "inherit" and fits_on_activations(pl_module.get_submodule(name))

    def _build(
        self, trainer: Trainer, name: str, old: nn.Module, inputs: Tensor | None
    ) -> tuple[nn.Module, float | None]:
        """The Ghost module replacing ``old`` and its fit error, identical on every rank (rank 0's)."""
        new, error = ghost_from_conv(old, self.ratio_for(name), self.dw_size, self.init, inputs, name)
        # Rank 0's fit (its calibration data, its numerics) on every rank. Its channel assignment first: an identity
        # assignment stores no ``output_index`` buffer, so ranks whose fits differ would otherwise broadcast
        # different lists of tensors.
        index = None if new.output_index is None else new.output_index.tolist()
        index, error = trainer.strategy.broadcast((index, error), src=0)
        new.set_output_index(index)
        broadcast_module(new)
        return new, error

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(pl_module, f"{type(self).__name__}: original vs {self.form_name}")

    def state_dict(self) -> dict[str, Any]:
        errors = {n: (float(e) if e is not None else None) for n, e in self.fit_errors.items()}
        return {**super().state_dict(), "fit_errors": errors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.fit_errors = {n: e for n, e in state_dict.get("fit_errors", {}).items() if n in self.targets}
