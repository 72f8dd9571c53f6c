"""The papers' models: CIFAR ResNet-20/32/44/56/110 and VGG-16 (the GhostNet and Structured
Convolutions CIFAR-10 baselines) and GhostNet 0.5x/1.0x/1.3x, plus :func:`get_model`, which also
builds any torchvision model by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from .cifar_resnet import BasicBlock, CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .cifar_vgg import VGG16_CFG, CifarVGG, vgg16
from .ghostnet import GHOSTNET_CFGS, GhostNet, ghostnet_050, ghostnet_100, ghostnet_130

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "GHOSTNET_CFGS",
    "GhostNet",
    "VGG16_CFG",
    "get_model",
    "ghostnet_050",
    "ghostnet_100",
    "ghostnet_130",
    "list_models",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg16",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16": vgg16,
    "ghostnet_050": ghostnet_050,
    "ghostnet_100": ghostnet_100,
    "ghostnet_130": ghostnet_130,
}

_TORCHVISION_PREFIX = "torchvision."


def list_models(include_torchvision: bool = False) -> list[str]:
    """Names :func:`get_model` accepts: this library's models, and optionally torchvision's
    (prefixed ``torchvision.`` where the plain name is one of ours, e.g. ``torchvision.vgg16``)."""
    names = sorted(_MODELS)
    if include_torchvision:
        names += [name if name not in _MODELS else _TORCHVISION_PREFIX + name for name in _torchvision_names()]
    return names


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models())


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a randomly initialized model by name.

    Our names (``resnet20`` .. ``resnet110``, ``vgg16``, ``ghostnet_050/100/130``; see
    :func:`list_models`) come first: ``vgg16`` is the CIFAR VGG-16 here. Any other torchvision
    model name is built with ``torchvision.models.get_model(name, weights=None,
    num_classes=num_classes, **kwargs)``; prefix ``torchvision.`` to get torchvision's model where
    the names clash (``torchvision.vgg16``).

    Example::

        >>> model = get_model("resnet56", num_classes=10)
        >>> tv = get_model("resnet18", num_classes=10)  # torchvision's ImageNet ResNet-18

    Raises:
        ValueError: if the name is neither ours nor torchvision's.
    """
    if not isinstance(name, str):
        raise ValueError(f"get_model: name must be a str, got {name!r}")
    key = name.lower()
    if key in _MODELS:
        return _MODELS[key](num_classes=num_classes, **kwargs)
    tv_name = key[len(_TORCHVISION_PREFIX) :] if key.startswith(_TORCHVISION_PREFIX) else key
    tv_names = _torchvision_names()
    if tv_name in tv_names:
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    close = difflib.get_close_matches(key, list(_MODELS) + tv_names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"get_model: unknown model {name!r}. Valid names are {', '.join(sorted(_MODELS))}, or any torchvision "
        f"model name (see lightning_cheapconv.models.list_models(include_torchvision=True)).{hint}"
    )
