"""StructuredConvCallback: structural regularization, progressive projection, decomposition at fit end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._lightning import (
    LightningModule,
    MisconfigurationException,
    Trainer,
    is_weight_averaging,
    rank_zero_info,
    rank_zero_warn,
)
from ..convert import (
    STRUCTURED_TYPES,
    LayerPlan,
    select_layers,
    structure_spec_for,
    structured_like,
)
from ..structure import StructureSpec, check_structure_ratios, structural_residual
from ..validation import check_bool, check_finite_number, check_instance, check_int
from .base import Patterns, short_list
from .projection import ProjectedLayers
from .schedule import Order, schedule_window
from .surgery import check_strategy

__all__ = ["StructuredConvCallback"]


class StructuredConvCallback(ProjectedLayers):
    r"""Train a network toward structured convolutions, then decompose it into sum-pool + small conv.

    From Bhalgat et al., "Structured Convolutions for Efficient Neural Network Design",
    NeurIPS 2020 (arXiv 2008.02454). Three phases, all inside ``fit``:

    1. **Regularization** (every step): ``λ(epoch) · Σ_l ‖(I-P_l)W_l‖ / ‖W_l‖`` is added to the
       gradients in ``on_before_optimizer_step``, computed on detached weight copies, so it works
       unchanged under DDP, AMP (grads are unscaled there), gradient accumulation (added once per
       optimizer step, like a loss term on the effective batch) and gradient clipping (clipping
       runs after this hook, so the total is clipped). Manual optimization: the hook runs inside
       ``optimizer.step()`` of the LightningOptimizer, so it works when ``training_step`` calls
       ``self.optimizers().step()``; raw ``torch.optim`` steps bypass it.
    2. **Progressive projection**: from ``project_start_epoch`` to ``project_end_epoch`` the layers
       are hard-projected in stages (one stage per epoch in ``project_order``), in place after
       every optimizer step from their stage on (projected SGD: same Parameters, so DDP,
       optimizers and checkpoints are untouched). After the last stage every kernel is exactly
       structured.
    3. **Fit end**: layers become :class:`StructuredConv2d` / :class:`StructuredLinear` (``nn.Conv1d``/``nn.Conv3d``:
       ``StructuredConv1d``/``StructuredConv3d``; ``nn.ConvTranspose{d}d``: ``StructuredConvTranspose{d}d``, whose
       structure, regularized and projected like the others, is on each input channel's ``(C_out/groups, K...)``
       block of the weight as stored); the outputs
       on a sample batch are checked against the projected model (max relative difference is
       printed and kept in ``decomposition_error``), a compression report is printed on rank 0, and
       the decomposed state dict is saved to ``export_path`` if set.

    ``compression/params``, ``compression/macs`` (per example, batch 1) and their ratios
    (original / compressed) are logged at each validation epoch end for the network as it would
    be if decomposed now: layers already projected count as decomposed.

    Args:
        include, exclude: glob patterns on qualified layer names (``"backbone.layer1.*"``).
        channel_ratio: ``c / C`` per layer, in (0, 1]; 1.0 = spatial structure only.
        kernel_reduction: ``n = k - kernel_reduction`` (default 1: 3x3 -> 2x2); or give ``kernel_size``.
        kernel_size: explicit ``n`` (an int or pair; a tuple of 1 or 3 for Conv1d or Conv3d layers), clamped to
            each layer's kernel.
        linear: also structure ``nn.Linear`` layers (the classifier stays dense with ``skip_last``).
        reg_weight: λ, >= 0.
        reg_schedule: warm-up epochs (λ ramps linearly from 0 to ``reg_weight``), or a callable
            ``epoch -> λ`` that replaces the ramp.
        project_start_epoch, project_end_epoch: the projection stages. ``None`` means 50% and 75% of
            ``max_epochs``; a run bounded by ``max_steps`` only gets the window at 50% and 75% of ``max_steps``
            (in steps); an unbounded run is projected at fit end only (with a warning). Stages the fit does not
            reach warn at the start of training.
        project_order: ``"deep_first"`` or ``"shallow_first"``.
        decompose_on_fit_end: replace layers by their decomposed form when fit ends.
        export_path: where to save the decomposed model's state dict (self-describing; load it with
            :func:`lightning_cheapconv.restructure`).
        skip_first, skip_last: keep the stem and the classifier dense (the papers' default).
        verbose: 0 silent, 1 summary and report, 2 per-layer details.
        project_start_step, project_end_step: the projection window in optimizer steps (``trainer.global_step``)
            instead of epochs, one stage per step until every layer is projected; epochs or steps, not both.
        target_macs, target_params: a budget, the fraction of the original model's MACs (per forward of the recorded
            input) or parameters to keep, in ``(0, 1]``; ``target_latency_ms``: the whole model's latency in ms on a
            recorded training batch (its device and batch size). With any of them, per-layer hidden sizes ``(c, n)``
            (``channel_ratio``/``kernel_reduction`` then unused) are planned by :func:`lightning_cheapconv.plan_budget`
            (``methods=("structured",)``, among the selected layers; layers the plan keeps dense are skipped) after the
            first training batch, on its recorded input (regularization, the first phase, needs each layer's structure;
            that first step is not regularized), on rank 0, and broadcast; the plan (:attr:`budget_plan`) lives in the
            callback state, so a resumed run continues with it (after ``validate``/``test``/``predict`` with a
            ``ckpt_path``, it is the checkpoint's plan). A budget that cannot be met is refused, naming the
            smallest reachable value, before anything changes: at setup when ``example_input_array`` is set, else after
            the first training batch.
        channel_multiple: with a budget, plan only hidden channel counts ``c`` that are a multiple of it (or ``C``
            itself; an int >= 1, 1 = the whole grid): 16 suits ONNX Runtime on AVX-512 CPUs, 8 on AVX2 (see
            :func:`lightning_cheapconv.compress_to_budget`; on narrow layers it raises the smallest reachable budget).
        latency_runtime: where ``target_latency_ms`` is measured: ``"pytorch"`` (eager) or ``"onnxruntime"`` (each
            candidate form and the whole model exported to ONNX and timed in ONNX Runtime; about a second per exported
            form; needs the ``export`` extra and a ``forward`` that takes one tensor).
        distill: distil from the network as it was right before the first projection stage (a frozen copy in eval mode,
            kept in the callback state) for the rest of fit: each converted layer's output is matched to the original
            layer's output on the same input (``‖s - t‖² / ‖t‖²``), and with ``distill_logits`` the network's output
            (``T² · KL``, Hinton et al. 2015); the gradient enters the backward pass through tensor hooks, scaled as
            Lightning scales the loss (AMP, accumulation), so ``training_step`` stays as it is. Logged as
            ``train/distill``. See :mod:`lightning_cheapconv.callbacks.distill`.
        distill_weight: weight of the distillation terms, > 0.
        distill_logits: also distil the logits (``forward`` must return a tensor of class scores, classes on dim 1).
        distill_temperature: ``T`` of the logit term, > 0.

    Raises:
        MisconfigurationException: an argument out of its range (the message names it, its value and the range);
            at setup, no layer to convert, a sharded strategy or spawn launcher, or Lightning's ``ModelPruning``.

    Example::

        trainer = Trainer(max_epochs=30, callbacks=[StructuredConvCallback(channel_ratio=0.5)])
        trainer.fit(model, datamodule=dm)   # model ends decomposed; the report shows the savings

        # half the MACs, per-layer plan, distilled from the network before conversion
        callback = StructuredConvCallback(target_macs=0.5, distill=True, distill_logits=True)
    """

    method = "structured"
    cheap_types = STRUCTURED_TYPES

    def __init__(
        self,
        include: Patterns = None,
        exclude: Patterns = None,
        channel_ratio: float = 1.0,
        kernel_reduction: int | None = 1,
        kernel_size: int | tuple[int, int] | None = None,
        linear: bool = False,
        reg_weight: float = 0.1,
        reg_schedule: int | Callable[[int], float] = 0,
        project_start_epoch: int | None = None,
        project_end_epoch: int | None = None,
        project_order: Order = "deep_first",
        decompose_on_fit_end: bool = True,
        export_path: str | Path | None = None,
        skip_first: bool = True,
        skip_last: bool = True,
        verbose: int = 1,
        project_start_step: int | None = None,
        project_end_step: int | None = None,
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
        super().__init__(include, exclude, skip_first, skip_last, project_order, verbose, "project_order")
        who, error = type(self).__name__, MisconfigurationException
        self._init_budget(target_macs, target_params, target_latency_ms, channel_multiple, latency_runtime)
        self._init_distill(distill, distill_weight, distill_logits, distill_temperature)
        check_finite_number("channel_ratio", channel_ratio, 0.0, 1.0, exclusive_minimum=True, owner=who, error=error)
        try:
            check_structure_ratios(channel_ratio, kernel_reduction, kernel_size, owner=who)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        check_finite_number("reg_weight", reg_weight, 0.0, owner=who, error=error)
        if not callable(reg_schedule):
            check_int("reg_schedule", reg_schedule, 0, owner=who, error=error)
        check_bool("linear", linear, owner=who, error=error)
        check_bool("decompose_on_fit_end", decompose_on_fit_end, owner=who, error=error)
        if export_path is not None:
            check_instance("export_path", export_path, (str, Path), owner=who, error=error)
        self._given_unit, self.project_start, self.project_end = schedule_window(
            who, "project_", project_start_epoch, project_end_epoch, project_start_step, project_end_step
        )
        self.channel_ratio, self.kernel_reduction, self.kernel_size = channel_ratio, kernel_reduction, kernel_size
        self.linear = linear
        self.reg_weight, self.reg_schedule = float(reg_weight), reg_schedule
        self.project_start_epoch, self.project_end_epoch = project_start_epoch, project_end_epoch
        self.project_start_step, self.project_end_step = project_start_step, project_end_step
        self.decompose_on_fit_end = decompose_on_fit_end
        self.export_path = Path(export_path) if export_path is not None else None
        self.specs: dict[str, StructureSpec] = {}
        self.layer_residuals: dict[str, float] = {}
        self._reset_projection()

    # -- selection ----------------------------------------------------------------------------
    def _select(self, pl_module: LightningModule) -> list[LayerPlan]:
        try:
            return select_layers(
                pl_module,
                "structured",
                self.include,
                self.exclude,
                self.skip_first,
                self.skip_last,
                linear=self.linear,
                channel_ratio=self.channel_ratio,
                kernel_reduction=self.kernel_reduction,
                kernel_size=self.kernel_size,
                example_input=self._example_input_array(pl_module),
            )
        except ValueError as err:
            raise MisconfigurationException(f"StructuredConvCallback: {err}") from err

    def _set_choice(self, name: str, choice: dict[str, Any]) -> None:
        self._set_structure(name, choice)

    def _calibration_wanted(self) -> int:
        return 1 if self.budgets and self.budget_plan is None else 0  # the first training forward plans the budget

    def _make_cheap_twin(self, name: str, layer: nn.Module) -> nn.Module:
        choice = (self.budget_plan or {}).get(name)
        if choice is not None and choice["method"] == "structured":
            self._set_choice(name, choice)
            spec = self.specs[name]
        else:
            spec = self.specs[name] = structure_spec_for(
                layer, self.channel_ratio, self.kernel_reduction, self.kernel_size, name
            )
        return structured_like(layer, spec)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            self._remember_forms(pl_module, stage)
            return
        check_strategy(trainer, type(self).__name__, changes_mid_fit=False)
        self.specs = {}
        self.budget_plan = None
        if self.distiller is not None:
            self.distiller.load_state(None)  # a new fit: the network before this fit's first projection teaches
        self._setup_plan(trainer, pl_module)  # builds each target's cheap twin, and with it self.specs
        self.schedule = None
        window = self._projection_window(trainer)
        if window is not None and self.todo:
            start, end = window
            self._build_schedule(start, end, stages=min(end - start + 1, len(self.todo)))
        self._reset_projection()
        self.layer_residuals = {}  # nothing left from an earlier fit
        self._check_budget_at_setup(pl_module)

    def _projection_window(self, trainer: Trainer) -> tuple[int, int] | None:
        """First and last projection stage, in :attr:`unit`: given, or 50% and 75% of ``max_epochs`` (epochs),
        else of ``max_steps`` (steps). ``None`` (with a warning) when neither bounds the fit."""
        start, end = self.project_start, self.project_end
        self.unit = self._given_unit
        if start is None or end is None:
            max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
            max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None
            if self.unit == "epoch" and max_epochs is None and max_steps is not None and start is None and end is None:
                self.unit = "step"  # a run bounded by max_steps only: the default window in steps
            total = max_epochs if self.unit == "epoch" else max_steps
            if total is None and start is None and end is None:
                rank_zero_warn(
                    "StructuredConvCallback: the fit is bounded by neither max_epochs nor max_steps, so no projection "
                    "stage can be placed; layers are projected at fit end, without fine-tuning. Set "
                    "project_start_epoch/project_start_step."
                )
                return None
            if start is None:  # the default start never lies after an explicit end
                start = end if total is None else (total // 2 if end is None else min(total // 2, end))
            if end is None:
                end = max(start, (3 * total) // 4) if total is not None else start
        return start, end

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._warn_unreachable(trainer, "are projected at fit end, without fine-tuning")
        self._warn_early_averaging(trainer)

    def _warn_early_averaging(self, trainer: Trainer) -> None:
        """StochasticWeightAveraging that starts before the last projection stage averages unprojected weights;
        projecting its average afterwards invalidates the BatchNorm statistics it re-estimates at the end."""
        if self.schedule is None or self.unit != "epoch":
            return
        for callback in trainer.callbacks:
            start = getattr(callback, "swa_start", None) if is_weight_averaging(callback) else None
            if isinstance(start, int) and start <= self.schedule.last_epoch:
                last = self.schedule.last_epoch
                rank_zero_warn(
                    f"StructuredConvCallback: {type(callback).__name__} starts averaging at epoch {start}, not after "
                    f"the last projection stage (epoch {last}): its average includes unprojected weights, and "
                    "projecting it afterwards leaves the BatchNorm statistics it re-estimates stale. Pass "
                    f"swa_epoch_start >= {last + 2} (it counts epochs from 1)."
                )

    # -- regularization -------------------------------------------------------------------------
    def current_reg_weight(self, epoch: int) -> float:
        """λ at ``epoch``: the callable's value, or a linear warm-up to ``reg_weight``."""
        if callable(self.reg_schedule):
            return float(self.reg_schedule(epoch))
        if self.reg_schedule == 0:
            return self.reg_weight
        return self.reg_weight * min(1.0, (epoch + 1) / (self.reg_schedule + 1))

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.budgets and self.budget_plan is None:
            return  # no structure to regularize toward before the budget plan (made after the first training batch)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        weight = self.current_reg_weight(trainer.current_epoch)
        scale = self._loss_scale_left(trainer, optimizer)
        total = torch.zeros((), device=pl_module.device)
        copies, params = [], []
        for name in self._dense(pl_module, self.targets):
            if name in self.projected:
                continue
            param = pl_module.get_submodule(name).weight
            if id(param) not in owned or not param.requires_grad:  # frozen weights get no gradient from us
                continue
            copy = param.detach().float().requires_grad_(True)
            residual = structural_residual(copy, self.specs[name])
            total = total + residual.detach()
            copies.append((copy, residual))
            params.append(param)
        if copies and weight > 0:
            loss = weight * torch.stack([r for _, r in copies]).sum()
            grads = torch.autograd.grad(loss, [c for c, _ in copies])
            for param, grad in zip(params, grads, strict=True):
                grad = (grad * scale).to(param.dtype)
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
        if copies:
            pl_module.log("train/struct_reg", total, on_step=True, on_epoch=True, prog_bar=False, sync_dist=True)

    @staticmethod
    def _loss_scale_left(trainer: Trainer, optimizer: torch.optim.Optimizer) -> float:
        """The AMP loss scale the gradients still carry in ``on_before_optimizer_step``: 1.0, except with an
        fp16 GradScaler and an optimizer that unscales inside its own step (``fused=True``), for which Lightning
        skips ``unscale_`` before the hook; the added gradient must then be scaled like the loss's."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled() or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return 1.0
        return float(scaler.get_scale())

    # -- projection -----------------------------------------------------------------------------
    # Only layers still dense (``_dense``) are projected or regularized: a run resumed from a checkpoint saved after
    # the fit-end decomposition has them decomposed already, structured by construction.
    def _project_due(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule is None:
            return
        due = [n for n in self.schedule.due_by(self._now(trainer)) if n not in self.projected and n in self.todo]
        due = self._skip_reused(pl_module, due)
        if due:
            self._snapshot_teacher(trainer, pl_module)
            self._start_projecting(pl_module, due, self._when(trainer))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.unit == "epoch":
            self._project_due(trainer, pl_module)

    def _may_refuse_after_first_batch(self) -> bool:
        # The plan itself is made at the end of the first batch: a latency budget may be refused there too.
        return "latency_ms" in self.budgets or super()._may_refuse_after_first_batch()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.unit == "step":
            self._project_due(trainer, pl_module)
        self._start_distilling(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.budgets and self.budget_plan is None and self.todo:
            example = self._calls[0] if self._calls else self._example
            self._calls = []
            self._plan_budget(trainer, pl_module, example, f"{self._when(trainer)} (first training batch)")
        self._project_after_step(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.layer_residuals = self._residuals(pl_module, self.targets)
        if self.verbose > 1:
            rank_zero_info(
                "StructuredConvCallback: residuals ‖(I-P)W‖/‖W‖: "
                + ", ".join(f"{n}={r:.3g}" for n, r in self.layer_residuals.items())
            )

    # -- fit end ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.decompose_on_fit_end:
            return
        self._check_still_structured(trainer, pl_module)
        remaining = self._skip_reused(pl_module, [n for n in self.todo if n not in self.projected])
        if remaining and self.schedule is not None and trainer.should_stop:
            rank_zero_warn(
                f"StructuredConvCallback: the fit stopped before the projection stage of {len(remaining)} layer(s); "
                f"they are projected now, at fit end, without fine-tuning: {short_list(remaining)}."
            )
        if remaining:
            self._start_projecting(pl_module, remaining, "fit end")
        self._decompose_projected(trainer, pl_module, self._dense(pl_module, self.targets))
        self._report(pl_module, "StructuredConvCallback: original vs decomposed")
        if self.export_path is not None and trainer.is_global_zero:
            self.export_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(pl_module.state_dict(), self.export_path)
            rank_zero_info(f"StructuredConvCallback: decomposed state dict saved to {self.export_path}")
