"""Changing a model in the middle of ``fit``: identical modules on every rank, the live optimizer
edited in place, the copies other callbacks keep changed alike, and DDP wrapped again (DESIGN.md section 4)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .._lightning import (
    MisconfigurationException,
    Trainer,
    is_ddp,
    is_model_pruning,
    is_sharded,
    is_spawn_launcher,
    is_weight_averaging,
)
from ..convert import replace_modules

__all__ = [
    "check_strategy",
    "refuse_incompatible_callbacks",
    "broadcast_module",
    "swap_in_optimizers",
    "follow_in_averaged_copies",
    "rewrap",
]


def check_strategy(trainer: Trainer, who: str, changes_mid_fit: bool) -> None:
    """Refuse strategies where this callback cannot work safely, with a message saying what to use."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    if is_spawn_launcher(launcher):
        raise MisconfigurationException(
            f"{who}: strategy {type(strategy).__name__} with a spawn/fork launcher runs fit in worker processes and "
            "loses architecture changes when it hands the weights back. Use strategy='ddp'."
        )
    if is_sharded(strategy):
        detail = "changes modules in the middle of fit" if changes_mid_fit else "reads and edits full weights"
        raise MisconfigurationException(
            f"{who}: strategy {type(strategy).__name__} is not supported: this callback {detail}, which sharded "
            "strategies (FSDP, DeepSpeed) do not allow. Use a single device or strategy='ddp'"
            + (", or convert the model before fit with convert_to_ghost()." if changes_mid_fit else ".")
        )


def refuse_incompatible_callbacks(trainer: Trainer, who: str, integer_buffers: bool = False) -> None:
    """Refuse callbacks whose state cannot follow a layer replacement, naming them and what works instead.

    ``integer_buffers``: the cheap modules carry integer buffers (a Ghost module's ``output_index``), which a
    weight average over buffers (``WeightAveraging(use_buffers=True)``, ``EMAWeightAveraging``'s default)
    turns into averaged, truncated numbers.
    """
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if is_model_pruning(callback):
            raise MisconfigurationException(
                f"{who} cannot run together with {name}: pruning re-parametrizes the layers' "
                "weights (weight_orig * weight_mask) and keeps references to the modules this callback replaces. "
                "Prune before or after the compression run, in separate fits."
            )
        if integer_buffers and is_weight_averaging(callback) and getattr(callback, "_use_buffers", False):
            raise MisconfigurationException(
                f"{who} cannot run together with {name}(use_buffers=True): it averages every buffer, and the Ghost "
                "modules' output_index (the integer channel order kept by weight inheritance) does not survive "
                f"averaging. Use {name}(use_buffers=False), or GhostConvCallback(init='random')."
            )


def _averaged_copies(trainer: Trainer) -> list[nn.Module]:
    """The model copies held by Lightning's weight-averaging callbacks (SWA, WeightAveraging/EMA), made in
    their ``setup`` and paired with the live model's parameters by position."""
    copies = []
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None) if is_weight_averaging(callback) else None
        if isinstance(average, AveragedModel):
            copies.append(average.module)
        elif isinstance(average, nn.Module):
            copies.append(average)
    return copies


def follow_in_averaged_copies(trainer: Trainer, new_modules: dict[str, nn.Module]) -> None:
    """Apply the same replacement to every averaged copy, so that it keeps pairing with the live model.

    Each copy gets its own copy of the new module, on the device of the layer it replaces there: from now
    on its average of that layer starts from the converted weights.
    """
    for average in _averaged_copies(trainer):
        placed = {}
        for name, new in new_modules.items():
            old = average.get_submodule(name)
            reference = next(iter(old.parameters()), None)
            device = reference.device if reference is not None else None
            placed[name] = copy.deepcopy(new).to(device)
        replace_modules(average, placed)


def broadcast_module(module: nn.Module) -> None:
    """Make ``module``'s parameters and buffers equal to rank 0's (no-op outside distributed runs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor.data, src=0)


def _role(name: str) -> str:
    return "bias" if name.split(".")[-1] == "bias" else "weight"


def swap_in_optimizers(optimizers: list[torch.optim.Optimizer], old: nn.Module, new: nn.Module) -> None:
    """Replace ``old``'s parameters by ``new``'s in every optimizer, in place.

    The new parameters go where the old ones were, so each group lists its parameters exactly as
    a fresh ``configure_optimizers`` on the converted model would (optimizer state then restores
    by position on resume): a run of consecutive old parameters in a group is replaced by the new
    parameters with the same roles (weight, bias), in the new module's order. So a group built
    from ``model.parameters()`` gets ``primary.weight, primary.bias, cheap.weight, cheap.bias``,
    and groups split by role (weights with decay, biases without) get the new weights and the new
    biases. Old parameters and their state are dropped; group hyper-parameters and LR schedulers
    are untouched. New parameters start with empty state (no momentum). A role the old layer
    lacked joins the new weights.
    """
    role_of = {id(p): _role(n) for n, p in old.named_parameters()}
    old_roles = set(role_of.values())
    new_params = [(_role(n) if _role(n) in old_roles else "weight", p) for n, p in new.named_parameters()]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            params: list = []
            run: set[str] = set()
            for p in [*group["params"], None]:
                role = role_of.get(id(p)) if p is not None else None
                if role is not None:
                    optimizer.state.pop(p, None)
                    run.add(role)
                    continue
                if run:  # a run of old parameters ends: the new ones with the same roles, in module order
                    params.extend(q for r, q in new_params if r in run)
                    run = set()
                if p is not None:
                    params.append(p)
            group["params"] = params


def rewrap(trainer: Trainer) -> None:
    """Wrap the LightningModule in DDP again after its modules changed (no-op for single-device strategies)."""
    strategy = trainer.strategy
    if is_ddp(strategy):
        strategy.model = trainer.lightning_module
        strategy.configure_ddp()
