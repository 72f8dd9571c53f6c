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
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils.hooks import RemovableHandle

from .convert import replace_modules
from .nn.record import (
    StructureRecordMixin,
    build_from_record,
    decode_record,
    kind_class,
    records_equal,
    registered_kinds,
    upgrade_record,
)
from .validation import short_repr

__all__ = ["Restructured", "restructure", "install_restructure_hook", "dense_from_record", "dense_layer_for"]

_EXTRA = "_extra_state"
_HOOK_FLAG = "_cheapconv_restructure_hook"
# What a layer is sized by. A record may change how a layer computes (Ghost, structured, dense), never these: the
# layers around it keep theirs, and no tensor of a structured layer says how many channels it reads.
_SIZE_FIELDS = ("in_channels", "out_channels", "kernel_size", "groups", "in_features", "out_features", "num_features")


@dataclass(frozen=True)
class Restructured:
    """One module that :func:`restructure` rebuilt."""

    name: str
    old_type: str
    new_type: str


def _join(path: str, name: str) -> str:
    """``path.name``, where either may be empty (the root module; the module itself)."""
    return f"{path}.{name}" if path and name else path or name


def _is_record_key(key: str) -> bool:
    return key == _EXTRA or key.endswith("." + _EXTRA)


def _records(state_dict: Mapping[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Module path -> structure record, for every registered cheap kind in the state dict; and module
    path -> kind for records (dicts with a ``kind``) of kinds this library does not know."""
    kinds = set(registered_kinds())
    found, unknown = {}, {}
    for key, value in state_dict.items():
        if _is_record_key(key):
            path = key[: -len(_EXTRA)].rstrip(".")
            value = upgrade_record(decode_record(value, f"state dict key {key!r}"))
            kind = value.get("kind") if isinstance(value, dict) else None
            if isinstance(kind, str) and kind in kinds:
                found[path] = value
            elif isinstance(value, dict) and "kind" in value:
                unknown[path] = kind
    return found, unknown


def dense_layer_for(record: dict) -> nn.Module:
    """The plain ``nn.Conv2d``/``nn.Linear`` (on the meta device: nothing allocated) that a cheap module with this
    (trusted) structure record replaced (``nn.Conv1d``/``nn.Conv3d`` for a kernel of one or three sides; a kind
    whose class defines ``dense_layer_for(record)``, such as the transposed convs, says itself)."""
    own = getattr(kind_class(record.get("kind")), "dense_layer_for", None)
    if own is not None:
        return own(record)
    if "in_features" in record:
        return nn.Linear(record["in_features"], record["out_features"], bias=record["bias"], device="meta")
    conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(record["kernel_size"])]
    return conv_type(
        record["in_channels"],
        record["out_channels"],
        tuple(record["kernel_size"]),
        stride=tuple(record["stride"]),
        padding=record["padding"] if isinstance(record["padding"], str) else tuple(record["padding"]),
        dilation=tuple(record["dilation"]),
        groups=record.get("groups", 1),
        bias=record["bias"],
        padding_mode=record["padding_mode"],
        device="meta",
    )


def dense_from_record(record: dict, weight: Any, where: str = "module") -> nn.Module:
    """:func:`dense_layer_for` ``record``, checked against ``weight`` from a state dict (a 4-D tensor for a conv,
    2-D for a linear layer).

    Raises:
        ValueError: naming ``where``, if ``weight`` is not a tensor of the dense layer's shape.
    """
    layer = dense_layer_for(record)
    if not isinstance(weight, Tensor) or weight.dim() != layer.weight.dim():
        shown = f"of shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else f"of type {type(weight).__name__}"
        raise ValueError(f"{where}: dense weight {shown} does not fit the {record.get('kind')} it replaces ({record})")
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


def _materialized(planned: nn.Module, like: nn.Module) -> nn.Module:
    """The module ``planned`` on the meta device, built for real on ``like``'s device and dtype, initialized (a
    non-strict load may leave some of it unloaded) and in ``like``'s training mode."""
    device, dtype = _device_dtype(like)
    if isinstance(planned, StructureRecordMixin):
        module = build_from_record(planned.structure_record(), device=device)
    else:
        module = planned.to_empty(device=device)
        module.reset_parameters()
    module.train(like.training)
    return module.to(dtype) if dtype is not None else module


def _sizes(module: nn.Module) -> dict[str, Any]:
    described = module.config() if isinstance(module, StructureRecordMixin) else vars(module)
    return {field: described[field] for field in _SIZE_FIELDS if field in described}


def _check_sizes(new: nn.Module, current: nn.Module, key: str) -> None:
    """Raise unless ``new`` (built from the record at ``key``) has the sizes of the model's ``current`` module."""
    if isinstance(current, LazyModuleMixin) and current.has_uninitialized_params():
        return
    ours = _sizes(current)
    for field, value in _sizes(new).items():
        if field in ours and not records_equal({field: value}, {field: ours[field]}):
            raise ValueError(
                f"state dict key {key!r}: {type(new).__name__} record field {field}={short_repr(value)} does not "
                f"match the model's {type(current).__name__} there; valid value: {ours[field]!r} (a checkpoint "
                "changes how a layer computes, never its size)"
            )


def _plan(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, nn.Module]:
    """Module path -> the module to put there, built on the meta device: every record is checked completely and
    nothing is allocated from a record's sizes before :func:`_check_loadable` has compared them with the tensors."""
    records, unknown = _records(state_dict)
    replacements: dict[str, nn.Module] = {}
    handled: set[int] = set()
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, kind in unknown.items():
        # Where a cheap module or a layer it replaces sits, a record nobody can build is an error, not a skip.
        if isinstance(modules.get(path), (StructureRecordMixin, nn.modules.conv._ConvNd, nn.Linear)):
            raise ValueError(
                f"state dict key {_join(path, _EXTRA)!r}: unknown structure kind {short_repr(kind)}; "
                f"known kinds are {registered_kinds()}"
            )
    # Cheap modules that the state dict describes.
    for path, record in records.items():
        key = _join(path, _EXTRA)
        current = modules.get(path)
        if current is None:
            raise ValueError(
                f"state dict key {key!r}: the checkpoint has a {record['kind']} at {path or '<root>'!r} but the "
                "model has no module there"
            )
        # Checked even where it equals the model's own record: ``True == 1`` to Python, never to a record.
        new = build_from_record(record, f"state dict key {key!r}", device="meta")
        if id(current) in handled:
            continue
        handled.add(id(current))
        if isinstance(current, StructureRecordMixin) and records_equal(current.structure_record(), record):
            continue
        _check_sizes(new, current, key)
        replacements[path] = new
    # Cheap modules of the model that meet dense weights: rebuild the plain layer they replaced.
    kinds = set(registered_kinds())
    for path, module in modules.items():
        if id(module) in handled or type(module).__name__ not in kinds or path in records:
            continue
        weight_key = _join(path, "weight")
        if weight_key not in state_dict:
            continue
        handled.add(id(module))
        replacements[path] = dense_from_record(module.structure_record(), state_dict[weight_key], path or "<root>")
    return replacements


def _under(key: str, prefixes: set[str]) -> str | None:
    """The longest of ``prefixes`` (module paths, ``""`` for the root) that ``key`` lies under, if any."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)) if p in prefixes), None)


def _check_loadable(
    model: nn.Module, replacements: dict[str, nn.Module], state_dict: Mapping[str, Any], strict: bool
) -> None:
    """Raise before anything changes if ``state_dict`` would not load into the restructured model.

    Always checked: every value where the model has a tensor is a tensor with data, of the model's shape;
    every structure record is the one of the module that loads it; under a module that a record describes
    or that is rebuilt, every key is one of that module's; the values that modules check themselves
    (:meth:`~lightning_cheapconv.nn.record.StructureRecordMixin.check_state`). With ``strict``, also
    every missing and unexpected key.
    """
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    # State dicts list a shared module once per name, so every alias of a replaced module counts.
    swapped = {alias: new for path, new in replacements.items() for alias in aliases[id(model.get_submodule(path))]}
    dropped = tuple(alias + "." for alias in swapped)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(dropped)}
    after = {
        p: m for p, m in model.named_modules(remove_duplicate=False) if p not in swapped and not p.startswith(dropped)
    }
    for alias, new in swapped.items():
        expected.update({_join(alias, k): v for k, v in new.state_dict(keep_vars=True).items()})
        after.update({_join(alias, p): m for p, m in new.named_modules(remove_duplicate=False)})
    described = set(_records(state_dict)[0]) | set(swapped)
    problems = []
    for key, value in state_dict.items():
        if key not in expected:
            owner = _under(key, described)
            if owner is not None:
                module = after.get(owner)
                what = f"the {type(module).__name__} at {owner or '<root>'!r}"
                if isinstance(module, StructureRecordMixin):
                    what += f" (as its structure record describes it: {module.config()})"
                problems.append(f"{key!r}: unexpected key; {what} has no such entry")
            elif strict:
                problems.append(f"{key!r}: unexpected key (the model has no such parameter or buffer)")
        elif isinstance(expected[key], Tensor) and not _is_record_key(key):  # records are checked below
            problems.extend(_tensor_problems(key, value, expected[key], swapped))
    for path, module in after.items():
        key = _join(path, _EXTRA)
        if isinstance(module, StructureRecordMixin) and key in state_dict:
            record = upgrade_record(decode_record(state_dict[key], f"state dict key {key!r}"))
            if not (isinstance(record, dict) and records_equal(record, module.structure_record())):
                problems.append(
                    f"{key!r}: {short_repr(record)} is not the structure record of the {type(module).__name__} "
                    f"there ({module.structure_record()})"
                )
    if strict:
        problems.extend(f"{key!r}: missing from the state dict" for key in expected if key not in state_dict)
    if not problems:  # values are checked once every tensor is where it belongs, with its shape
        for path, module in after.items():
            if isinstance(module, StructureRecordMixin):
                try:
                    module.check_state(state_dict, f"{path}." if path else "")
                except ValueError as err:
                    problems.append(str(err))
    if problems:
        raise ValueError("state dict does not fit the model; nothing was changed:\n  " + "\n  ".join(problems))


def _tensor_problems(key: str, value: Any, expected: Tensor, swapped: dict[str, nn.Module]) -> list[str]:
    """What is wrong with ``value`` where the restructured model has the tensor ``expected`` (nothing: ``[]``)."""
    if not isinstance(value, Tensor):
        return [f"{key!r}: expected a tensor of shape {tuple(expected.shape)}, got {type(value).__name__}"]
    if value.is_meta:
        return [f"{key!r}: a tensor on the meta device holds no values to load"]
    if value.shape == expected.shape:
        return []
    problem = f"{key!r}: shape {tuple(value.shape)} does not match the model's {tuple(expected.shape)}"
    owner = _under(key, set(swapped))
    new = swapped.get(owner) if owner is not None else None
    if isinstance(new, StructureRecordMixin):
        problem += f", as the {type(new).__name__} record {_join(owner, _EXTRA)!r} describes it ({new.config()})"
    return [problem]


def restructure(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> list[Restructured]:
    """Make ``model``'s structure match ``state_dict`` so that ``model.load_state_dict(state_dict)`` works.

    Builds cheap modules (Ghost, structured) where the state dict holds their records, and plain
    ``nn.Conv2d``/``nn.Linear`` where the model has a cheap module but the state dict dense
    weights. New modules land on the device and dtype of those they replace; shared modules stay
    shared; parameter order is kept (optimizer state restores by position).

    Nothing changes before the whole state dict is checked: every record completely, by the module
    constructors' own rules (known kind and version, no unknown or missing field, every value typed
    and in range); its sizes against the model's module there (channels, features, kernel size and
    groups) and against the state dict's tensors under it (no tensor is allocated from a record's
    sizes before this); a Ghost ``output_index`` as distinct indices in range; every tensor's shape;
    and, when ``strict``, missing and unexpected keys. On any problem a ``ValueError`` names each key
    (and field, value and valid range) and the model is left as it was. Only with ``strict=False`` (as
    under :func:`install_restructure_hook`) is a tensor that the state dict lacks built at the size its
    record gives, there being nothing to check it against.

    Returns:
        The rebuilt modules (empty when the structure already matched).
    """
    plan = _plan(model, state_dict)
    _check_loadable(model, plan, state_dict, strict)
    built = {path: _materialized(planned, model.get_submodule(path)) for path, planned in plan.items()}
    changes = [
        Restructured(path, type(model.get_submodule(path)).__name__, type(new).__name__) for path, new in built.items()
    ]
    if built:
        replace_modules(model, built)
    return changes


def _restructure_hook(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
) -> None:  # module level, so that a model holding it pickles (torch.save(model))
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    restructure(module, own, strict=False)


def install_restructure_hook(model: nn.Module) -> RemovableHandle | None:
    """Make ``model.load_state_dict`` call :func:`restructure` first (a load-state-dict pre-hook).

    This is how Lightning resumes a run whose architecture changed mid-fit: the model's weights
    load before any callback state, so the structure must follow the checkpoint by itself.
    Installing twice is a no-op (returns ``None``) while the first hook is in place. The hook runs
    :func:`restructure` with ``strict=False``: the whole state dict under the module's prefix is
    checked (records, sizes, shapes, values) before a tensor is copied or a module changed, and a
    problem raises ``ValueError`` with the model as it was. Missing and unexpected keys outside the
    modules that records describe are left to ``load_state_dict`` and its own ``strict`` (PyTorch
    hands pre-hooks ``strict=True`` whatever the caller asked), which reports them only after copying
    the rest, as it does for any model.
    """
    installed = getattr(model, _HOOK_FLAG, None)
    if installed is not None and installed in model._load_state_dict_pre_hooks:
        return None
    handle = model.register_load_state_dict_pre_hook(_restructure_hook)
    object.__setattr__(model, _HOOK_FLAG, handle.id)
    return handle
