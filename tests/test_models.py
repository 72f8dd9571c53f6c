"""Tests for lightning_cheapconv/models: counts against the papers / timm, shapes, get_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_cheapconv.models import (
    CifarResNet,
    GhostNet,
    get_model,
    ghostnet_050,
    ghostnet_100,
    ghostnet_130,
    list_models,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    vgg16,
)
from lightning_cheapconv.nn import GhostConv2d


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, size: int) -> float:
    """MACs = FlopCounterMode FLOPs / 2 at batch 1 (DESIGN.md section 6)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def ghostify(model: nn.Module, ratio: int = 2, dw_size: int = 3) -> nn.Module:
    """Replace every conv but the first by a conv-only GhostConv2d (the papers' CIFAR recipe)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs[1:]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ghost = GhostConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            ratio=ratio,
            dw_size=dw_size,
        )
        setattr(parent, child, ghost)
    return model


# ---- CIFAR ResNet ---------------------------------------------------------------------------------

RESNETS = [(resnet20, 20, 269_722), (resnet32, 32, 464_154), (resnet44, 44, 658_586), (resnet56, 56, 853_018)]
RESNETS.append((resnet110, 110, 1_727_962))


@pytest.mark.parametrize("builder, depth, params", RESNETS, ids=[f"resnet{d}" for _, d, _ in RESNETS])
def test_cifar_resnet_depth_and_params(builder, depth, params):
    model = builder()
    assert model.depth == depth
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # Depth 6n+2 counts the weighted layers: the stem, 2 convs per block, the classifier.
    assert len(convs) + len(linears) == depth
    assert n_params(model) == params


def test_resnet56_counts_match_references():
    model = resnet56()
    assert n_params(model) == 853_018
    assert macs(model, 32) == pytest.approx(125.5e6, rel=5e-3)


def test_ghost_resnet56_matches_references():
    # REFERENCES.md: Ghost-ResNet-56, s=2, d=3, every conv but the first: 438,154 params, 65.3M MACs.
    model = ghostify(resnet56())
    assert n_params(model) == 438_154
    assert macs(model, 32) == pytest.approx(65.3e6, rel=5e-3)


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_resnet_forward_shape(depth):
    model = CifarResNet(depth, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("builder", [resnet20, vgg16], ids=["resnet20", "vgg16"])
def test_every_conv_is_followed_by_batchnorm(builder):
    modules = [m for _, m in builder().named_modules() if not isinstance(m, (nn.Sequential, nn.ReLU))]
    for i, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            assert type(module) is nn.Conv2d and module.bias is None
            assert isinstance(modules[i + 1], nn.BatchNorm2d)
            assert modules[i + 1].num_features == module.out_channels


def test_cifar_resnet_names():
    model = resnet20()
    first_conv = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert first_conv == "conv1"
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64


def test_option_a_shortcut_is_parameter_free():
    model = resnet20()
    block = model.layer2[0]
    assert n_params(block.shortcut) == 0
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("depth", [0, 21, 7, "56"])
def test_cifar_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)


# ---- CIFAR VGG-16 ---------------------------------------------------------------------------------


def test_vgg16_counts_match_references():
    model = vgg16()
    # 15.0M params and 313M MACs in the GhostNet paper (512-512-10 classifier, BN, bias-free convs).
    assert n_params(model) == 14_986_698
    assert round(n_params(model) / 1e6, 1) == 15.0
    assert macs(model, 32) == pytest.approx(313e6, rel=5e-3)
    assert sum(isinstance(m, nn.Conv2d) for m in model.features) == 13
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [512, 10]


def test_ghost_vgg16_matches_references():
    # REFERENCES.md: Ghost-VGG-16, s=2: 7.7M / 158M in the paper, 7.65M / 158.7M analytically.
    model = ghostify(vgg16())
    assert n_params(model) / 1e6 == pytest.approx(7.65, abs=0.01)
    assert macs(model, 32) == pytest.approx(158.7e6, rel=5e-3)


def test_vgg16_forward_shape():
    model = vgg16(num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


# ---- GhostNet -------------------------------------------------------------------------------------

GHOSTNETS = [
    (ghostnet_050, 0.5, 2_587_292, 42.3e6),
    (ghostnet_100, 1.0, 5_182_508, 141.2e6),
    (ghostnet_130, 1.3, 7_358_820, 227.0e6),
]


@pytest.mark.parametrize("builder, width, params, mac", GHOSTNETS, ids=["050", "100", "130"])
def test_ghostnet_counts_match_timm(builder, width, params, mac):
    model = builder()
    assert model.width == width
    assert n_params(model) == params
    assert macs(model, 224) == pytest.approx(mac, rel=5e-3)


def test_ghostnet_structure():
    model = GhostNet(width=1.0, num_classes=10, dropout=0.0)
    first_conv = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert first_conv == "conv_stem"
    assert model.conv_head.bias is not None and model.conv_head.out_channels == 1280
    assert model.classifier.out_features == 10
    assert sum(isinstance(m, GhostConv2d) for m in model.modules()) == 2 * 16
    model.eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 960, 2, 2)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_ghostnet_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        GhostNet(width=0)
    with pytest.raises(ValueError, match="dropout"):
        GhostNet(dropout=1.0)


# ---- get_model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [("resnet56", CifarResNet), ("ResNet20", CifarResNet), ("ghostnet_050", GhostNet), ("vgg16", nn.Module)],
)
def test_get_model_ours(name, cls):
    model = get_model(name, num_classes=10)
    assert isinstance(model, cls)
    assert type(model).__module__.startswith("lightning_cheapconv.models")


def test_get_model_passes_kwargs():
    model = get_model("ghostnet_050", num_classes=5, dropout=0.0)
    assert model.dropout.p == 0.0 and model.classifier.out_features == 5


def test_get_model_torchvision():
    import torchvision

    model = get_model("resnet18", num_classes=10)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 10
    # The "torchvision." prefix reaches torchvision where a name is also ours (vgg16).
    prefixed = get_model("torchvision.resnet18", num_classes=3)
    assert isinstance(prefixed, torchvision.models.ResNet) and prefixed.fc.out_features == 3


def test_get_model_bad_name():
    with pytest.raises(ValueError, match="unknown model 'resnet57'.*resnet56") as info:
        get_model("resnet57", num_classes=10)
    for name in list_models():
        assert name in str(info.value)


def test_list_models():
    ours = list_models()
    assert ours == sorted(ours)
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16"} <= set(ours)
    assert {"ghostnet_050", "ghostnet_100", "ghostnet_130"} <= set(ours)
    everything = list_models(include_torchvision=True)
    assert "resnet18" in everything and "torchvision.vgg16" in everything
