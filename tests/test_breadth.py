"""Breadth: both conversions on the 2-D models people use (timm classifiers, torchvision detectors and segmenters).

For every model and method: the conversion keeps each head's prediction layers dense (named per model below), the
converted model runs forward and backward in train and eval mode, and a fresh model restructured from its state dict
(``restructure(fresh, state); fresh.load_state_dict(state)``) gives the same outputs. Inputs are small (64x64, the
detectors' transforms resized to 64; SSDLite's is fixed at 320). The big models are marked ``slow``: run
``pytest -m "not slow"`` for the quick part. :func:`test_every_conv_type` does the same for models built from the
other conv types (a U-Net with ConvTranspose2d, a Conv1d audio net, r3d_18), with each converted layer's MACs against
a hand formula.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from lightning_cheapconv import convert_to_ghost, count_complexity, decompose_structured, restructure
from lightning_cheapconv.calls import tensors_in
from lightning_cheapconv.inherit import fit_ghost_from_kernels
from lightning_cheapconv.nn import (
    GhostConv1d,
    GhostConv2d,
    GhostConv3d,
    GhostConvTranspose1d,
    GhostConvTranspose2d,
    GhostConvTranspose3d,
    StructuredConv1d,
    StructuredConv2d,
    StructuredConv3d,
    StructuredConvTranspose1d,
    StructuredConvTranspose2d,
    StructuredConvTranspose3d,
    StructuredLinear,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
CHEAP = (GhostConv2d, StructuredConv2d, StructuredLinear)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    predictions: tuple[str, ...]  # the prediction layers, kept dense by both methods
    detector: bool = False  # takes images and targets, returns losses in train mode; not traceable
    masks: bool = False
    marks: list[Any] = field(default_factory=list)


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=5)


def _tv(builder: Callable[..., nn.Module], **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: builder(weights=None, weights_backbone=None, num_classes=3, **kwargs)


detection, segmentation = torchvision.models.detection, torchvision.models.segmentation
SMALL = {"min_size": SIZE, "max_size": SIZE}
SSD_HEADS = tuple(f"head.{h}_head.module_list.{i}.1" for h in ("classification", "regression") for i in range(6))
RCNN_HEADS = ("rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score")
slow = [pytest.mark.slow]

CASES: dict[str, Case] = {
    "resnet50": Case(_timm("resnet50"), ("fc",), marks=slow),
    "efficientnet_b0": Case(_timm("efficientnet_b0"), ("classifier",)),
    "mobilenetv3_large_100": Case(_timm("mobilenetv3_large_100"), ("classifier",)),
    "convnext_tiny": Case(_timm("convnext_tiny"), ("head.fc",), marks=slow),
    "regnetx_002": Case(_timm("regnetx_002"), ("head.fc",)),
    "cspdarknet53": Case(_timm("cspdarknet53"), ("head.fc",), marks=slow),
    "ssdlite320_mobilenet_v3_large": Case(
        _tv(detection.ssdlite320_mobilenet_v3_large), SSD_HEADS, detector=True, marks=slow
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": Case(
        _tv(detection.fasterrcnn_mobilenet_v3_large_fpn, **SMALL),
        (*RCNN_HEADS, "roi_heads.box_predictor.bbox_pred"),
        detector=True,
    ),
    "maskrcnn_resnet50_fpn": Case(
        _tv(detection.maskrcnn_resnet50_fpn, **SMALL),
        (*RCNN_HEADS, "roi_heads.box_predictor.bbox_pred", "roi_heads.mask_predictor.mask_fcn_logits"),
        detector=True,
        masks=True,
        marks=slow,
    ),
    "fcn_resnet50": Case(
        _tv(segmentation.fcn_resnet50, aux_loss=True), ("classifier.4", "aux_classifier.4"), marks=slow
    ),
    "deeplabv3_mobilenet_v3_large": Case(_tv(segmentation.deeplabv3_mobilenet_v3_large), ("classifier.4",)),
    "lraspp_mobilenet_v3_large": Case(
        _tv(segmentation.lraspp_mobilenet_v3_large), ("classifier.low_classifier", "classifier.high_classifier")
    ),
}
CONVERSIONS: dict[str, Callable[..., Any]] = {
    "ghost": convert_to_ghost,
    "structured": lambda model, **kw: decompose_structured(model, channel_ratio=0.5, **kw),
}


def _targets(batch: int, masks: bool) -> list[dict[str, Tensor]]:
    targets = []
    for _ in range(batch):
        target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
        if masks:
            target["masks"] = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
            target["masks"][0, 8:48, 8:40] = 1
        targets.append(target)
    return targets


def _loss(case: Case, output: Any) -> Tensor:
    """A scalar from every floating output (losses, logits, boxes, scores, masks)."""
    return sum((t.float().mean() for t in tensors_in(output) if t.is_floating_point()), torch.zeros(()))


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.build().eval()


@pytest.mark.parametrize("method", sorted(CONVERSIONS))
@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_any_cnn(name: str, method: str) -> None:
    case = CASES[name]
    model = _build(case)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    # Detectors do not trace with torch.fx: their prediction layers are found on an example.
    result = CONVERSIONS[method](model, example_input=x[:1] if case.detector else None)
    assert result.changes, result

    kept = {p.name: p.reason for p in result.plan if p.action == "skip"}
    for layer in case.predictions:
        kept_layer = model.get_submodule(layer)  # timm's Linear subclasses nn.Linear
        assert isinstance(kept_layer, (nn.Conv2d, nn.Linear)) and not isinstance(kept_layer, CHEAP), layer
        assert kept.get(layer, "prediction layer, kept") == "prediction layer, kept", layer
    assert [p.name for p in result.plan if p.reason == "prediction layer, kept"] == [
        p for p in case.predictions if p in kept
    ]

    with torch.no_grad():
        expected = model(x)
    fresh = _build(case)
    state = model.state_dict()
    restructure(fresh, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        actual = fresh(x)
    for a, e in zip(tensors_in(actual), tensors_in(expected), strict=True):
        torch.testing.assert_close(a, e)

    for training in (False, True):
        model.zero_grad()
        model.train(training)
        if case.detector and training:
            output = model(list(x), _targets(len(x), case.masks))
        else:
            output = model(x)
        loss = _loss(case, output)
        if loss.requires_grad:  # a detector in eval mode may detect nothing: no graph
            loss.backward()
            grads = [p.grad for c in result.changes for p in model.get_submodule(c.name).parameters()]
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert case.detector and not training


def _spread_fit_reference(conv: nn.Conv2d, dw_size: int) -> tuple[Tensor, Tensor]:
    """``fit_ghost_from_kernels``'s cross and Gram terms computed by spreading the kernel out to its dilated size
    (what the fit did before; memory and time grow with the dilation squared)."""
    weight = conv.weight.detach()
    out, channels, k, _ = weight.shape
    (dil, _), (stride, _) = conv.dilation, conv.stride
    spread = weight.new_zeros(out, channels, dil * (k - 1) + 1, dil * (k - 1) + 1)
    spread[:, :, ::dil, ::dil] = weight
    half = dw_size // 2
    cross = F.conv2d(spread, weight, stride=stride, padding=stride * half, dilation=dil)
    reach = stride * (dw_size - 1)
    auto = F.conv2d(
        spread.reshape(1, -1, *spread.shape[2:]), weight, stride=stride, padding=reach, dilation=dil, groups=out
    )
    return cross, auto[0]


@pytest.mark.parametrize("stride,dilation", [(1, 12), (2, 3), (3, 2), (2, 4)])
def test_dilated_kernel_fit_equals_the_spread_kernels(stride: int, dilation: int) -> None:
    """DeepLabV3's ASPP convs (dilation 12 to 36) made the kernel-space fit spread each kernel to its dilated size:
    5 GB and most of a minute. The compact correlation must give the same fit."""
    from lightning_cheapconv.inherit import _correlations

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride, padding=dilation, dilation=dilation)
    cross, auto = _spread_fit_reference(conv, 3)
    weight = conv.weight.detach()
    torch.testing.assert_close(_correlations(weight, weight, 1, conv.stride, conv.dilation), cross)
    grouped = weight.reshape(1, -1, 3, 3)
    torch.testing.assert_close(_correlations(grouped, weight, 2, conv.stride, conv.dilation, groups=10)[0], auto)
    assert fit_ghost_from_kernels(conv, 2, 3).relative_error < 1.0


# ------------------------------------------------------------------------------------------------ every conv type


@dataclass
class NdCase:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    predictions: tuple[str, ...]
    marks: list[Any] = field(default_factory=list)


def _nd_cases() -> dict[str, NdCase]:
    from test_conv_types import UNet, audio_net, video_net

    return {
        "unet_conv_transpose2d": NdCase(UNet, (2, 3, 16, 16), ("head",)),
        "conv1d_audio": NdCase(audio_net, (2, 1, 256), ("12",)),
        # r3d_18's convs are torchvision's Conv3DSimple (an nn.Conv3d with a static method): they convert.
        "r3d_18": NdCase(video_net, (1, 3, 4, 32, 32), ("fc",), marks=slow),
    }


ND_CASES = _nd_cases()


def _hand_macs(module: nn.Module, x: Tensor, y: Tensor) -> int:
    """MACs of one cheap layer by hand, from its input ``x`` and output ``y`` (batch included)."""
    batch, inputs, outputs = x.shape[0], math.prod(x.shape[2:]), math.prod(y.shape[2:])
    if isinstance(module, (GhostConv1d, GhostConv2d, GhostConv3d)):
        m, s, taps = module.intrinsic_channels, module.ratio, math.prod(module.primary.kernel_size)
        return batch * outputs * m * (module.in_channels * taps + (s - 1) * module.dw_size ** (x.dim() - 2))
    if isinstance(module, (GhostConvTranspose1d, GhostConvTranspose2d, GhostConvTranspose3d)):
        m, s, taps = module.intrinsic_channels, module.ratio, math.prod(module.primary.kernel_size)
        # the primary transposed conv reads each input position once; the depthwise conv runs on the output
        return batch * (
            inputs * module.in_channels * m * taps + outputs * m * (s - 1) * module.dw_size ** (x.dim() - 2)
        )
    if isinstance(module, (StructuredConv1d, StructuredConv2d, StructuredConv3d)):
        per_group = module.in_channels // module.groups
        assert module.hidden_channels <= per_group
        return batch * outputs * module.out_channels * module.hidden_channels * math.prod(module.hidden_kernel_size)
    if isinstance(module, (StructuredConvTranspose1d, StructuredConvTranspose2d, StructuredConvTranspose3d)):
        return batch * inputs * module.in_channels * module.hidden_channels * math.prod(module.hidden_kernel_size)
    raise AssertionError(type(module).__name__)


@pytest.mark.parametrize("method", sorted(CONVERSIONS))
@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in ND_CASES.items()])
def test_every_conv_type(name: str, method: str) -> None:
    """A U-Net with ConvTranspose2d, a Conv1d audio net and r3d_18 (Conv3d): the same checks as
    :func:`test_any_cnn`, and each converted layer's MACs (``count_complexity``) against a hand formula."""
    case = ND_CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    x = torch.rand(*case.input_shape, generator=torch.Generator().manual_seed(1))
    result = CONVERSIONS[method](model, example_input=x[:1], progress=False)
    assert result.changes, result
    kept = {p.name: p.reason for p in result.plan if p.action == "skip"}
    for layer in case.predictions:
        kept_layer = model.get_submodule(layer)
        assert type(kept_layer) in (nn.Conv2d, nn.Linear), layer
        assert kept.get(layer, "prediction layer, kept") == "prediction layer, kept", layer
    kinds = {type(model.get_submodule(c.name)) for c in result.changes}
    if name.startswith("unet"):
        assert kinds & {GhostConvTranspose2d, StructuredConvTranspose2d}
    if name == "r3d_18":
        assert len(result.changes) == 19  # every conv but the stem

    # Counts: every converted layer against its hand formula, at the layer's own input.
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def note(module: nn.Module, args: tuple, output: Tensor, name: str) -> None:
        seen.setdefault(name, (args[0], output))

    handles = [
        model.get_submodule(c.name).register_forward_hook(functools.partial(note, name=c.name)) for c in result.changes
    ]
    complexity = count_complexity(model, example_input=x)
    for handle in handles:
        handle.remove()
    rows = complexity.by_name()
    for change in result.changes:
        layer = model.get_submodule(change.name)
        assert rows[change.name].macs == _hand_macs(layer, *seen[change.name]), change.name
        assert rows[change.name].params == sum(p.numel() for p in layer.parameters())

    with torch.no_grad():
        expected = model(x)
    torch.manual_seed(0)
    fresh = case.build().eval()
    state = model.state_dict()
    restructure(fresh, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)

    for training in (False, True):
        model.zero_grad()
        model.train(training)
        model(x).float().pow(2).mean().backward()
        grads = [p.grad for c in result.changes for p in model.get_submodule(c.name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
