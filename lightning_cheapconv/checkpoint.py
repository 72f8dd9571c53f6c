"""Checkpoints that describe their own structure (DESIGN.md section 5).

Every cheap module saves a structure record in its ``_extra_state``. :func:`restructure` makes a
model's structure match a state dict, in both directions: it builds cheap modules where the
state dict has their records and rebuilds plain ``nn.Conv2d``/``nn.Linear`` where a cheap module
of the model meets dense weights. A fresh model then loads a checkpoint of any stage, strictly.

Example::

    >>> model = torchvision.models.resnet18()
    >>> restructure(model, torch.load("ghost_resnet18.pt"))     # builds the Ghost layers
    >>> model.load_state_dict(torch.load("ghost_resnet18.pt"))  # strict load now works
    >>> install_restructure_hook(model)                          # or: let load_state_dict do it
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .convert import replace_modules
from .nn.record import StructureRecordMixin, build_from_record, records_equal, registered_kinds

__all__ = ["Restructured", "restructure", "install_restructure_hook", "dense_from_record"]

_EXTRA = "_extra_state"
_HOOK_FLAG = "_cheapconv_restructure_hook"


@dataclass(frozen=True)
class Restructured:
    """One module that :func:`restructure` rebuilt."""

    name: str
    old_type: str
    new_type: str


def _records(state_dict: Mapping[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Module path -> structure record, for every registered cheap kind in the state dict; and module
    path -> kind for records (dicts with a ``kind``) of kinds this library does not know."""
    kinds = set(registered_kinds())
    found, unknown = {}, {}
    for key, value in state_dict.items():
        if key == _EXTRA or key.endswith("." + _EXTRA):
            path = key[: -len(_EXTRA)].rstrip(".")
            if isinstance(value, dict) and value.get("kind") in kinds:
                found[path] = value
            elif isinstance(value, dict) and "kind" in value:
                unknown[path] = value["kind"]
    return found, unknown


def dense_from_record(record: dict, weight: Tensor, where: str = "module") -> nn.Module:
    """The plain ``nn.Conv2d``/``nn.Linear`` that a cheap module with this record replaced, shaped for ``weight``."""
    if weight.dim() == 4:
        groups = record.get("groups", 1)
        layer: nn.Module = nn.Conv2d(
            record["in_channels"],
            record["out_channels"],
            tuple(record["kernel_size"]),
            stride=tuple(record["stride"]),
            padding=record["padding"] if isinstance(record["padding"], str) else tuple(record["padding"]),
            dilation=tuple(record["dilation"]),
            groups=groups,
            bias=record["bias"],
            padding_mode=record["padding_mode"],
            device="meta",
        )
    elif weight.dim() == 2 and "in_features" in record:
        layer = nn.Linear(record["in_features"], record["out_features"], bias=record["bias"], device="meta")
    else:
        raise ValueError(
            f"{where}: dense weight of shape {tuple(weight.shape)} does not fit the {record.get('kind')} "
            f"it replaces ({record})"
        )
    if tuple(layer.weight.shape) != tuple(weight.shape):
        raise ValueError(
            f"{where}.weight: shape {tuple(weight.shape)} does not match the dense layer "
            f"{tuple(layer.weight.shape)} described by the model's {record.get('kind')} record"
        )
    return layer


def _device_dtype(like: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    reference = next(iter(like.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    return device, dtype


def _placed(module: nn.Module, like: nn.Module) -> nn.Module:
    """``module`` (a plain layer built on the meta device) materialized on ``like``'s device and dtype."""
    device, dtype = _device_dtype(like)
    module = module.to_empty(device=device)
    if dtype is not None:
        module = module.to(dtype)
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    return module


def _plan(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, nn.Module]:
    records, unknown = _records(state_dict)
    replacements: dict[str, nn.Module] = {}
    handled: set[int] = set()
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, kind in unknown.items():
        # Where a cheap module or a layer it replaces sits, a record nobody can build is an error, not a skip.
        if isinstance(modules.get(path), (StructureRecordMixin, nn.Conv2d, nn.Linear)):
            raise ValueError(
                f"state dict key {(path + '.' if path else '') + _EXTRA!r}: unknown structure kind {kind!r}; "
                f"known kinds are {registered_kinds()}"
            )
    # Cheap modules that the state dict describes.
    for path, record in records.items():
        current = modules.get(path)
        where = path or "<root>"
        if current is None:
            raise ValueError(
                f"state dict key {(path + '.' if path else '') + _EXTRA!r}: the checkpoint has a "
                f"{record['kind']} at {where!r} but the model has no module there"
            )
        if id(current) in handled:
            continue
        handled.add(id(current))
        if isinstance(current, StructureRecordMixin) and records_equal(current.structure_record(), record):
            continue
        device, dtype = _device_dtype(current)
        try:
            # Built where it will live, fully initialized: a non-strict load may leave some of it unloaded.
            with torch.device(device):
                new = build_from_record(record, where)
        except (TypeError, ValueError) as err:
            raise ValueError(f"state dict key {path + '.' + _EXTRA!r}: cannot rebuild {record['kind']}: {err}") from err
        replacements[path] = new.to(dtype) if dtype is not None else new
    # Cheap modules of the model that meet dense weights: rebuild the plain layer they replaced.
    kinds = set(registered_kinds())
    for path, module in modules.items():
        if id(module) in handled or type(module).__name__ not in kinds or path in records:
            continue
        weight_key = f"{path}.weight" if path else "weight"
        if weight_key not in state_dict:
            continue
        handled.add(id(module))
        record = module.structure_record()
        dense = dense_from_record(record, state_dict[weight_key], path or "<root>")
        replacements[path] = _placed(dense, module)
    return replacements


def _check_loadable(
    model: nn.Module, replacements: dict[str, nn.Module], state_dict: Mapping[str, Any], strict: bool
) -> None:
    """Raise before anything changes if ``state_dict`` would not load into the restructured model."""
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    # State dicts list a shared module once per name, so every alias of a replaced module counts.
    swapped = {alias: new for path, new in replacements.items() for alias in aliases[id(model.get_submodule(path))]}
    dropped = tuple(alias + "." for alias in swapped)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(dropped)}
    for alias, new in swapped.items():
        expected.update({f"{alias}.{k}": v for k, v in new.state_dict(keep_vars=True).items()})
    problems = []
    for key, value in state_dict.items():
        if key not in expected:
            if strict:
                problems.append(f"{key!r}: unexpected key (the model has no such parameter or buffer)")
        elif isinstance(value, Tensor) and isinstance(expected[key], Tensor) and value.shape != expected[key].shape:
            problems.append(
                f"{key!r}: shape {tuple(value.shape)} does not match the model's {tuple(expected[key].shape)}"
            )
    if strict:
        problems.extend(f"{key!r}: missing from the state dict" for key in expected if key not in state_dict)
    if problems:
        raise ValueError("state dict does not fit the model; nothing was changed:\n  " + "\n  ".join(problems))


def restructure(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> list[Restructured]:
    """Make ``model``'s structure match ``state_dict`` so that ``model.load_state_dict(state_dict)`` works.

    Builds cheap modules (Ghost, structured) where the state dict holds their records, and plain
    ``nn.Conv2d``/``nn.Linear`` where the model has a cheap module but the state dict dense
    weights. New modules land on the device and dtype of those they replace; shared modules stay
    shared; parameter order is kept (optimizer state restores by position). Before anything
    changes, the state dict is checked against the restructured model (keys when ``strict``,
    shapes always); on any problem a ``ValueError`` names each key and why, and the model is
    left as it was.

    Returns the rebuilt modules (empty when the structure already matched).
    """
    replacements = _plan(model, state_dict)
    _check_loadable(model, replacements, state_dict, strict)
    changes = [
        Restructured(path, type(model.get_submodule(path)).__name__, type(new).__name__)
        for path, new in replacements.items()
    ]
    if replacements:
        replace_modules(model, replacements)
    return changes


def install_restructure_hook(model: nn.Module) -> RemovableHandle | None:
    """Make ``model.load_state_dict`` call :func:`restructure` first (a load-state-dict pre-hook).

    This is how Lightning resumes a run whose architecture changed mid-fit: the model's weights
    load before any callback state, so the structure must follow the checkpoint by itself.
    Installing twice is a no-op (returns ``None``) while the first hook is in place. Shapes are
    checked before anything changes; missing and unexpected keys are left to ``load_state_dict``
    and its own ``strict`` (PyTorch hands pre-hooks ``strict=True`` whatever the caller asked).
    """
    installed = getattr(model, _HOOK_FLAG, None)
    if installed is not None and installed in model._load_state_dict_pre_hooks:
        return None

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        restructure(module, own, strict=False)

    handle = model.register_load_state_dict_pre_hook(hook)
    object.__setattr__(model, _HOOK_FLAG, handle.id)
    return handle
