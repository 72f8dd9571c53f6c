"""Projected training: layers kept dense, projected onto their structure after every optimizer step, and
decomposed when fit ends (shared by :class:`StructuredConvCallback` and :class:`BudgetConvCallback`).

A decomposed structured layer trains badly: each weight of its small conv stands for a whole pooling window of the
dense kernel, so its gradient is that many times larger than the dense kernel's, and at small hidden sizes the first
steps after a conversion can diverge. Trained as the dense kernel, projected back after every step (projected SGD, the
same Parameter objects, so DDP, optimizers and checkpoints are untouched), the layer has the dense layer's
conditioning and is exactly structured after every step; the decomposition at fit end is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._lightning import LightningModule, Trainer, is_weight_averaging, rank_zero_info, rank_zero_warn
from ..calls import ModelCall, tensors_in
from ..convert import decompose_structured, replace_modules
from ..structure import StructureSpec, project, structural_residual
from .base import CheapConvCallback
from .surgery import swap_in_optimizers

__all__ = ["ProjectedLayers"]


class ProjectedLayers(CheapConvCallback):
    """Base of the callbacks that train structured layers projected: :attr:`specs` (layer -> its
    :class:`~lightning_cheapconv.structure.StructureSpec`, filled by the subclass), :attr:`projected` (layers
    projected after every optimizer step from their stage on), the step projection, the fit-end check and
    decomposition, and their callback state.

    Subclasses call :meth:`_reset_projection` at setup, :meth:`_start_projecting` at a layer's stage,
    :meth:`_project_after_step` at every ``on_train_batch_end``, and :meth:`_check_still_structured` then
    :meth:`_decompose` at fit end. Layers projected count as converted in the logged figures and are distilled.

    Example::

        class StructuredConvCallback(ProjectedLayers):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
                self._project_after_step(trainer, pl_module)
    """

    specs: dict[str, StructureSpec]

    def _reset_projection(self) -> None:
        """Nothing projected or decomposed yet (a new fit). :attr:`specs` are the subclass's to fill."""
        self.projected: set[str] = set()
        self.decomposition_error: float | None = None
        self._last_projected_step = -1

    def _decompose_projected(self, trainer: Trainer, pl_module: LightningModule, names: list[str]) -> None:
        """Decompose those of ``names`` still dense (:meth:`_decompose`) and log how many, with the output check."""
        if names:
            self._decompose(trainer, pl_module, names)
        if self.verbose:
            error = self.decomposition_error
            check = "" if error is None else f"; max relative output difference {error:.2e}"
            rank_zero_info(f"{type(self).__name__}: decomposed {len(names)} layer(s){check}")

    def _set_structure(self, name: str, choice: dict[str, Any]) -> None:
        """Take a budget plan's structured choice (``channels``, ``kernel_size``) as layer ``name``'s spec."""
        self.specs[name] = StructureSpec(int(choice["channels"]), tuple(int(n) for n in choice["kernel_size"]))

    def _project_after_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Project the projected layers after every optimizer step (``global_step`` counts them), not after every
        micro-batch."""
        if self.projected and trainer.global_step != self._last_projected_step:
            self._project(pl_module, sorted(self.projected))
            self._last_projected_step = trainer.global_step

    def _distilled_layers(self, pl_module: LightningModule) -> list[str]:
        return sorted(set(self.projected) | self._cheap_now(pl_module))

    def _cheap_layers(self, pl_module: LightningModule) -> set[str]:
        return set(self.projected) | self._cheap_now(pl_module)

    def _residuals(self, pl_module: LightningModule, names: Sequence[str]) -> dict[str, float]:
        """``‖(I-P)W‖/‖W‖`` of each of ``names`` still dense: how far a projection would move it."""
        with torch.no_grad():
            return {
                n: float(structural_residual(pl_module.get_submodule(n).weight, self.specs[n]))
                for n in self._dense(pl_module, names)
            }

    def _project(self, pl_module: LightningModule, names: Sequence[str]) -> None:
        with torch.no_grad():
            for name in self._dense(pl_module, names):
                weight = pl_module.get_submodule(name).weight
                weight.copy_(project(weight, self.specs[name]))

    def _start_projecting(self, pl_module: LightningModule, names: Sequence[str], when: str) -> dict[str, float]:
        """Project ``names`` from now on; returns how far each moved (``‖(I-P)W‖/‖W‖`` before the projection)."""
        moved = self._residuals(pl_module, names)
        self._project(pl_module, names)
        self.projected.update(names)
        if self.verbose:
            worst = max(moved.values(), default=0.0)
            rank_zero_info(
                f"{type(self).__name__}: {when}: projecting {len(names)} layer(s) "
                f"({self._progress(pl_module)}; largest relative move "
                f"{worst:.3g})" + "".join(f"\n  {n}: moved {moved[n]:.3g}" for n in moved if self.verbose > 1)
            )
        return moved

    def _progress(self, pl_module: LightningModule) -> str:
        """The stage log lines' count: how many target layers are structured (projected) now."""
        return f"{len(self.projected)} of {len(self.targets)} target layers now structured"

    def _check_still_structured(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Project the projected layers once more before decomposing. Their weights are structured unless
        something replaced them after the last step: a weight-averaging callback copies its average in at train
        end, and an average that began before a layer's projection stage is not structured."""
        names = sorted(self.projected)
        moved = self._residuals(pl_module, names)
        self._project(pl_module, names)
        worst = max(moved, key=moved.get, default=None)
        if worst is not None and moved[worst] > 1e-4:
            averaging = [type(c).__name__ for c in trainer.callbacks if is_weight_averaging(c)]
            cause = f" ({', '.join(averaging)} copied in weights averaged over unprojected steps)" if averaging else ""
            rank_zero_warn(
                f"{type(self).__name__}: projected layers were no longer structured at fit end{cause}; projected "
                f"again, largest relative move {moved[worst]:.3g} ({worst}), without fine-tuning. With weight "
                "averaging, start it after the last projection stage."
            )

    def _decompose(self, trainer: Trainer, pl_module: LightningModule, names: list[str]) -> None:
        """Decompose the (projected) ``names`` and check the network's outputs on the recorded input.

        A forward that fails after the decomposition (a weight used outside its layer that the checks before
        could not see, say) puts the dense layers back and warns; so does an output difference above 1e-3.
        """
        who = type(self).__name__
        example = self._example.to(pl_module.device) if self._example is not None else None
        try:
            reference = self._outputs(pl_module, example)
        except Exception as err:  # noqa: BLE001 - the user's forward: report, never lose the trained model
            rank_zero_warn(f"{who}: cannot check the decomposition: the forward pass failed before it ({err!r})")
            example = reference = None
        old = {n: pl_module.get_submodule(n) for n in names}
        plan = [p for p in self.plan if p.action != "convert" or p.name in old]
        decompose_structured(pl_module, specs={n: self.specs[n] for n in names}, plan=plan)
        try:
            decomposed = self._outputs(pl_module, example)
        except Exception as err:  # noqa: BLE001
            replace_modules(pl_module, old)
            rank_zero_warn(
                f"{who}: the decomposed network fails its forward pass ({err!r}); the {len(old)} layer(s) stay "
                "dense (projected, so exactly structured) and can be decomposed with decompose_structured()."
            )
            return
        # The optimizers hold the decomposed parameters in place of the dense ones, so a checkpoint saved after
        # fit (``trainer.save_checkpoint``) has optimizer state that fits the decomposed model on resume.
        for name, layer in old.items():
            swap_in_optimizers(trainer.optimizers, layer, pl_module.get_submodule(name))
        if reference is not None and decomposed is not None:
            errors = [
                (d - r).abs().max() / r.abs().max().clamp_min(1e-12) for r, d in zip(reference, decomposed, strict=True)
            ]
            self.decomposition_error = float(max(errors, default=0.0))
            if self.decomposition_error > 1e-3:
                rank_zero_warn(
                    f"{who}: the decomposed network's outputs differ from the projected one's by "
                    f"{self.decomposition_error:.2e} (relative, max); expected ~1e-6."
                )
        elif example is None:
            rank_zero_warn(f"{who}: the decomposition was not checked: no recorded input (set example_input_array)")

    @staticmethod
    def _outputs(pl_module: LightningModule, example: ModelCall | None) -> list[torch.Tensor] | None:
        """The floating-point tensors of the network's output on ``example``, in eval mode."""
        if example is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                out = example(pl_module)
        finally:
            pl_module.train(was_training)
        return [t.float() for t in tensors_in(out) if t.is_floating_point()]

    def _restore_forms(self, pl_module: LightningModule, changed: list[str]) -> list[str]:
        """A checkpoint written before the fit-end decomposition holds the projected dense weights: decompose
        those again (exact), so validate/test/predict run the model in the form it had."""
        ours = [n for n in changed if n in self.specs]
        exact = [n for n, residual in self._residuals(pl_module, ours).items() if residual < 1e-5]
        if exact:
            self._decompose(pl_module.trainer, pl_module, exact)
            if self.verbose:
                rank_zero_info(
                    f"{type(self).__name__}: the checkpoint held {len(exact)} layer(s) dense (projected); decomposed "
                    "them again, as the model was"
                )
        return [n for n in changed if n not in exact or not isinstance(pl_module.get_submodule(n), self.cheap_types)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "projected": sorted(self.projected)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.projected = {n for n in state_dict.get("projected", []) if n in self.specs}
