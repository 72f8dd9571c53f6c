"""Structure records: every cheap module describes itself in its state dict (``_extra_state``).

A record is a dict of primitives holding the module's ``kind``, a ``version`` and its full
configuration: exactly its constructor's arguments but ``device`` and ``dtype``.
:func:`lightning_cheapconv.restructure` reads records from a state dict and rebuilds the modules
they describe with :func:`build_from_record`, which checks a record completely (by the
constructors' own rules, below) before it builds anything.

In a state dict a record is stored as a tensor (:func:`encode_record`: a ``uint8`` tensor holding a
fixed prefix and the record as JSON), so that exporters which treat every state-dict entry as a
tensor (``torch.onnx.export(..., dynamo=False)``, ``torch.jit``) run, and checkpoints still load with
``weights_only=True``. Records stored as dicts (lightning-cheapconv 0.1 checkpoints) load as well.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..validation import check_bool, check_choice, check_int, check_int_pair, is_int, short_repr

__all__ = [
    "StructureRecordMixin",
    "register_kind",
    "build_from_record",
    "encode_record",
    "decode_record",
    "is_encoded_record",
    "upgrade_record",
    "registered_kinds",
    "kind_class",
    "conv_config",
    "check_positive_ints",
    "check_conv_args",
    "check_conv_sides",
    "ConvArgs",
    "MAX_SIZE",
    "PADDING_MODES",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PADDING_STRINGS = ("same", "valid")
MAX_SIZE = torch.iinfo(torch.int64).max  # no tensor dimension, stride or padding is larger

_KINDS: dict[str, type[StructureRecordMixin]] = {}

RECORD_PREFIX = b"lightning-cheapconv structure record\n"
MAX_RECORD_BYTES = 1 << 16  # a record is a few hundred bytes; nothing larger is decoded


def encode_record(record: dict[str, Any]) -> Tensor:
    """A structure record as a state-dict tensor: ``uint8``, shape ``(len,)``, :data:`RECORD_PREFIX` + JSON.

    Example::

        >>> t = encode_record({"kind": "FoldedBatchNorm", "version": 1, "num_features": 8})
        >>> t.dtype, decode_record(t)["num_features"]
        (torch.uint8, 8)
    """
    data = RECORD_PREFIX + json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_encoded_record(value: Any) -> bool:
    """Whether a state-dict value is a record written by :func:`encode_record` (a ``uint8`` vector with its prefix)."""
    if not (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1 and not value.is_meta):
        return False
    head = value[: len(RECORD_PREFIX)]
    return bytes(head.cpu().tolist()) == RECORD_PREFIX


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid record value")


def decode_record(value: Any, where: str = "record") -> Any:
    """The record a state-dict value holds: a tensor from :func:`encode_record` is decoded, anything else
    (a dict from a 0.1 checkpoint, or what a module of another library stores) is returned as it is.

    Raises:
        ValueError: naming ``where``, if the tensor carries the record prefix but is longer than
            :data:`MAX_RECORD_BYTES` or does not hold a JSON object.
    """
    if not is_encoded_record(value):
        return value
    if value.numel() > MAX_RECORD_BYTES:
        raise ValueError(
            f"{where}: a structure record of {value.numel()} bytes; records are at most {MAX_RECORD_BYTES}"
        )
    text = bytes(value.cpu().tolist())[len(RECORD_PREFIX) :]
    try:
        record = json.loads(text.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{where}: the structure record is not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a structure record (a JSON object), got {short_repr(record)}")
    return record


def upgrade_record(record: Any) -> Any:
    """A record of an older ``version`` of a known kind, with the fields added since filled in with the values
    that version meant (the kind's ``record_defaults``) and the current version; anything else unchanged
    (:func:`build_from_record` reports what is wrong with it)."""
    if not isinstance(record, dict):
        return record
    cls = _KINDS.get(record.get("kind")) if isinstance(record.get("kind"), str) else None
    version = record.get("version")
    if cls is None or not is_int(version) or not 1 <= version < cls.record_version:
        return record
    added = {k: v for k, v in cls.record_defaults.items() if k not in record}
    return {**record, **added, "version": cls.record_version}


def register_kind(cls: type[StructureRecordMixin]) -> type[StructureRecordMixin]:
    """Class decorator: make ``cls`` rebuildable from its record by :func:`build_from_record`."""
    _KINDS[cls.__name__] = cls
    return cls


def registered_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def kind_class(kind: Any) -> type[StructureRecordMixin] | None:
    """The registered class of a record's ``kind`` (``None`` for a kind this library does not know)."""
    return _KINDS.get(kind) if isinstance(kind, str) else None


def check_positive_ints(owner: str, **values: Any) -> tuple[int, ...]:
    """Sizes of a module (channels, features, groups), each an int in ``1..MAX_SIZE`` (bools refused), as plain
    ``int`` (a record holds primitives only, so ``numpy.int64(4)`` is stored as ``4``), in the order given.

    Raises:
        ValueError: naming ``owner``, the argument, its value and the valid range
            (:func:`~lightning_cheapconv.validation.check_int`).
    """
    return tuple(check_int(name, value, 1, MAX_SIZE, owner=owner) for name, value in values.items())


class ConvArgs(NamedTuple):
    """``nn.Conv2d``'s (``nn.Conv1d``'s, ``nn.Conv3d``'s) constructor arguments, checked and normalized by
    :func:`check_conv_args`: sides are tuples of one entry per spatial dimension."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str


_SIDES = {1: "a tuple of 1 int", 3: "a tuple of 3 ints"}


def check_conv_sides(name: str, value: Any, minimum: int, dims: int, owner: str) -> tuple[int, ...]:
    """One int per spatial dimension from an int or a tuple of ``dims`` ints, each in ``minimum..MAX_SIZE``: for
    ``dims=2`` exactly :func:`~lightning_cheapconv.validation.check_int_pair` (its messages).

    Raises:
        ValueError: naming ``owner``, ``name``, the value and the valid range.

    Example::

        >>> check_conv_sides("kernel_size", 3, 1, 3, "layer")
        (3, 3, 3)
    """
    if dims == 2:
        return check_int_pair(name, value, minimum, MAX_SIZE, owner=owner)
    sides = (value,) * dims if is_int(value) else value
    valid = isinstance(sides, (tuple, list)) and len(sides) == dims
    if not (valid and all(is_int(v) and minimum <= v <= MAX_SIZE for v in sides)):
        raise ValueError(
            f"{owner}: {name}={short_repr(value)} is out of range; each side must be in {minimum}..{MAX_SIZE} "
            f"(an int, or {_SIDES[dims]})"
        )
    return tuple(int(v) for v in sides)


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
    dims: int = 2,
) -> ConvArgs:
    """Check ``nn.Conv2d``'s constructor arguments by the rules its forward relies on (``nn.Conv2d`` itself
    accepts a stride of 0 or a negative padding and fails only when called); with ``dims=1`` or ``dims=3``,
    ``nn.Conv1d``'s or ``nn.Conv3d``'s.

    Channels and groups are positive ints and ``groups`` divides both channel counts; kernel size, stride
    and dilation are positive ints or pairs of them (tuples of ``dims`` ints); padding is ``'same'`` (stride 1
    only), ``'valid'``, or a non-negative int or pair (tuple); ``bias`` is a bool; ``padding_mode`` one of
    :data:`PADDING_MODES`. Sizes are at most :data:`MAX_SIZE`.

    Returns:
        The arguments in ``nn.Conv2d``'s order, sizes as plain ints and pairs as tuples (a padding string stays
        a string), so ``nn.Conv2d(*check_conv_args(...))`` builds the conv (``nn.Conv1d``/``nn.Conv3d`` with
        ``dims``).

    Raises:
        ValueError: naming ``owner``, the argument, its value and the valid range.

    Example::

        >>> check_conv_args("layer", 4, 8, 3, 1, "same", 1, 1, True, "zeros", dims=3).kernel_size
        (3, 3, 3)
    """
    in_channels, out_channels, groups = check_positive_ints(
        owner, in_channels=in_channels, out_channels=out_channels, groups=groups
    )
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{owner}: in_channels={in_channels} and out_channels={out_channels} "
            f"must both be divisible by groups={groups}"
        )
    kernel = check_conv_sides("kernel_size", kernel_size, 1, dims, owner)
    strides = check_conv_sides("stride", stride, 1, dims, owner)
    dilations = check_conv_sides("dilation", dilation, 1, dims, owner)
    if isinstance(padding, str):
        pads: str | tuple[int, ...] = check_choice("padding", padding, _PADDING_STRINGS, owner=owner)
        if padding == "same" and strides != (1,) * dims:
            raise ValueError(f"{owner}: padding='same' needs stride 1, as for nn.Conv{dims}d")
    else:
        pads = check_conv_sides("padding", padding, 0, dims, owner)
    check_bool("bias", bias, owner=owner)
    check_choice("padding_mode", padding_mode, PADDING_MODES, owner=owner)
    return ConvArgs(in_channels, out_channels, kernel, strides, pads, dilations, groups, bias, padding_mode)


def conv_config(conv: nn.Module) -> dict[str, Any]:
    """The ``nn.Conv2d`` (``Conv1d``, ``Conv3d``) constructor arguments of a conv-like module (a conv, or a cheap
    layer that replaced one)."""
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
    if is_int(version) and version > cls.record_version:
        raise ValueError(
            f"record version {version} is newer than this library's ({cls.record_version}); upgrade lightning-cheapconv"
        )
    check_int("version", version, 1, cls.record_version)


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
    record = upgrade_record(record)
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
    record_defaults: ClassVar[dict[str, Any]] = {}
    """Fields added after version 1, and the value a record of an older version means for each."""
    record_adopted: ClassVar[tuple[str, ...]] = ()
    """Fields that choose how the module computes, not what: loading a record that differs in them only sets them
    (through :meth:`adopt`), where any other difference needs :func:`~lightning_cheapconv.restructure`."""

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

    def adopt(self, field: str, value: Any) -> None:
        """Set one of :attr:`record_adopted` from a loaded record (raising ``ValueError`` for a value it refuses)."""
        raise NotImplementedError

    def get_extra_state(self) -> Tensor:
        return encode_record(self.structure_record())

    def set_extra_state(self, state: Any) -> None:
        state = upgrade_record(decode_record(state, f"{type(self).__name__} structure record"))
        adopted = {k: state[k] for k in self.record_adopted if isinstance(state, dict) and k in state}
        if adopted and records_equal({**state, **adopted}, {**self.structure_record(), **adopted}):
            for field, value in adopted.items():
                self.adopt(field, value)
            return
        if not isinstance(state, dict) or not records_equal(state, self.structure_record()):
            raise ValueError(
                f"structure record {short_repr(state)} does not match this {type(self).__name__} "
                f"({self.structure_record()!r}); call lightning_cheapconv.restructure(model, state_dict) before loading"
            )
