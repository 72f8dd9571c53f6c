"""Changing a model in the middle of ``fit``: identical modules on every rank, the live optimizer
edited in place, and DDP wrapped again (DESIGN.md section 4)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from torch import nn

__all__ = ["check_strategy", "broadcast_module", "swap_in_optimizers", "rewrap"]


def check_strategy(trainer: pl.Trainer, who: str, changes_mid_fit: bool) -> None:
    """Refuse strategies where this callback cannot work safely, with a message saying what to use."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        raise MisconfigurationException(
            f"{who}: strategy {type(strategy).__name__} with a spawn/fork launcher runs fit in worker processes and "
            "loses architecture changes when it hands the weights back. Use strategy='ddp'."
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        detail = "changes modules in the middle of fit" if changes_mid_fit else "reads and edits full weights"
        raise MisconfigurationException(
            f"{who}: strategy {type(strategy).__name__} is not supported: this callback {detail}, which sharded "
            "strategies (FSDP, DeepSpeed) do not allow. Use a single device or strategy='ddp'"
            + (", or convert every layer at epoch 0 (start_epoch=0, stages=1)." if changes_mid_fit else ".")
        )


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

    Each new parameter takes the place of the old parameter with the same role (new weights where
    the old weight was, new biases where the old bias was, in that group), so the groups list
    their parameters exactly as a fresh ``configure_optimizers`` on the converted model would:
    optimizer state then restores by position on resume. Old parameters and their state are
    dropped; group hyper-parameters and LR schedulers are untouched. New parameters start with
    empty state (no momentum). A role the old layer lacked joins the group of the new weights.
    """
    role_of = {id(p): _role(n) for n, p in old.named_parameters()}
    new_by_role: dict[str, list[nn.Parameter]] = {"weight": [], "bias": []}
    for name, param in new.named_parameters():
        new_by_role[_role(name)].append(param)
    for optimizer in optimizers:
        placed: dict[str, dict] = {}
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                role = role_of.get(id(p))
                if role is None:
                    params.append(p)
                    continue
                optimizer.state.pop(p, None)
                params.extend(new_by_role[role])
                placed[role] = group
            group["params"] = params
        if "weight" in placed:
            for role, params in new_by_role.items():
                if role not in placed:
                    placed["weight"]["params"].extend(params)


def rewrap(trainer: pl.Trainer) -> None:
    """Wrap the LightningModule in DDP again after its modules changed (no-op for single-device strategies)."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy.model = trainer.lightning_module
        strategy.configure_ddp()
