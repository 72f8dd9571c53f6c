"""The one seam to Lightning: every Lightning name the package uses is imported here, and nowhere else.

Lightning ships the same code under two module trees, ``pytorch_lightning`` (the ``pytorch-lightning``
package) and ``lightning.pytorch`` (the ``lightning`` package). Their ``Callback``, ``LightningModule``,
``LightningDataModule``, ``Trainer`` and strategy classes are distinct types: a Trainer of one tree refuses
a LightningModule of the other, ``LightningCLI`` refuses the other tree's callback classes, and an
``isinstance`` check against one tree's ``DDPStrategy`` is false for the other's. So the bases defined
here derive from the classes of *every* installed tree, and the strategy checks test against the classes
of every installed tree: one implementation, accepted by whichever Trainer runs it.

Both trees hold the same state in the same attributes (``rank_zero_only`` itself is shared through
``lightning_utilities``), so a class with both bases behaves as either. Supported: Lightning 2.6 under either
name, one or both installed.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

__all__ = [
    "NAMESPACES",
    "Callback",
    "LightningModule",
    "LightningDataModule",
    "MisconfigurationException",
    "rank_zero_info",
    "rank_zero_warn",
    "is_ddp",
    "is_model_pruning",
    "is_weight_averaging",
    "is_single_device",
    "is_sharded",
    "is_spawn_launcher",
]

NAMESPACES: tuple[str, ...] = ("pytorch_lightning", "lightning.pytorch")
_FABRIC: dict[str, str] = {"pytorch_lightning": "lightning_fabric", "lightning.pytorch": "lightning.fabric"}


def _installed() -> dict[str, ModuleType]:
    found = {}
    for name in NAMESPACES:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            continue
    if not found:
        raise ImportError(
            "lightning-cheapconv needs Lightning 2.6: `pip install pytorch-lightning` or `pip install lightning`"
        )
    return found


_PACKAGES = _installed()


def _each(path: str, fabric: bool = False) -> tuple[Any, ...]:
    """``path`` (``"strategies.DDPStrategy"``) looked up in every installed tree (its Fabric with ``fabric``)."""
    found = []
    for name in _PACKAGES:
        module_name, _, attr = f"{_FABRIC[name] if fabric else name}.{path}".rpartition(".")
        found.append(getattr(importlib.import_module(module_name), attr))
    return tuple(found)


def _tree_of(trainer: object) -> str | None:
    """The tree (``"pytorch_lightning"``/``"lightning.pytorch"``) whose ``Trainer`` ``trainer`` is."""
    return next((name for name, package in _PACKAGES.items() if isinstance(trainer, package.Trainer)), None)


def _tree_classes(root: type) -> list[type]:
    return [k for k in root.__mro__ if not k.__module__.startswith(("torch.", "builtins"))]


_LIGHTNING_CLASSES = {
    k for path in ("LightningModule", "LightningDataModule") for root in _each(path) for k in _tree_classes(root)
}


@functools.cache
def _bound(cls: type, tree: str, root: str) -> type:
    """``cls`` with the Lightning methods it inherits taken from ``tree``.

    Lightning decides which hooks a module defines with ``is_overridden``, comparing the code of the
    instance's method with its own tree's base class. A class with both trees as bases inherits the first
    tree's methods, which the other tree would take for overrides (and then refuse, e.g. "Both
    configure_model and configure_sharded_model are overridden"). The bound subclass re-exports the
    inherited methods of ``tree``, so either tree sees exactly its own defaults; what ``cls`` defines
    itself is untouched, and instances stay ``isinstance(obj, cls)``.
    """
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_unbound": cls}
    for klass in reversed(_tree_classes(getattr(_PACKAGES[tree], root))):
        for name, value in vars(klass).items():
            if name.startswith("__"):
                continue
            owner = next(k for k in cls.__mro__ if name in vars(k))
            if owner in _LIGHTNING_CLASSES:
                namespace[name] = value
    return type(cls.__name__, (cls,), namespace)


def _bind(obj: Any, trainer: object, root: str) -> None:
    """Make ``obj``'s class the one bound to ``trainer``'s tree (a no-op outside a Trainer)."""
    tree = _tree_of(trainer)
    if tree is None:
        return
    unbound = getattr(type(obj), "_unbound", type(obj))
    obj.__class__ = unbound if tree == next(iter(_PACKAGES)) else _bound(unbound, tree, root)


def _new(cls: type, *args: Any) -> Any:
    return cls.__new__(cls, *args)


def _reduce_unbound(obj: Any, protocol: int) -> Any:
    """Pickle a bound instance as its unbound class (the one importable by name)."""
    reduced = object.__reduce_ex__(obj, protocol)
    unbound = getattr(type(obj), "_unbound", None)
    if unbound is None or not isinstance(reduced, tuple) or not reduced[1] or reduced[1][0] is not type(obj):
        return reduced
    return (_new, (unbound, *reduced[1][1:]), *reduced[2:])


if TYPE_CHECKING:  # type checkers see one tree; at run time the classes below derive from every installed one
    from pytorch_lightning import Callback, LightningDataModule, LightningModule
    from pytorch_lightning import Trainer as Trainer
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
else:
    Trainer = next(iter(_PACKAGES.values())).Trainer  # for annotations only; never instantiated here

    class Callback(*_each("callbacks.Callback")):
        """A Lightning ``Callback`` of every installed Lightning tree (Lightning checks callbacks by
        ``isinstance`` only, and only ``state_dict`` by ``is_overridden``: one class serves both)."""

    _MODULE_BASES = _each("LightningModule")

    class LightningModule(*_MODULE_BASES):
        """A ``LightningModule`` of every installed Lightning tree. When a Trainer attaches itself
        (``module.trainer = trainer``), the instance takes the class bound to that Trainer's tree
        (:func:`_bound`), so the Trainer sees its own defaults."""

        @property
        def trainer(self) -> Any:
            return _MODULE_BASES[0].trainer.fget(self)

        @trainer.setter
        def trainer(self, trainer: Any) -> None:
            _bind(self, trainer, "LightningModule")
            _MODULE_BASES[0].trainer.fset(self, trainer)

        def __reduce_ex__(self, protocol: int) -> Any:
            return _reduce_unbound(self, protocol)

    class LightningDataModule(*_each("LightningDataModule")):
        """A ``LightningDataModule`` of every installed Lightning tree, bound to the attaching Trainer's
        tree like :class:`LightningModule`."""

        @property
        def trainer(self) -> Any:
            return self.__dict__.get("_trainer")

        @trainer.setter
        def trainer(self, trainer: Any) -> None:
            _bind(self, trainer, "LightningDataModule")
            self.__dict__["_trainer"] = trainer

        def __reduce_ex__(self, protocol: int) -> Any:
            return _reduce_unbound(self, protocol)

    class MisconfigurationException(*_each("utilities.exceptions.MisconfigurationException", fabric=True)):
        """Lightning's ``MisconfigurationException`` of every installed tree: ``except`` catches it by either name."""


_rank_zero = importlib.import_module(f"{next(iter(_PACKAGES))}.utilities.rank_zero")
rank_zero_info, rank_zero_warn = _rank_zero.rank_zero_info, _rank_zero.rank_zero_warn

_DDP = _each("strategies.DDPStrategy")
_SINGLE_DEVICE = _each("strategies.SingleDeviceStrategy")
_DEEPSPEED = _each("strategies.DeepSpeedStrategy")
_SPAWN = _each("strategies.launchers.multiprocessing._MultiProcessingLauncher")


_PRUNING = _each("callbacks.ModelPruning")
_AVERAGING = _each("callbacks.StochasticWeightAveraging") + _each("callbacks.WeightAveraging")


def is_model_pruning(callback: object) -> bool:
    """Lightning's ``ModelPruning`` (any tree)."""
    return isinstance(callback, _PRUNING)


def is_weight_averaging(callback: object) -> bool:
    """Lightning's ``StochasticWeightAveraging``, ``WeightAveraging`` or ``EMAWeightAveraging`` (any tree)."""
    return isinstance(callback, _AVERAGING)


def is_ddp(strategy: object) -> bool:
    """``strategy`` is a ``DDPStrategy`` of any tree (DeepSpeed, which subclasses it but shards, excluded)."""
    return isinstance(strategy, _DDP) and not isinstance(strategy, _DEEPSPEED)


def is_single_device(strategy: object) -> bool:
    return isinstance(strategy, _SINGLE_DEVICE)


def is_sharded(strategy: object) -> bool:
    """Neither single-device nor plain DDP: FSDP, DeepSpeed, model parallel and unknown strategies."""
    return not (is_single_device(strategy) or is_ddp(strategy))


def is_spawn_launcher(launcher: object) -> bool:
    """A spawn/fork launcher (``ddp_spawn``, ``ddp_notebook``): fit runs in workers that lose module changes."""
    return isinstance(launcher, _SPAWN)
