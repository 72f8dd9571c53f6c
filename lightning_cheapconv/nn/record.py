"""Structure records: every cheap module describes itself in its state dict (``_extra_state``).

A record is a dict of primitives (so checkpoints load with ``weights_only=True``) holding the
module's ``kind``, a ``version`` and its full configuration. :func:`lightning_cheapconv.restructure`
reads records from a state dict and rebuilds the modules they describe with :func:`build_from_record`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "StructureRecordMixin",
    "register_kind",
    "build_from_record",
    "registered_kinds",
    "conv_config",
    "check_positive_ints",
]

_KINDS: dict[str, type[StructureRecordMixin]] = {}


def register_kind(cls: type[StructureRecordMixin]) -> type[StructureRecordMixin]:
    """Class decorator: make ``cls`` rebuildable from its record by :func:`build_from_record`."""
    _KINDS[cls.__name__] = cls
    return cls


def registered_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def check_positive_ints(owner: str, **values: Any) -> None:
    """Raise ``ValueError`` naming ``owner`` and the argument unless every value is an int >= 1 (bools refused)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


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


def build_from_record(record: dict, where: str = "module") -> nn.Module:
    """Build an (uninitialized) module from its structure record.

    Raises:
        ValueError: if the record is not a dict, names an unknown kind, or a newer version.
    """
    if not isinstance(record, dict) or "kind" not in record:
        raise ValueError(f"{where}: expected a structure record (a dict with 'kind'), got {record!r}")
    kind = record["kind"]
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"{where}: unknown structure kind {kind!r}; known kinds are {registered_kinds()}")
    if record.get("version", 0) > cls.record_version:
        raise ValueError(
            f"{where}: {kind} record version {record.get('version')} is newer than this library's "
            f"({cls.record_version}); upgrade lightning-cheapconv"
        )
    return cls.from_record(record)


class StructureRecordMixin:
    """Adds ``get_extra_state``/``set_extra_state`` that save and check the module's structure record.

    Subclasses implement :meth:`config` (constructor keyword arguments, primitives only) and may
    override :meth:`from_record`.
    """

    record_version = 1

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def structure_record(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "version": self.record_version, **self.config()}

    @classmethod
    def from_record(cls, record: dict) -> nn.Module:
        """Build the module from its record: lists become tuples, ``*_layer`` names become ``torch.nn`` classes."""
        kwargs = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in record.items() if k not in ("kind", "version")
        }
        for key, value in kwargs.items():
            if key.endswith("_layer") and isinstance(value, str):
                kwargs[key] = getattr(nn, value)
        return cls(**kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return self.structure_record()

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not records_equal(state, self.structure_record()):
            raise ValueError(
                f"structure record {state!r} does not match this {type(self).__name__} "
                f"({self.structure_record()!r}); call lightning_cheapconv.restructure(model, state_dict) before loading"
            )
