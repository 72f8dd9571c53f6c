"""StructuredConvCallback: structural regularization, progressive projection, decomposition at fit end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._lightning import LightningModule, MisconfigurationException, Trainer, rank_zero_info, rank_zero_warn
from ..convert import LayerPlan, decompose_structured, select_layers, structure_spec_for
from ..nn import StructuredConv2d, StructuredLinear
from ..structure import StructureSpec, project, structural_residual
from .base import CheapConvCallback, Patterns
from .schedule import Order
from .surgery import check_strategy, swap_in_optimizers

__all__ = ["StructuredConvCallback"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StructuredConvCallback(CheapConvCallback):
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
    3. **Fit end**: layers become :class:`StructuredConv2d` / :class:`StructuredLinear`; the outputs
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
        kernel_size: explicit ``n`` (an int or pair), clamped to each layer's kernel.
        linear: also structure ``nn.Linear`` layers (the classifier stays dense with ``skip_last``).
        reg_weight: λ, >= 0.
        reg_schedule: warm-up epochs (λ ramps linearly from 0 to ``reg_weight``), or a callable
            ``epoch -> λ`` that replaces the ramp.
        project_start_epoch, project_end_epoch: the projection stages. ``None`` means 50% and 75% of
            ``max_epochs``; without ``max_epochs``, projection happens at fit end only.
        project_order: ``"deep_first"`` or ``"shallow_first"``.
        decompose_on_fit_end: replace layers by their decomposed form when fit ends.
        export_path: where to save the decomposed model's state dict (self-describing; load it with
            :func:`lightning_cheapconv.restructure`).
        skip_first, skip_last: keep the stem and the classifier dense (the papers' default).
        verbose: 0 silent, 1 summary and report, 2 per-layer details.

    Example::

        trainer = Trainer(max_epochs=30, callbacks=[StructuredConvCallback(channel_ratio=0.5)])
        trainer.fit(model, datamodule=dm)   # model ends decomposed; the report shows the savings
    """

    method = "structured"

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
    ) -> None:
        super().__init__(include, exclude, skip_first, skip_last, project_order, verbose)
        if not _is_number(channel_ratio) or not 0.0 < channel_ratio <= 1.0:
            raise MisconfigurationException(f"channel_ratio={channel_ratio!r} is out of range; valid range is (0, 1]")
        if kernel_size is None and (not _is_int(kernel_reduction) or kernel_reduction < 0):
            raise MisconfigurationException(
                f"kernel_reduction={kernel_reduction!r} is out of range; valid range is an int >= 0"
            )
        if kernel_size is not None:
            sizes = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
            if len(sizes) != 2 or not all(_is_int(v) and v >= 1 for v in sizes):
                raise MisconfigurationException(f"kernel_size={kernel_size!r}; valid values are ints >= 1 or a pair")
        if not _is_number(reg_weight) or reg_weight < 0:
            raise MisconfigurationException(f"reg_weight={reg_weight!r} is out of range; valid range is >= 0")
        if not callable(reg_schedule) and (not _is_int(reg_schedule) or reg_schedule < 0):
            raise MisconfigurationException(
                f"reg_schedule={reg_schedule!r}; valid values are warm-up epochs (an int >= 0) or a callable(epoch)"
            )
        for name, value in (("project_start_epoch", project_start_epoch), ("project_end_epoch", project_end_epoch)):
            if value is not None and (not _is_int(value) or value < 0):
                raise MisconfigurationException(f"{name}={value!r} is out of range; valid range is an int >= 0")
        if (
            project_start_epoch is not None
            and project_end_epoch is not None
            and project_end_epoch < project_start_epoch
        ):
            raise MisconfigurationException(
                f"project_end_epoch={project_end_epoch} is before project_start_epoch={project_start_epoch}"
            )
        self.channel_ratio, self.kernel_reduction, self.kernel_size = channel_ratio, kernel_reduction, kernel_size
        self.linear = linear
        self.reg_weight, self.reg_schedule = float(reg_weight), reg_schedule
        self.project_start_epoch, self.project_end_epoch = project_start_epoch, project_end_epoch
        self.decompose_on_fit_end = decompose_on_fit_end
        self.export_path = Path(export_path) if export_path is not None else None
        self.specs: dict[str, StructureSpec] = {}
        self.projected: set[str] = set()
        self.layer_residuals: dict[str, float] = {}
        self.decomposition_error: float | None = None
        self._last_projected_step = -1

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
            )
        except ValueError as err:
            raise MisconfigurationException(f"StructuredConvCallback: {err}") from err

    def _make_cheap_twin(self, name: str, layer: nn.Module) -> nn.Module:
        spec = self.specs[name] = structure_spec_for(
            layer, self.channel_ratio, self.kernel_reduction, self.kernel_size, name
        )
        if isinstance(layer, nn.Conv2d):
            return StructuredConv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
                layer.bias is not None,
                layer.padding_mode,
                hidden_channels=spec.channels,
                hidden_kernel_size=spec.kernel_size,
            )
        return StructuredLinear(layer.in_features, layer.out_features, layer.bias is not None, spec.channels)

    def _cheap_layers(self) -> set[str]:
        return set(self.projected)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__, changes_mid_fit=False)
        self.specs = {}
        self._setup_plan(pl_module)  # builds each target's cheap twin, and with it self.specs
        start, end = self._projection_window(trainer)
        if start is not None:
            self._build_schedule(start, end, stages=end - start + 1)
        self.projected = set()
        self._last_projected_step = -1
        self.layer_residuals, self.decomposition_error = {}, None  # nothing left from an earlier fit

    def _projection_window(self, trainer: Trainer) -> tuple[int | None, int]:
        start, end = self.project_start_epoch, self.project_end_epoch
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        if start is None:
            if max_epochs is None and end is None:
                return None, 0
            if max_epochs is None:
                start = end
            else:  # the default start never lies after an explicit end
                start = max_epochs // 2 if end is None else min(max_epochs // 2, end)
        if end is None:
            end = max(start, (3 * max_epochs) // 4) if max_epochs is not None else start
        if max_epochs is not None and end >= max_epochs:
            rank_zero_warn(
                f"StructuredConvCallback: project_end_epoch={end} is not before max_epochs={max_epochs}; "
                "the layers of later stages are projected at fit end, without fine-tuning."
            )
        return start, end

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
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        weight = self.current_reg_weight(trainer.current_epoch)
        total = torch.zeros((), device=pl_module.device)
        copies, params = [], []
        for name in self._dense(pl_module, self.targets):
            if name in self.projected:
                continue
            param = pl_module.get_submodule(name).weight
            if id(param) not in owned:
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
                grad = grad.to(param.dtype)
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
        if copies:
            pl_module.log("train/struct_reg", total, on_step=True, on_epoch=True, prog_bar=False)

    # -- projection -----------------------------------------------------------------------------
    @staticmethod
    def _dense(pl_module: LightningModule, names: Sequence[str]) -> list[str]:
        """Those of ``names`` still in dense form. A run resumed from a checkpoint saved after the fit-end
        decomposition has them decomposed already: structured by construction, nothing to project."""
        return [n for n in names if isinstance(pl_module.get_submodule(n), (nn.Conv2d, nn.Linear))]

    def _project(self, pl_module: LightningModule, names: Sequence[str]) -> None:
        with torch.no_grad():
            for name in self._dense(pl_module, names):
                weight = pl_module.get_submodule(name).weight
                weight.copy_(project(weight, self.specs[name]))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule is None:
            return
        due = [n for n in self.schedule.due_by(trainer.current_epoch) if n not in self.projected]
        if due:
            self._start_projecting(pl_module, due, f"epoch {trainer.current_epoch}")

    def _start_projecting(self, pl_module: LightningModule, names: Sequence[str], when: str) -> None:
        with torch.no_grad():
            moved = {
                n: float(structural_residual(pl_module.get_submodule(n).weight, self.specs[n]))
                for n in self._dense(pl_module, names)
            }
        self._project(pl_module, names)
        self.projected.update(names)
        if self.verbose:
            worst = max(moved.values(), default=0.0)
            rank_zero_info(
                f"StructuredConvCallback: {when}: projecting {len(names)} layer(s) "
                f"({len(self.projected)}/{len(self.targets)} now structured; largest relative move {worst:.3g})"
                + "".join(f"\n  {n}: moved {moved[n]:.3g}" for n in moved if self.verbose > 1)
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Project after every optimizer step (global_step counts them), not after every micro-batch.
        if self.projected and trainer.global_step != self._last_projected_step:
            self._project(pl_module, sorted(self.projected))
            self._last_projected_step = trainer.global_step

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            self.layer_residuals = {
                n: float(structural_residual(pl_module.get_submodule(n).weight, self.specs[n]))
                for n in self._dense(pl_module, self.targets)
            }
        if self.verbose > 1:
            rank_zero_info(
                "StructuredConvCallback: residuals ‖(I-P)W‖/‖W‖: "
                + ", ".join(f"{n}={r:.3g}" for n, r in self.layer_residuals.items())
            )

    # -- fit end ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.decompose_on_fit_end:
            return
        remaining = [n for n in self.targets if n not in self.projected]
        if remaining:
            self._start_projecting(pl_module, remaining, "fit end")
        dense = self._dense(pl_module, self.targets)
        if dense:
            self._decompose(trainer, pl_module, dense)
        if self.verbose:
            error = self.decomposition_error
            check = "" if error is None else f"; max relative output difference {error:.2e}"
            rank_zero_info(f"StructuredConvCallback: decomposed {len(dense)} layer(s){check}")
        self._report(pl_module, "StructuredConvCallback: original vs decomposed")
        if self.export_path is not None and trainer.is_global_zero:
            self.export_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(pl_module.state_dict(), self.export_path)
            rank_zero_info(f"StructuredConvCallback: decomposed state dict saved to {self.export_path}")

    def _decompose(self, trainer: Trainer, pl_module: LightningModule, names: list[str]) -> None:
        example = self._example.to(pl_module.device) if self._example is not None else None
        reference = self._outputs(pl_module, example)
        old = {n: pl_module.get_submodule(n) for n in names}
        plan = [p for p in self.plan if p.action != "convert" or p.name in old]
        decompose_structured(pl_module, specs={n: self.specs[n] for n in names}, plan=plan)
        # The optimizers hold the decomposed parameters in place of the dense ones, so a checkpoint saved after
        # fit (``trainer.save_checkpoint``) has optimizer state that fits the decomposed model on resume.
        for name, layer in old.items():
            swap_in_optimizers(trainer.optimizers, layer, pl_module.get_submodule(name))
        decomposed = self._outputs(pl_module, example)
        if reference is not None and decomposed is not None:
            scale = reference.abs().max().clamp_min(1e-12)
            self.decomposition_error = float((decomposed - reference).abs().max() / scale)

    @staticmethod
    def _outputs(pl_module: LightningModule, example: torch.Tensor | None) -> torch.Tensor | None:
        if example is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                out = pl_module(example)
        except Exception:
            return None
        finally:
            pl_module.train(was_training)
        return out.float() if isinstance(out, torch.Tensor) else None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "projected": sorted(self.projected)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.projected = {n for n in state_dict.get("projected", []) if n in self.specs}
