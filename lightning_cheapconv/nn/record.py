"""Structure records: every cheap module describes itself in its state dict (``_extra_state``).

A record is a dict of primitives (so checkpoints load with ``weights_only=True``) holding the
module's ``kind``, a ``version`` and its full configuration: exactly its constructor's arguments
but ``device`` and ``dtype``. :func:`lightning_cheapconv.restructure` reads records from a state
dict and rebuilds the modules they describe with :func:`build_from_record`, which checks a record
completely (by the constructors' own rules, below) before it builds anything.
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = [
    "StructureRecordMixin",
    "register_kind",
    "build_from_record",
    "registered_kinds",
    "conv_config",
    "check_positive_ints",
    "check_bools",
    "check_pair",
    "check_conv_args",
    "PADDING_MODES",
    "short_repr",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PADDING_STRINGS = ("same", "valid")
_MAX_SIZE = torch.iinfo(torch.int64).max  # no tensor dimension, stride or padding is larger
_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxstring = _REPR.maxother = 60


def short_repr(value: Any) -> str:
    """``repr`` for error messages, cut short: values come from checkpoints too, and a list of a million entries
    is shown as its first few."""
    return _REPR.repr(value)


_KINDS: dict[str, type[StructureRecordMixin]] = {}


def register_kind(cls: type[StructureRecordMixin]) -> type[StructureRecordMixin]:
    """Class decorator: make ``cls`` rebuildable from its record by :func:`build_from_record`."""
    _KINDS[cls.__name__] = cls
    return cls


def registered_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_ints(owner: str, **values: Any) -> None:
    """Raise ``ValueError`` naming ``owner`` and the argument unless every value is an int in ``1..2**63 - 1``
    (bools refused)."""
    for name, value in values.items():
        if not _is_int(value) or not 1 <= value <= _MAX_SIZE:
            raise ValueError(
                f"{owner}: {name} must be a positive int (valid range: 1..{_MAX_SIZE}), got {short_repr(value)}"
            )


def check_bools(owner: str, **values: Any) -> None:
    """Raise ``ValueError`` naming ``owner`` and the argument unless every value is ``True`` or ``False``."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be True or False, got {short_repr(value)}")


def check_pair(owner: str, name: str, value: Any, minimum: int = 1) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair (tuple or list) of ints, each in ``minimum..2**63 - 1``; bools refused.

    Raises:
        ValueError: naming ``owner``, ``name``, the value and the valid range.
    """
    pair = (value, value) if _is_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) for v in pair)):
        raise ValueError(f"{owner}: {name} must be an int or a pair of ints, got {short_repr(value)}")
    if min(pair) < minimum:
        raise ValueError(f"{owner}: {name}={short_repr(value)} is out of range; each value must be >= {minimum}")
    if max(pair) > _MAX_SIZE:
        raise ValueError(f"{owner}: {name}={short_repr(value)} is out of range; each value must be <= {_MAX_SIZE}")
    return (pair[0], pair[1])


def check_conv_args(
    owner: str,
    in_channels: Any,
    out_channels: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
    bias: Any,
    padding_mode: Any,
) -> tuple[tuple[int, int], tuple[int, int], str | tuple[int, int], tuple[int, int]]:
    """Check ``nn.Conv2d``'s constructor arguments by the rules its forward relies on (``nn.Conv2d`` itself
    accepts a stride of 0 or a negative padding and fails only when called).

    Channels and groups are positive ints and ``groups`` divides both channel counts; kernel size, stride
    and dilation are positive ints or pairs of them; padding is ``'same'`` (stride 1 only), ``'valid'``, or
    a non-negative int or pair; ``bias`` is a bool; ``padding_mode`` one of :data:`PADDING_MODES`.

    Returns:
        ``(kernel_size, stride, padding, dilation)`` with pairs as tuples (a padding string stays a string).

    Raises:
        ValueError: naming ``owner``, the argument, its value and the valid range.
    """
    check_positive_ints(owner, in_channels=in_channels, out_channels=out_channels, groups=groups)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{owner}: in_channels={in_channels} and out_channels={out_channels} "
            f"must both be divisible by groups={groups}"
        )
    kernel = check_pair(owner, "kernel_size", kernel_size)
    strides = check_pair(owner, "stride", stride)
    dilations = check_pair(owner, "dilation", dilation)
    if isinstance(padding, str):
        if padding not in _PADDING_STRINGS:
            raise ValueError(f"{owner}: padding={short_repr(padding)}; valid strings are {_PADDING_STRINGS}")
        if padding == "same" and strides != (1, 1):
            raise ValueError(f"{owner}: padding='same' needs stride 1, as for nn.Conv2d")
        pads: str | tuple[int, int] = padding
    else:
        pads = check_pair(owner, "padding", padding, minimum=0)
    check_bools(owner, bias=bias)
    if not any(padding_mode == mode for mode in PADDING_MODES):
        raise ValueError(f"{owner}: padding_mode={short_repr(padding_mode)}; valid modes are {PADDING_MODES}")
    return kernel, strides, pads, dilations


def conv_config(conv: nn.Module) -> dict[str, Any]:
    """The ``nn.Conv2d`` constructor arguments of a conv-like module (a conv, or a cheap layer that replaced one)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _normalize(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value


def records_equal(a: dict, b: dict) -> bool:
    """Equality that treats tuples and lists alike (serializers may turn one into the other)."""
    return _normalize(a) == _normalize(b)


def _check_version(cls: type[StructureRecordMixin], version: Any) -> None:
    if _is_int(version) and version > cls.record_version:
        raise ValueError(
            f"record version {version} is newer than this library's ({cls.record_version}); upgrade lightning-cheapconv"
        )
    if not _is_int(version) or version < 1:
        raise ValueError(f"version={short_repr(version)} is out of range; valid range is 1..{cls.record_version}")


def _check_fields(cls: type[StructureRecordMixin], record: dict) -> None:
    fields = cls.record_fields()
    unknown = [key for key in record if key not in ("kind", "version") and key not in fields]
    missing = [field for field in fields if field not in record]
    if unknown or missing:
        problems = [f"unknown field(s) {short_repr(unknown)}"] if unknown else []
        problems += [f"missing field(s) {missing}"] if missing else []
        raise ValueError(f"{'; '.join(problems)}; a {cls.__name__} record holds kind, version and {list(fields)}")


def build_from_record(record: Any, where: str = "module", device: torch.device | str | None = None) -> nn.Module:
    """Build a module from its structure record, checking the record completely before building it.

    Args:
        record: a dict as ``get_extra_state()`` returns it: ``kind``, ``version`` and every constructor
            argument of that kind but ``device`` and ``dtype`` (tuples may be lists).
        where: names the record in error messages (a module path or a state-dict key).
        device: where to build the module (default: the current default device). ``"meta"`` checks a
            record and gives the module's parameter shapes without allocating anything the record sizes.

    Returns:
        The module, initialized as its constructor initializes it.

    Raises:
        ValueError: naming ``where``, the field, its value and the valid range, if the record is not a dict
            with a known ``kind``, its ``version`` is not in ``1..`` the kind's current version, a field is
            unknown or missing, the constructor refuses a value, or the module built records another value
            than the record holds (a value not in its canonical form, e.g. ``kernel_size=3`` for ``(3, 3)``,
            which the module's ``set_extra_state`` would then refuse).
    """
    if not isinstance(record, dict) or "kind" not in record:
        raise ValueError(f"{where}: expected a structure record (a dict with 'kind'), got {short_repr(record)}")
    kind = record["kind"]
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{where}: unknown structure kind {short_repr(kind)}; known kinds are {registered_kinds()}")
    try:
        _check_version(cls, record.get("version"))
        _check_fields(cls, record)
        with torch.device(device) if device is not None else nullcontext():
            module = cls.from_record(record)
        built = module.structure_record()
        for field in cls.record_fields():
            if _normalize(record[field]) != _normalize(built[field]):
                raise ValueError(
                    f"{field}={short_repr(record[field])} is not the canonical form of what it builds, "
                    f"which records {field}={short_repr(built[field])}"
                )
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        # Constructors name themselves ("GhostConv2d: ..."); torch's own errors may carry a C++ trace.
        detail = str(err).splitlines()[0].removeprefix(f"{kind}: ") if str(err) else type(err).__name__
        raise ValueError(f"{where}: cannot rebuild {kind}: {detail}") from err
    return module


def _module_class(field: str, name: Any) -> type[nn.Module]:
    """The ``torch.nn`` module class that a record's ``*_layer`` field names."""
    found = getattr(nn, name, None) if isinstance(name, str) and name.isidentifier() and name[0] != "_" else None
    if not (isinstance(found, type) and issubclass(found, nn.Module) and not issubclass(found, LazyModuleMixin)):
        raise ValueError(
            f"{field}={short_repr(name)} is not valid; valid values are None and the names of torch.nn module "
            "classes (e.g. 'BatchNorm2d', 'ReLU')"
        )
    return found


class StructureRecordMixin:
    """Adds ``get_extra_state``/``set_extra_state`` that save and check the module's structure record.

    Subclasses implement :meth:`config` (constructor keyword arguments but ``device``/``dtype``,
    primitives only) and may override :meth:`from_record` and :meth:`check_state`.
    """

    record_version = 1

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def structure_record(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "version": self.record_version, **self.config()}

    @classmethod
    def record_fields(cls) -> tuple[str, ...]:
        """The fields of this kind's records besides ``kind`` and ``version``: its constructor's arguments but
        ``device`` and ``dtype``, all of them required."""
        skip = ("self", "device", "dtype")
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name not in skip)

    @classmethod
    def from_record(cls, record: dict) -> nn.Module:
        """Build the module from its record: lists become tuples, ``*_layer`` names become ``torch.nn`` classes.

        Raises:
            ValueError: if a ``*_layer`` field names no ``torch.nn`` module class, or the constructor refuses a value.
        """
        kwargs = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in record.items() if k not in ("kind", "version")
        }
        for key, value in kwargs.items():
            if key.endswith("_layer") and value is not None:
                kwargs[key] = _module_class(key, value)
        return cls(**kwargs)

    def check_state(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Raise ``ValueError`` naming the key if a value this module would load from ``state_dict`` (its keys
        start with ``prefix``) is invalid beyond its shape. Shapes and keys are :func:`restructure`'s to check;
        the base class has no further rule."""

    def get_extra_state(self) -> dict[str, Any]:
        return self.structure_record()

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not records_equal(state, self.structure_record()):
            raise ValueError(
                f"structure record {short_repr(state)} does not match this {type(self).__name__} "
                f"({self.structure_record()!r}); call lightning_cheapconv.restructure(model, state_dict) before loading"
            )
