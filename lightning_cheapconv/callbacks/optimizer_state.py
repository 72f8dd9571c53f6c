"""Optimizer and scheduler state that follows parameters by name, so a run resumes whatever its optimizer layout.

A mid-fit conversion edits the live optimizer in place: the new parameters join the group of the layer they
replace. A resumed run calls ``configure_optimizers`` afresh on the converted model, and a layout built from
modules (one group per module, a common way to set per-layer learning rates) then has more groups than the
saved one, which ``Optimizer.load_state_dict`` refuses. Torch restores optimizer state by position; this
module rewrites the saved state into the fresh layout by parameter *name* (the names each group held when the
checkpoint was written travel in the callback's state): each parameter keeps its state (momentum, Adam
moments), each fresh group takes the hyper-parameters (learning rate, ``initial_lr``, OneCycleLR's ``max_lr``
...) of the saved group its parameters came from, and the schedulers' per-group lists (``base_lrs``,
``_last_lr``) follow the same mapping. Where the layouts already match, nothing changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["parameter_names", "align_saved_state"]

Names = list[list[str | None]]  # per group, the qualified name of each parameter (None: not in the module)


def parameter_names(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module) -> list[Names]:
    """For each optimizer, the qualified name in ``module`` of every parameter of every group, in order."""
    names = {id(p): n for n, p in reversed(list(module.named_parameters(remove_duplicate=False)))}
    return [[[names.get(id(p)) for p in group["params"]] for group in opt.param_groups] for opt in optimizers]


def _aligned(saved: dict[str, Any], saved_names: Names, live_names: Names, live: dict[str, Any]):
    """``saved`` (an optimizer state dict laid out as ``saved_names``) laid out as ``live_names``, and for each
    live group the index of the saved group it takes its hyper-parameters from (None: a group of new parameters)."""
    where = {
        name: (g, index)
        for g, (group, names) in enumerate(zip(saved["param_groups"], saved_names, strict=True))
        for index, name in zip(group["params"], names, strict=True)
        if name is not None
    }
    groups, state, sources, at = [], {}, [], 0
    for j, names in enumerate(live_names):
        counts = Counter(where[n][0] for n in names if n in where)
        source = counts.most_common(1)[0][0] if counts else None
        hyper = saved["param_groups"][source] if source is not None else live["param_groups"][j]
        groups.append({**{k: v for k, v in hyper.items() if k != "params"}, "params": list(range(at, at + len(names)))})
        for k, name in enumerate(names):
            if name in where and where[name][1] in saved["state"]:
                state[at + k] = saved["state"][where[name][1]]
        sources.append(source)
        at += len(names)
    return {"state": state, "param_groups": groups}, sources


def align_saved_state(
    checkpoint: dict[str, Any],
    saved_names: Sequence[Names],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    module: nn.Module,
) -> list[int]:
    """Rewrite ``checkpoint["optimizer_states"]`` and ``checkpoint["lr_schedulers"]`` in place for the live
    ``optimizers`` and ``schedulers`` (LR scheduler objects, each with its ``optimizer``).

    Returns the indices of the optimizers whose saved state was rewritten. Optimizers whose saved names do
    not describe the saved state (another run's checkpoint) are left for torch to check by position.
    """
    states = checkpoint.get("optimizer_states") or []
    scheduler_states = checkpoint.get("lr_schedulers") or []
    live_layouts = parameter_names(optimizers, module)
    rewritten = []
    for i, (optimizer, live_names) in enumerate(zip(optimizers, live_layouts, strict=False)):
        if i >= len(states) or i >= len(saved_names) or live_names == saved_names[i]:
            continue
        saved = states[i]
        groups = saved.get("param_groups", [])
        if len(groups) != len(saved_names[i]) or any(
            len(g["params"]) != len(n) for g, n in zip(groups, saved_names[i], strict=True)
        ):
            continue
        states[i], sources = _aligned(saved, saved_names[i], live_names, optimizer.state_dict())
        for scheduler, state in zip(schedulers, scheduler_states, strict=False):
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            live = scheduler.state_dict()
            for key, value in list(state.items()):
                if isinstance(value, list) and len(value) == len(groups) and isinstance(live.get(key), list):
                    state[key] = [value[g] if g is not None else live[key][j] for j, g in enumerate(sources)]
        rewritten.append(i)
    return rewritten
