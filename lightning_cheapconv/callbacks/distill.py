"""Distillation from the network as it was before its first conversion, with no change to ``training_step``.

The teacher is a frozen copy of the whole network taken right before the callback first changes it (Ghost: the first
conversion; structured: the first projection stage). While the converted network (the student) trains, two terms are
added to the user's loss, both through tensor hooks on the student's outputs (no second backward, no change to the
loss the user returns):

- **features**, for every converted layer ``l`` (FitNets' intermediate "hints", Romero et al., ICLR 2015, matched
  layer by layer as in layer-wise reconstruction for compression, He et al., ICCV 2017): the student layer's output
  ``s_l`` against the *original* layer's output on the *same* input, ``t_l = T_l(x_l)`` (the teacher's layer at that
  name, run on the student's input to the layer), normalized by the teacher output's energy::

      L_feat = (1/L) Σ_l ‖s_l - t_l‖² / ‖t_l‖²    (L distilled layers; sums over the whole batch; t_l a constant)

  the squared relative output error that :mod:`lightning_cheapconv.budget` uses as a layer's sensitivity, so each
  layer's term starts at its predicted sensitivity and is free of the layer's scale. The mean over the layers (not
  their sum) keeps the term's size and gradient independent of how many layers were converted, so one
  ``distill_weight`` suits a ResNet-20 and a ResNet-50 alike;
- **logits** (optional; Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015): the whole
  teacher on the same forward call, ``L_kd = T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` over dim 1 (the class
  dimension, as ``F.cross_entropy`` takes it), averaged over the batch and any further positions.

The total added loss is ``distill_weight · (L_feat + L_kd)``. The gradient of each term with respect to the student
output is computed in the forward pass (``torch.autograd.grad`` on a detached float32 copy) and added to the output's
gradient in the backward pass, multiplied there by what Lightning applied to the user's loss: the fp16 GradScaler's
scale (``16-mixed``; bf16 has none) and ``1 / accumulate_grad_batches`` (automatic optimization). Because it enters
the ordinary backward pass, DDP all-reduces it with the loss's gradient (each rank's term is its own batch's, averaged
like the loss), clipping and every optimizer see it, and it reaches every student parameter upstream of the layer.

Teacher mode: ``eval`` (no dropout), with each BatchNorm normalizing as the student's BatchNorm of the same name does
(:func:`normalizing_like`): while the student trains, on the batch's own statistics (the teacher's running statistics
stay as they are). With running statistics against the student's batch statistics, a student with the teacher's very
weights would already be far from it (a KL of order 1 on a ResNet-20 early in training), and the logit term would pull
the converted network toward that mismatch rather than toward the teacher. Its state dict is
kept in the callback's state (one more copy of the dense weights in each checkpoint), so a resumed run gets the very
same teacher back.

Example::

    >>> distiller = Distiller(weight=1.0, logits=True, temperature=4.0)
    >>> distiller.snapshot(model)                      # before converting
    >>> convert_to_ghost(model)
    >>> distiller.attach(model, ["layer1.0.conv1"], factor=lambda: 1.0)
    >>> loss = F.cross_entropy(model(x), y); loss.backward()   # gradients include distill_weight * (L_feat + L_kd)
    >>> distiller.detach()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..calls import ModelCall
from ..checkpoint import restructure
from ..convert import DENSE_TYPES
from ..reuse import copy_without_hooks
from ..validation import check_bool, check_finite_number

__all__ = ["Distiller", "check_distill_arguments", "feature_distill_loss", "logit_distill_loss", "normalizing_like"]

DIVERGENCE = 100.0
"""A step's distillation loss above this many times the first step's is divergence (:meth:`Distiller.diverged`)."""


@contextmanager
def normalizing_like(teacher: nn.Module, student: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm of ``teacher`` whose namesake in ``student`` is training normalizes with the
    batch's own statistics, as the student's does, without updating its running statistics (or its batch count).

    Example::

        >>> with torch.no_grad(), normalizing_like(teacher, student):
        ...     target = teacher(x)        # the student's BatchNorm mode, the teacher's weights and statistics
    """
    students = dict(student.named_modules())
    changed = []
    for name, norm in teacher.named_modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            twin = students.get(name)
            if isinstance(twin, nn.modules.batchnorm._BatchNorm) and twin.training:
                changed.append((norm, norm.training, norm.track_running_stats))
                norm.training, norm.track_running_stats = True, False  # batch statistics, running ones untouched
    try:
        yield
    finally:
        for norm, training, track in changed:
            norm.training, norm.track_running_stats = training, track


def feature_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``‖s - t‖² / ‖t‖²`` over the whole tensors, in float32 (float64 stays float64): a scalar.

    ``teacher`` is a target (no gradient flows into it).

    Example::

        >>> feature_distill_loss(torch.ones(2, 3), torch.full((2, 3), 2.0))
        tensor(0.2500)
    """
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(dtype), teacher.detach().to(dtype)
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def logit_distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` with classes on dim 1 (dim 0 for 1-D logits), summed over the classes
    and averaged over every other position (the batch, and the pixels of a segmentation map): a scalar.

    From Hinton et al. 2015; the ``T²`` keeps the gradient's size independent of ``T``.

    Example::

        >>> logit_distill_loss(torch.zeros(4, 10), torch.zeros(4, 10), 4.0)
        tensor(0.)
    """
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    dim = 1 if student.dim() > 1 else 0
    log_s = F.log_softmax(student.to(dtype) / temperature, dim=dim)
    log_t = F.log_softmax(teacher.detach().to(dtype) / temperature, dim=dim)
    positions = max(1, student.numel() // student.shape[dim])
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum() / positions


def check_distill_arguments(
    who: str, distill: Any, weight: Any, logits: Any, temperature: Any, error: type[Exception]
) -> tuple[bool, float, bool, float]:
    """The callbacks' distillation arguments, checked: ``distill`` and ``distill_logits`` bools (``distill_logits``
    only with ``distill``), ``distill_weight`` a finite number > 0, ``distill_temperature`` a finite number > 0.

    Raises:
        error: naming the argument, its value and the valid range.
    """
    check_bool("distill", distill, owner=who, error=error)
    check_bool("distill_logits", logits, owner=who, error=error)
    if logits and not distill:
        raise error(
            f"{who}: distill_logits=True has no effect with distill=False; pass distill=True as well (the logit term "
            "adds to the feature term), or distill_logits=False"
        )
    weight = check_finite_number("distill_weight", weight, 0.0, exclusive_minimum=True, owner=who, error=error)
    temperature = check_finite_number(
        "distill_temperature", temperature, 0.0, exclusive_minimum=True, owner=who, error=error
    )
    return distill, float(weight), logits, float(temperature)


class Distiller:
    """The teacher and the hooks that add ``weight · (L_feat + L_kd)`` to a student's gradients (module docstring).

    Args:
        weight: ``distill_weight``, > 0.
        logits: also distil the network's output (``L_kd``); ``forward`` must return a tensor of class scores.
        temperature: ``T`` of ``L_kd``, > 0.

    Example::

        >>> distiller = Distiller(1.0, logits=False, temperature=1.0)
        >>> distiller.snapshot(model); convert_to_ghost(model)
        >>> distiller.attach(model, ["c1"], factor=lambda: 1.0); model(x).sum().backward(); distiller.detach()
    """

    def __init__(self, weight: float, logits: bool, temperature: float) -> None:
        self.weight, self.logits, self.temperature = weight, logits, temperature
        self.teacher: nn.Module | None = None
        self._saved_state: dict[str, Tensor] | None = None  # a checkpoint's teacher, built at the next attach
        self._handles: list[RemovableHandle] = []
        self._open: list[list] = []
        self._factor: Callable[[], float] = lambda: 1.0
        self.losses: list[Tensor] = []
        self.first_loss: float | None = None  # the first step's loss since the snapshot (:meth:`diverged`)
        self._warned = False

    # -- the teacher ------------------------------------------------------------------------------------------
    def snapshot(self, model: nn.Module) -> None:
        """Keep a frozen copy of ``model`` as it is now (eval mode, no gradients), unless one is kept already."""
        if self.teacher is not None:
            return
        teacher = copy_without_hooks(model)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher, self._saved_state = teacher, None
        self.first_loss, self._warned = None, False

    def state(self) -> dict[str, Tensor] | None:
        """The teacher's state dict on the CPU (for a checkpoint), or ``None`` before the snapshot."""
        if self.teacher is None:
            return self._saved_state
        return {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}

    def load_state(self, state: dict[str, Tensor] | None) -> None:
        """Take a checkpoint's teacher (built from it at the next :meth:`attach`), or none."""
        self.teacher, self._saved_state = None, state
        self.first_loss, self._warned = None, False

    def _build(self, model: nn.Module) -> None:
        """Rebuild the teacher saved in a checkpoint: a copy of ``model``, restructured to the saved state dict."""
        if self.teacher is None and self._saved_state is not None:
            teacher = copy_without_hooks(model)
            restructure(teacher, self._saved_state)
            teacher.load_state_dict(self._saved_state)
            teacher.eval()
            teacher.requires_grad_(False)
            self.teacher, self._saved_state = teacher, None

    def _place(self, model: nn.Module) -> None:
        """The teacher on the student's device and floating dtype (a strategy moves the student after the snapshot)."""
        assert self.teacher is not None
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        mine = next((p for p in self.teacher.parameters() if p.is_floating_point()), None)
        if reference is None or mine is None:
            return
        if (mine.device, mine.dtype) != (reference.device, reference.dtype):
            self.teacher.to(device=reference.device, dtype=reference.dtype)

    def teacher_layers(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` that are plain layers in the teacher (the original ones: ``nn.Conv1d/2d/3d``,
        ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear``)."""
        if self.teacher is None:
            return []
        return [n for n in names if isinstance(self.teacher.get_submodule(n), DENSE_TYPES)]

    # -- hooks ----------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, names: Sequence[str], factor: Callable[[], float]) -> None:
        """Hook ``model``'s layers ``names`` (feature terms) and, with ``logits``, ``model`` itself, until
        :meth:`detach`. ``factor()`` is read in the backward pass: the loss scale and accumulation divisor."""
        self.detach()
        self._build(model)
        if self.teacher is None:
            return
        self._place(model)
        self._factor = factor
        layers = self.teacher_layers(names)
        for name in layers:
            layer = model.get_submodule(name)
            hook = self._feature_hook(self.teacher.get_submodule(name), 1.0 / len(layers))
            self._handles.append(layer.register_forward_hook(hook))
        if self.logits:
            self._handles += [
                model.register_forward_pre_hook(self._enter, with_kwargs=True),
                model.register_forward_hook(self._leave, with_kwargs=True, always_call=True),
            ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._open = [], []

    def diverged(self, total: float) -> bool:
        """Whether the distillation loss of a step, ``total``, shows divergence: not finite, or above
        :data:`DIVERGENCE` times the first step's. True once per teacher (the first time only)."""
        if self.first_loss is None:
            self.first_loss = total
            return not math.isfinite(total)
        if self._warned or (math.isfinite(total) and total <= DIVERGENCE * max(self.first_loss, 1e-12)):
            return False
        self._warned = True
        return True

    def take_losses(self) -> Tensor | None:
        """The sum of the terms added since the last call (weighted, unscaled), or ``None``; then forget them."""
        losses, self.losses = self.losses, []
        return torch.stack(losses).sum() if losses else None

    def _add(self, output: Tensor, loss_of: Callable[[Tensor], Tensor], share: float = 1.0) -> None:
        """Compute ``weight · loss_of(output)`` and its gradient now; add the gradient to ``output``'s in backward."""
        with torch.enable_grad():
            copy_ = output.detach().requires_grad_(True)
            loss = self.weight * share * loss_of(copy_)
            (grad,) = torch.autograd.grad(loss, copy_)
        self.losses.append(loss.detach().float())
        factor = self._factor

        def add(incoming: Tensor) -> Tensor:
            return incoming + (grad * factor()).to(incoming.dtype)

        output.register_hook(add)

    def _feature_hook(self, original: nn.Module, share: float) -> Callable:
        def hook(_module: nn.Module, args: tuple, output: Any) -> None:
            if not isinstance(output, Tensor) or not output.requires_grad or not args:
                return
            with torch.no_grad():
                target = original(args[0].to(next(original.parameters()).dtype))
            self._add(output, lambda s: feature_distill_loss(s, target), share)

        return hook

    def _enter(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._open:
            self._open[-1][1] = True  # the enclosing call was Lightning's training_step redirection, not forward
        self._open.append([ModelCall(args, dict(kwargs)), False])

    def _leave(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._open:
            return
        call, nested = self._open.pop()
        if nested or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise TypeError(
                f"distill_logits=True needs {type(_module).__name__}.forward to return a tensor of class scores; it "
                f"returned {type(output).__name__}. Use distill_logits=False (feature distillation only)."
            )
        if not output.requires_grad:
            return
        assert self.teacher is not None
        with torch.no_grad(), normalizing_like(self.teacher, _module):
            dtype = next((p.dtype for p in self.teacher.parameters() if p.is_floating_point()), None)
            target = call.to(output.device, dtype)(self.teacher)
        self._add(output, lambda s: logit_distill_loss(s, target, self.temperature))
