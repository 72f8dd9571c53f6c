"""Optimizer and scheduler state restored by parameter name into another group layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_cheapconv.callbacks.optimizer_state import align_saved_state, parameter_names


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.LazyLinear(2))


def _per_module_groups(model: nn.Module, lr: float = 0.1) -> list[dict]:
    return [
        {"params": list(m.parameters(recurse=False)), "lr": lr * (i + 1)}
        for i, m in enumerate(m for m in model.modules() if list(m.parameters(recurse=False)))
    ]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 6, 6, generator=generator)).square().mean().backward()
        optimizer.step()
        scheduler.step()


def test_state_follows_names_into_a_finer_layout() -> None:
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    # The saved run had two groups (as after an in-place edit); a fresh configure_optimizers makes one per module.
    params = list(model.named_parameters())
    coarse = [{"params": [p for n, p in params if n.startswith("0.")], "lr": 0.3}]
    coarse.append({"params": [p for n, p in params if not n.startswith("0.")], "lr": 0.2})
    optimizer = torch.optim.SGD(coarse, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[0.5, 0.4], total_steps=20)
    _train(model, optimizer, scheduler, 3, seed=1)
    checkpoint = {
        "optimizer_states": [copy.deepcopy(optimizer.state_dict())],
        "lr_schedulers": [copy.deepcopy(scheduler.state_dict())],
    }
    names = parameter_names([optimizer], model)

    resumed = copy.deepcopy(model)
    fresh = torch.optim.SGD(_per_module_groups(resumed), lr=0.1, momentum=0.9)
    fresh_scheduler = torch.optim.lr_scheduler.OneCycleLR(fresh, max_lr=0.9, total_steps=20)
    assert len(fresh.param_groups) == 4
    assert align_saved_state(checkpoint, names, [fresh], [fresh_scheduler], resumed) == [0]
    fresh.load_state_dict(checkpoint["optimizer_states"][0])
    fresh_scheduler.load_state_dict(checkpoint["lr_schedulers"][0])

    saved_group = {n: g for g, group in zip(optimizer.param_groups, names[0], strict=True) for n in group}
    fresh_names = dict(zip(map(id, resumed.parameters()), (n for n, _ in resumed.named_parameters()), strict=True))
    for group in fresh.param_groups:
        for p in group["params"]:
            source = saved_group[fresh_names[id(p)]]
            assert (group["lr"], group["max_lr"], group["initial_lr"]) == (
                source["lr"],
                source["max_lr"],
                source["initial_lr"],
            )
            original = dict(model.named_parameters())[fresh_names[id(p)]]
            assert torch.equal(fresh.state[p]["momentum_buffer"], optimizer.state[original]["momentum_buffer"])
    assert len(fresh_scheduler.base_lrs) == len(fresh.param_groups)
    # Both runs continue identically: the resumed one is the uninterrupted one.
    _train(model, optimizer, scheduler, 4, seed=2)
    _train(resumed, fresh, fresh_scheduler, 4, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_matching_layout_is_left_alone() -> None:
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"optimizer_states": [optimizer.state_dict()], "lr_schedulers": []}
    before = copy.deepcopy(state)
    assert align_saved_state(state, parameter_names([optimizer], model), [optimizer], [], model) == []
    assert state == before


def test_names_that_do_not_describe_the_state_are_left_for_torch() -> None:
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"optimizer_states": [optimizer.state_dict()]}
    wrong = [[["0.weight"]]]  # one name for a group of seven parameters
    fresh = torch.optim.SGD(_per_module_groups(model), lr=0.1)
    assert align_saved_state(state, wrong, [fresh], [], model) == []
    with pytest.raises(ValueError, match="parameter groups"):
        fresh.load_state_dict(state["optimizer_states"][0])
