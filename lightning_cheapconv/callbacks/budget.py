"""BudgetConvCallback: one per-layer plan mixing Ghost, structured and dense layers meets a budget during ``fit``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from .._lightning import LightningModule, MisconfigurationException, Trainer
from ..budget import METHODS, _selection, check_methods
from ..convert import CHEAP_TYPES, GHOST_TYPES, LayerPlan, structured_like
from .base import Patterns
from .ghost import GhostConvCallback
from .projection import ProjectedLayers
from .schedule import Order

__all__ = ["BudgetConvCallback"]


class BudgetConvCallback(ProjectedLayers, GhostConvCallback):
    r"""Compress a network to a budget during ``fit``: one per-layer plan that keeps each selected conv dense, makes
    it a Ghost module (Han et al., CVPR 2020) or a structured convolution (Bhalgat et al., NeurIPS 2020), whichever
    meets the budget with the least total sensitivity.

    When the first stage starts, :func:`lightning_cheapconv.plan_budget` plans the layers on the first recorded
    training batch (rank 0; the plan is broadcast and kept in the callback state, so a resumed run continues with
    it): candidates per layer are dense, Ghost with ``s = 2`` (``d = 3``; ``s`` in {2, 3, 4} with
    ``methods="ghost"``: :data:`~lightning_cheapconv.budget.MIXED_GHOST_RATIOS`) and structured ``(c, n)`` on a grid;
    each is costed (MACs, parameters, and with ``target_latency_ms`` its measured latency) and scored (its squared
    relative output error on the batch), and a greedy multiple-choice knapsack meets every budget given (see
    :mod:`lightning_cheapconv.budget`). The layers then convert in one step per stage: Ghost layers as
    :class:`GhostConvCallback` converts them (the trained weights inherited, fitted on the recorded training batches'
    activations); structured layers are projected onto their structure in place and train projected (the dense kernel,
    projected again after every optimizer step: :class:`StructuredConvCallback`'s projection phase, without its
    regularization phase), and become :class:`~lightning_cheapconv.nn.StructuredConv2d` modules at fit end (exact).
    Trained decomposed, a structured layer's small conv sees the sum-pooled input, each of its weights standing for a
    whole pooling window of the dense kernel, so its gradient is that many times larger: at a quarter of the MACs the
    first steps after conversion diverged; projected, the layer keeps the dense layer's conditioning. The BatchNorm
    statistics are re-estimated on the recorded batches. Training then fine-tunes the mixed network, optionally
    distilled from the network as it was before the conversion (``distill``). Stages, DDP, resume, logging
    (``compression/*``: projected layers count as structured) and the fit-end report work as in
    :class:`GhostConvCallback`; every checkpoint restructures into a fresh model
    (:func:`lightning_cheapconv.install_restructure_hook`; checkpoints written during fit hold structured layers
    dense and projected, as :class:`StructuredConvCallback`'s do).

    Args:
        target_macs, target_params: the fraction of the original model's MACs (per forward of the recorded input) or
            parameters to keep, in ``(0, 1]`` (0.5 = half); the plan lands in ``[fraction - 0.02, fraction]`` where
            the candidates allow, never above. ``target_latency_ms``: the whole model's latency in ms on the recorded
            training batch (its device and batch size). At least one is required; all given are met. A budget that
            cannot be met is refused before anything changes, naming the smallest reachable value: at setup when
            ``example_input_array`` is set, else after the first training batch (MACs/params; a latency budget at the
            first stage).
        methods: what a layer may become: ``("ghost", "structured")`` (default), or one of them. The plan's scores
            are output errors right after conversion and do not see that Ghost modules with ``s >= 3`` fine-tune
            far worse than projected structured layers, so a layer that may be either is offered Ghost ``s = 2``
            only (:data:`~lightning_cheapconv.budget.MIXED_GHOST_RATIOS`; on the digits benchmark, BENCHMARKS.md
            table 3b, the mix then ties ``"structured"`` alone); allow ``"ghost"`` alone where your runtime runs
            Ghost modules fastest (a ``target_latency_ms`` plan then weighs their measured latency).
        channel_multiple: plan only candidates whose new channel counts (structured ``c``, unless ``c = C``; Ghost
            intrinsic maps) are multiples of it (an int >= 1; 1 = the whole grid): 16 suits ONNX Runtime on AVX-512
            CPUs, 8 on AVX2 (BENCHMARKS.md, table 3b; on narrow layers it raises the smallest reachable budget).
        latency_runtime: where ``target_latency_ms`` is measured: ``"pytorch"`` (eager) or ``"onnxruntime"`` (each
            candidate form and the whole model exported to ONNX and timed in ONNX Runtime; about a second per exported
            form; needs the ``export`` extra and a ``forward`` that takes one tensor).
        include, exclude: glob patterns on qualified layer names.
        calibration_batches: training batches whose forward inputs fit the Ghost inheritance on real activations and
            re-estimate the BatchNorm statistics after each stage (0: kernel-space fit, statistics left to training);
            planning always uses the first recorded batch.
        start_epoch, end_epoch, stages, order, start_step, end_step: the schedule, as in :class:`GhostConvCallback`
            (default: every planned layer at epoch 0, on its first training batch).
        skip_first, skip_last: keep the stem and the prediction layers as they are.
        verbose: 0 silent, 1 the plan table, a line per stage and the report, 2 per-layer details.
        distill, distill_weight, distill_logits, distill_temperature: distillation from the network before its first
            conversion, as in :class:`GhostConvCallback`.

    Raises:
        MisconfigurationException: no budget, an argument out of its range (the message names it, its value and the
            range), a budget that cannot be met; at setup, no layer to convert, a sharded strategy or spawn launcher,
            or Lightning's ``ModelPruning`` in the same Trainer.

    Example::

        # half the MACs at epoch 5, Ghost, structured and dense layers mixed, distilled from the dense network
        callback = BudgetConvCallback(target_macs=0.5, start_epoch=5, calibration_batches=4, distill=True)
        trainer = Trainer(max_epochs=10, callbacks=[callback])
        trainer.fit(model, datamodule=dm)
        callback.budget_plan["layer1.0.conv1"]     # {'method': 'structured', 'channels': 8, 'kernel_size': [2, 2]}
    """

    method = "budget"
    cheap_types = CHEAP_TYPES
    form_name = "converted"

    def __init__(
        self,
        target_macs: float | None = None,
        target_params: float | None = None,
        target_latency_ms: float | None = None,
        channel_multiple: int = 1,
        latency_runtime: str = "pytorch",
        methods: str | Sequence[str] = METHODS,
        include: Patterns = None,
        exclude: Patterns = None,
        calibration_batches: int = 4,
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        stages: int = 1,
        order: Order = "deep_first",
        skip_first: bool = True,
        skip_last: bool = True,
        verbose: int = 1,
        start_step: int | None = None,
        end_step: int | None = None,
        distill: bool = False,
        distill_weight: float = 1.0,
        distill_logits: bool = False,
        distill_temperature: float = 4.0,
    ) -> None:
        who = type(self).__name__
        self.methods = check_methods(methods, who, MisconfigurationException)
        super().__init__(
            include,
            exclude,
            calibration_batches=calibration_batches,
            start_epoch=start_epoch,
            end_epoch=end_epoch,
            stages=stages,
            order=order,
            skip_first=skip_first,
            skip_last=skip_last,
            verbose=verbose,
            start_step=start_step,
            end_step=end_step,
            target_macs=target_macs,
            target_params=target_params,
            target_latency_ms=target_latency_ms,
            channel_multiple=channel_multiple,
            latency_runtime=latency_runtime,
            distill=distill,
            distill_weight=distill_weight,
            distill_logits=distill_logits,
            distill_temperature=distill_temperature,
        )
        if not self.budgets:
            raise MisconfigurationException(
                f"{who}: no budget given; pass at least one of target_macs (a fraction in (0, 1]), target_params (a "
                "fraction in (0, 1]) and target_latency_ms (> 0)"
            )
        self.specs = {}  # the structured layers of the budget plan
        self._reset_projection()

    def _budget_methods(self) -> tuple[str, ...]:
        return self.methods

    def _select(self, pl_module: LightningModule) -> list[LayerPlan]:
        """Every layer one of :attr:`methods` can convert (the plan decides which, and how)."""
        allowed, skipped, entries = _selection(
            pl_module,
            self.methods,
            self.include,
            self.exclude,
            self.skip_first,
            self.skip_last,
            self._example_input_array(pl_module),
        )
        planned = [replace(entries[n], reason=f"to plan: {' or '.join(sorted(m))}") for n, m in allowed.items()]
        return sorted(planned + skipped, key=lambda entry: entry.order)

    def _set_choice(self, name: str, choice: dict[str, Any]) -> None:
        if choice["method"] == "structured":
            self._set_structure(name, choice)
        else:
            super()._set_choice(name, choice)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.specs = {}
            self._reset_projection()
        super().setup(trainer, pl_module, stage)

    def _make_cheap_twin(self, name: str, layer: nn.Module) -> nn.Module:
        spec = self.specs.get(name)
        return super()._make_cheap_twin(name, layer) if spec is None else structured_like(layer, spec)

    def _due(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        return [n for n in super()._due(trainer, pl_module) if n not in self.projected]

    def _progress(self, pl_module: LightningModule) -> str:
        """The stage log lines' count over both methods: a plan projects its structured layers and converts its Ghost
        ones in the same stage, so each line says how many of each are done."""
        cheap = self._cheap_now(pl_module)
        ghost = sum(isinstance(pl_module.get_submodule(n), GHOST_TYPES) for n in cheap)
        structured = len(cheap) - ghost + len(self.projected)
        return (
            f"{ghost + structured} of {len(self.targets)} target layers now converted ({structured} structured, "
            f"{ghost} Ghost)"
        )

    def _convert_in_place(self, pl_module: LightningModule, names: list[str], when: str) -> list[str]:
        """Project the structured layers of ``names`` (they train projected, dense, until fit end); return the
        Ghost ones."""
        structured = [n for n in names if n in self.specs]
        if structured:
            self.fit_errors.update(self._start_projecting(pl_module, structured, when))
        return [n for n in names if n not in self.specs]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._project_after_step(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.projected:
            self._check_still_structured(trainer, pl_module)
            self._decompose_projected(trainer, pl_module, self._dense(pl_module, sorted(self.projected)))
        super().on_fit_end(trainer, pl_module)
