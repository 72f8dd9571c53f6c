"""Weights used outside their layer (lightning_cheapconv/reuse.py) and how conversions skip such layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cheapconv.convert import convert_to_ghost, decompose_structured, select_layers
from lightning_cheapconv.nn import GhostConv2d, StructuredConv2d
from lightning_cheapconv.reuse import evaluating, find_weight_reuse, run_example

pytestmark = pytest.mark.usefixtures("one_thread")


class _Decoder(nn.Module):
    """Decodes with a weight it is handed: ``F.conv_transpose2d(z, weight)`` (a tied autoencoder)."""

    def forward(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(torch.relu(z), weight, padding=1)


class TiedAutoencoder(nn.Module):
    """``enc``'s weight is used again, transposed, by ``dec``; ``mid`` is an ordinary layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.enc = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.dec = _Decoder()
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mid(self.bn(self.enc(self.stem(x))))
        return self.head(self.dec(z, self.enc.weight))


class TiedInRoot(TiedAutoencoder):
    """The same reuse written in the root's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mid(self.bn(self.enc(self.stem(x))))
        return self.head(F.conv_transpose2d(z, self.enc.weight, padding=1))


class Untraceable(TiedAutoencoder):
    """Control flow on a tensor value: ``torch.fx`` cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > float("inf"):
            x = -x
        return super().forward(x)


class SharedParameter(nn.Module):
    """``twin`` registers ``conv``'s own weight Parameter: one tensor under two module names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.twin = nn.Conv2d(8, 8, 3, padding=1)
        self.twin.weight = self.conv.weight
        self.other = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.other(self.twin(self.conv(self.stem(x)))))


class MetadataReader(nn.Module):
    """Reads ``conv.weight.dtype`` and ``.shape`` outside ``conv``: no use of the values, nothing to skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).to(self.conv.weight.dtype)
        return self.head(self.conv(x))[:, : self.conv.weight.size(0)]


X = torch.randn(2, 3, 8, 8)
DEC = "weight used outside the layer (by conv_transpose2d in dec.forward)"
ROOT = "weight used outside the layer (by conv_transpose2d in TiedInRoot.forward)"


@pytest.mark.parametrize(
    "model,example_input,expected",
    [
        (TiedAutoencoder(), X, {"enc": DEC}),  # (b) one forward pass
        (TiedAutoencoder(), None, {"enc": DEC}),  # (c) the torch.fx trace
        (TiedInRoot(), X, {"enc": ROOT}),
        (TiedInRoot(), None, {"enc": ROOT}),
        (Untraceable(), X, {"enc": DEC}),
        (Untraceable(), None, {}),  # no input and no trace: only registered Parameters can be seen
        (MetadataReader(), X, {}),
        (MetadataReader(), None, {}),
    ],
    ids=["tied-run", "tied-fx", "root-run", "root-fx", "untraceable-run", "untraceable-fx", "meta-run", "meta-fx"],
)
def test_find_weight_reuse(model, example_input, expected):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert find_weight_reuse(model, names, example_input) == expected


@pytest.mark.parametrize("example_input", [X, None])
def test_a_parameter_registered_twice_is_found_statically(example_input):
    model = SharedParameter()
    found = find_weight_reuse(model, ["conv", "twin", "other"], example_input)
    assert found == {
        "conv": "weight used outside the layer (by twin.weight, the same Parameter registered under another module)",
        "twin": "weight used outside the layer (by conv.weight, the same Parameter registered under another module)",
    }


def test_a_shared_module_is_no_reuse():
    shared = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU(), shared, nn.Conv2d(8, 2, 1))
    assert find_weight_reuse(model, ["1"], X) == {} and find_weight_reuse(model, ["1"]) == {}


def test_find_weight_reuse_leaves_the_model_as_it_was():
    model = TiedAutoencoder().train()
    model.bn.eval()
    state = copy.deepcopy(model.state_dict())
    find_weight_reuse(model, ["enc", "mid"], X)
    assert model.training and not model.bn.training and model.stem.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_find_weight_reuse_errors():
    model = TiedAutoencoder()
    with pytest.raises(ValueError, match="names contains 'nope', which is no submodule"):
        find_weight_reuse(model, ["enc", "nope"])
    with pytest.raises(
        ValueError, match=r"example_input with input shapes \[\(2, 4, 8, 8\)\] does not run through TiedAutoencoder"
    ):
        find_weight_reuse(model, ["enc"], torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="model must be a Module"):
        find_weight_reuse(model.enc.weight, ["enc"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_run_example_and_evaluating_restore_modes_on_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model[1].eval()
    assert run_example(model, torch.randn(1, 3, 5, 5)).shape == (1, 4, 3, 3)
    with pytest.raises(
        ValueError, match=r"calibration with input shapes \[\(1, 2, 5, 5\)\] does not run through Sequential"
    ):
        run_example(model, torch.randn(1, 2, 5, 5), "calibration")
    with pytest.raises(ValueError, match="calibration must be a torch.Tensor"):
        run_example(model, [1.0], "calibration")
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(KeyError), evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
        raise KeyError
    assert model.training and not model[1].training


@pytest.mark.parametrize("calibrate", [True, False])
def test_convert_to_ghost_skips_a_tied_layer_and_the_model_still_runs(calibrate):
    torch.manual_seed(0)
    model = TiedAutoencoder().eval()
    result = convert_to_ghost(model, calibration=X if calibrate else None)
    assert result.converted == ["mid"] and isinstance(model.mid, GhostConv2d)
    assert type(model.enc) is nn.Conv2d
    assert [(p.name, p.reason) for p in result.skipped if p.name == "enc"] == [("enc", DEC)]
    assert f"  enc: skipped ({DEC})" in str(result).splitlines()
    assert model(X).shape == X.shape


@pytest.mark.parametrize("calibrate", [True, False])
def test_decompose_structured_skips_a_tied_layer_and_the_model_still_runs(calibrate):
    torch.manual_seed(0)
    model = TiedInRoot().eval()
    result = decompose_structured(model, channel_ratio=0.5, calibration=X if calibrate else None)
    assert result.converted == ["mid"] and isinstance(model.mid, StructuredConv2d)
    assert {p.name: p.reason for p in result.skipped}["enc"] == ROOT
    assert model(X).shape == X.shape


def test_select_layers_keeps_its_positional_signature():
    plan = select_layers(TiedAutoencoder(), "ghost", None, None, True, True, False, 2, 3, 1.0, 1, None)
    assert {p.name: p.reason for p in plan}["enc"] == DEC
