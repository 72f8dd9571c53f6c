"""Self-describing checkpoints (lightning_cheapconv/checkpoint.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_cheapconv.checkpoint import Restructured, dense_from_record, install_restructure_hook, restructure
from lightning_cheapconv.convert import convert_to_ghost, decompose_structured, replace_modules
from lightning_cheapconv.nn import GhostConv2d, StructuredConv2d, StructuredLinear, build_from_record
from lightning_cheapconv.nn.record import decode_record, encode_record


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 1))
        self.fc = nn.Linear(24, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.body(torch.relu(self.bn(self.stem(x))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    return _Net().eval()


def _ghost(seed: int = 0) -> _Net:
    model = _net(seed)
    convert_to_ghost(model, calibration=torch.randn(4, 3, 8, 8))  # inherited: permuted output order
    return model


def _structured(seed: int = 0, channel_ratio: float = 0.5) -> _Net:
    model = _net(seed)
    decompose_structured(model, channel_ratio=channel_ratio, linear=True)
    return model


_X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_X)


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _snapshot(model: nn.Module):
    state = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)]
    return state, modules, [id(p) for p in model.parameters()]


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    state, modules, params = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value) if torch.is_tensor(value) else now[key] == value, key
    assert [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)] == modules
    assert [id(p) for p in model.parameters()] == params


# ----------------------------------------------------------------------------- both directions


@pytest.mark.parametrize("make", [_ghost, _structured], ids=["ghost", "structured"])
def test_cheap_checkpoint_into_a_fresh_dense_model(make):
    saved = make(seed=0)
    state = saved.state_dict()
    model = _net(seed=1)  # other weights everywhere
    changes = restructure(model, state)
    cheap = {n: type(m).__name__ for n, m in saved.named_modules() if isinstance(m, (GhostConv2d, StructuredConv2d))}
    cheap.update({n: type(m).__name__ for n, m in saved.named_modules() if isinstance(m, StructuredLinear)})
    assert {c.name: c.new_type for c in changes} == cheap
    assert all(isinstance(c, Restructured) and c.old_type in ("Conv2d", "Linear") for c in changes)
    model.load_state_dict(state)  # strict
    assert torch.equal(_out(model), _out(saved))
    assert _names(model) == _names(saved)  # optimizer state restores by position
    assert restructure(model, state) == []  # nothing left to do


@pytest.mark.parametrize("make", [_ghost, _structured], ids=["ghost", "structured"])
def test_dense_checkpoint_into_a_converted_model(make):
    dense = _net(seed=0)
    state = dense.state_dict()
    model = make(seed=1)
    cheap = [n for n, m in model.named_modules() if isinstance(m, (GhostConv2d, StructuredConv2d, StructuredLinear))]
    changes = restructure(model, state)
    assert [c.name for c in changes] == cheap and len(cheap) >= 2
    assert {c.new_type for c in changes} <= {"Conv2d", "Linear"}
    assert not any(isinstance(m, (GhostConv2d, StructuredConv2d, StructuredLinear)) for m in model.modules())
    model.load_state_dict(state)
    assert torch.equal(_out(model), _out(dense))
    assert _names(model) == _names(dense)


def test_one_cheap_kind_into_another():
    ghost, structured = _ghost(seed=0), _structured(seed=1)
    restructure(ghost, structured.state_dict())
    ghost.load_state_dict(structured.state_dict())
    assert torch.equal(_out(ghost), _out(structured))
    # Other hidden sizes of the same kind: the records differ, so the layers are rebuilt.
    wider = _structured(seed=2, channel_ratio=1.0)
    changes = restructure(structured, wider.state_dict())
    assert [(c.name, c.old_type, c.new_type) for c in changes] == [
        ("body.0", "StructuredConv2d", "StructuredConv2d"),  # c=8 -> c=16
        ("body.2", "StructuredConv2d", "Conv2d"),  # a 1x1 conv stays dense at channel_ratio=1
        ("fc", "StructuredLinear", "Linear"),
    ]
    structured.load_state_dict(wider.state_dict())
    assert torch.equal(_out(structured), _out(wider))


def test_ghost_with_a_permuted_output_order():
    saved = _ghost()
    assert saved.body[0].output_index is not None and "body.0.output_index" in saved.state_dict()
    # Sanity: the permutation matters for the output.
    index = saved.body[0].output_index.clone()
    assert not torch.equal(index, torch.arange(24))
    model = _net(seed=3)
    restructure(model, saved.state_dict())
    assert model.body[0].output_index is not None
    model.load_state_dict(saved.state_dict())
    assert torch.equal(model.body[0].output_index, index)
    assert torch.equal(_out(model), _out(saved))
    # A Ghost module with the plain order meets a permuted one (and back): the records differ.
    plain = _net(seed=4)
    convert_to_ghost(plain, init="random")
    assert plain.body[0].output_index is None
    changes = restructure(plain, saved.state_dict())
    assert [c.name for c in changes] == ["body.0", "body.2"]
    plain.load_state_dict(saved.state_dict())
    assert torch.equal(_out(plain), _out(saved))
    back, other = _ghost(), _net(seed=5)
    convert_to_ghost(other, init="random")
    restructure(back, other.state_dict())
    back.load_state_dict(other.state_dict())
    assert back.body[0].output_index is None and torch.equal(_out(back), _out(other))


def test_float64_model_gets_float64_modules():
    saved = _ghost()
    model = _net(seed=1).double()
    restructure(model, saved.state_dict())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.load_state_dict(saved.state_dict())  # float32 values, copied into float64 parameters
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(_X.double()).float(), _out(saved), rtol=1e-5, atol=1e-5)
    dense = _net(seed=2).double()
    saved = _structured()
    restructure(saved, dense.state_dict())
    assert all(p.dtype == torch.float32 for p in saved.parameters())  # placed like the modules they replace


@pytest.mark.parametrize("training", [False, True])
def test_rebuilt_modules_keep_the_training_mode_of_those_they_replace(training):
    saved = _ghost()
    replace_modules(saved, {"body.0": GhostConv2d(16, 24, 3, padding=1, bias=True, norm_layer=nn.BatchNorm2d)})
    model = _net(seed=1).train(training)
    restructure(model, saved.state_dict())
    assert {m.training for m in model.modules()} == {training}  # a BatchNorm in train mode would use batch statistics
    back = _net(seed=2).eval()
    restructure(model.eval(), back.state_dict())
    assert not any(m.training for m in model.modules())


def test_shared_module_round_trip():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.again = nn.Sequential(nn.ReLU(), self.conv)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.again(self.conv(self.stem(x))).mean((2, 3)))

    torch.manual_seed(0)
    saved = Shared()
    convert_to_ghost(saved)
    model = Shared()
    assert [c.name for c in restructure(model, saved.state_dict())] == ["conv"]
    assert model.conv is model.again[1] and isinstance(model.conv, GhostConv2d)
    model.load_state_dict(saved.state_dict())
    assert torch.equal(model(_X), saved(_X))
    assert _names(model) == _names(saved)
    # Back to dense, still shared.
    dense = Shared()
    restructure(model, dense.state_dict())
    assert type(model.conv) is nn.Conv2d and model.conv is model.again[1]


# ----------------------------------------------------------------------------- strictness and bad state dicts


def test_strict_and_non_strict():
    saved = _ghost()
    state = dict(saved.state_dict())
    state["extra.weight"] = torch.zeros(3)
    del state["body.0.cheap_operation.bias"]
    model = _net(seed=1)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError) as info:
        restructure(model, state)
    message = str(info.value)
    assert "nothing was changed" in message
    assert "'extra.weight': unexpected key" in message
    assert "'body.0.cheap_operation.bias': missing from the state dict" in message
    _assert_unchanged(model, snapshot)

    changes = restructure(model, state, strict=False)
    assert [c.name for c in changes] == ["body.0", "body.2"]
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["body.0.cheap_operation.bias"] and result.unexpected_keys == ["extra.weight"]
    # What the state dict lacked is initialized, not left as uninitialized memory.
    bias = model.body[0].cheap_operation.bias
    assert torch.isfinite(bias).all() and bias.abs().max() <= 1.0


def test_non_strict_rebuild_initializes_what_is_not_loaded():
    torch.manual_seed(0)
    saved = _net()
    # A GhostNet-style module (its own BatchNorm) where the model has a plain conv.
    replace_modules(saved, {"body.0": GhostConv2d(16, 24, 3, padding=1, bias=True, norm_layer=nn.BatchNorm2d)})
    state = {k: v for k, v in saved.state_dict().items() if "running" not in k and "cheap" not in k}
    model = _net(seed=1)
    restructure(model, state, strict=False)
    model.load_state_dict(state, strict=False)
    ghost = model.body[0]
    assert isinstance(ghost, GhostConv2d) and ghost.norm_name == "BatchNorm2d"
    for norm in (ghost.primary_conv[1], ghost.cheap_operation[1]):
        assert torch.equal(norm.running_mean, torch.zeros(12)) and torch.equal(norm.running_var, torch.ones(12))
    assert torch.isfinite(ghost.cheap.weight).all() and ghost.cheap.weight.abs().max() <= 1.0
    assert torch.equal(ghost.primary.weight, saved.body[0].primary.weight)


def _bad_states():
    saved = _ghost()
    good = saved.state_dict()
    record = decode_record(good["body.0._extra_state"])
    cases = {
        "wrong shape": ({**good, "head.weight": torch.zeros(5, 31)}, r"'head.weight': shape \(5, 31\) does not match"),
        "wrong shape in a rebuilt module": (
            {**good, "body.0.primary_conv.weight": torch.zeros(12, 16, 5, 5)},
            r"'body.0.primary_conv.weight': shape \(12, 16, 5, 5\) does not match the model's \(12, 16, 3, 3\)",
        ),
        "unknown key": ({**good, "body.9.weight": torch.zeros(1)}, "'body.9.weight': unexpected key"),
        "unknown kind": (
            {**good, "body.0._extra_state": encode_record({**record, "kind": "Bogus"})},
            "'body.0._extra_state': unknown structure kind 'Bogus'",
        ),
        "record without a module": (
            {**good, "nowhere._extra_state": encode_record(record)},
            "'nowhere._extra_state'.*no module there",
        ),
        "broken record": (
            {**good, "body.0._extra_state": encode_record({k: v for k, v in record.items() if k != "in_channels"})},
            r"'body.0._extra_state': cannot rebuild GhostConv2d: missing field\(s\) \['in_channels'\]",
        ),
        "newer version": (
            {**good, "body.0._extra_state": encode_record({**record, "version": 99})},
            "'body.0._extra_state': cannot rebuild GhostConv2d.*version 99 is newer",
        ),
    }
    return cases


@pytest.mark.parametrize("case", list(_bad_states()))
@pytest.mark.parametrize("target", ["dense", "ghost"])
def test_bad_state_dict_raises_and_leaves_the_model_unchanged(case, target):
    state, match = _bad_states()[case]
    model = _net(seed=1) if target == "dense" else _ghost(seed=1)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        restructure(model, state)
    _assert_unchanged(model, snapshot)
    # The same through load_state_dict with the hook: nothing is half-loaded.
    install_restructure_hook(model)
    if case == "unknown key":  # keys are load_state_dict's business under the hook
        with pytest.raises(RuntimeError, match="Unexpected key"):
            model.load_state_dict(state)
        return
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(state)
    _assert_unchanged(model, snapshot)


def test_unknown_kind_in_the_model_s_cheap_module_raises():
    model = _ghost(seed=1)
    state = dict(_ghost(seed=0).state_dict())
    record = decode_record(state["body.2._extra_state"])
    state["body.2._extra_state"] = encode_record({**record, "kind": "GhostConv3000"})
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="'body.2._extra_state': unknown structure kind 'GhostConv3000'"):
        restructure(model, state, strict=False)
    _assert_unchanged(model, snapshot)


def test_dense_from_record():
    record = _ghost().body[0].structure_record()
    conv = dense_from_record(record, torch.zeros(24, 16, 3, 3))
    assert type(conv) is nn.Conv2d and conv.weight.is_meta
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (16, 24, (3, 3), (1, 1))
    assert conv.bias is not None
    with pytest.raises(ValueError, match=r"body.0.weight: shape \(24, 16, 5, 5\) does not match"):
        dense_from_record(record, torch.zeros(24, 16, 5, 5), "body.0")
    with pytest.raises(ValueError, match=r"body.0: dense weight of shape \(24, 16\) does not fit the GhostConv2d"):
        dense_from_record(record, torch.zeros(24, 16), "body.0")
    with pytest.raises(ValueError, match=r"body.0: dense weight of type list does not fit the GhostConv2d"):
        dense_from_record(record, [[0.0]], "body.0")
    linear = dense_from_record(_structured().fc.structure_record(), torch.zeros(32, 24))
    assert type(linear) is nn.Linear and (linear.in_features, linear.out_features) == (24, 32)


# ----------------------------------------------------------------------------- the load hook


def test_install_restructure_hook_makes_load_state_dict_work():
    saved = _ghost()
    model = _net(seed=1)
    handle = install_restructure_hook(model)
    assert handle is not None
    assert install_restructure_hook(model) is None  # idempotent
    assert len(model._load_state_dict_pre_hooks) == 1
    model.load_state_dict(saved.state_dict())
    assert torch.equal(_out(model), _out(saved))
    assert _names(model) == _names(saved)
    # And back to dense, and non-strict with a missing key (the hook never rejects keys itself).
    dense = _net(seed=2)
    model.load_state_dict(dense.state_dict())
    assert torch.equal(_out(model), _out(dense))
    partial = {k: v for k, v in saved.state_dict().items() if k != "head.bias"}
    assert model.load_state_dict(partial, strict=False).missing_keys == ["head.bias"]
    assert isinstance(model.body[0], GhostConv2d)
    # Removing the hook and installing it again works.
    handle.remove()
    assert not model._load_state_dict_pre_hooks
    assert install_restructure_hook(model) is not None
    model.load_state_dict(dense.state_dict())
    assert torch.equal(_out(model), _out(dense))


def test_a_model_with_the_hook_pickles_and_keeps_it(tmp_path):
    """torch.save(model) after a fit (the callbacks install the hook) used to fail on a local closure."""
    model = _net(seed=1)
    install_restructure_hook(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loaded.load_state_dict(_ghost().state_dict())  # the hook came along
    assert isinstance(loaded.body[0], GhostConv2d)


def test_hook_on_a_submodule_uses_its_prefix():
    saved = nn.Sequential(_ghost())
    wrapper = nn.Sequential(_net(seed=1))
    install_restructure_hook(wrapper[0])
    wrapper.load_state_dict(saved.state_dict())
    assert isinstance(wrapper[0].body[0], GhostConv2d)
    assert torch.equal(_out(wrapper), _out(saved))


def test_torch_save_and_weights_only_load(tmp_path):
    saved = _ghost()
    structured = _structured()
    torch.save({"ghost": saved.state_dict(), "structured": structured.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    record = decode_record(loaded["ghost"]["body.0._extra_state"])
    assert record["kind"] == "GhostConv2d" and record["permuted"] is True
    for key, reference in (("ghost", saved), ("structured", structured)):
        model = _net(seed=1)
        install_restructure_hook(model)
        model.load_state_dict(loaded[key])
        assert torch.equal(_out(model), _out(reference))
        assert _names(model) == _names(reference)


def test_models_built_from_recorded_blocks_restructure_as_they_are():
    # GhostNet's SE, and the other recorded operators, are kinds restructure knows: a GhostNet state dict
    # loads into a fresh GhostNet with nothing rebuilt.
    from lightning_cheapconv.models import ghostnet_050
    from lightning_cheapconv.nn import ChannelShuffle, CReLU, DepthwiseSeparableConv2d

    source = ghostnet_050().eval()
    fresh = ghostnet_050().eval()
    assert restructure(fresh, source.state_dict()) == []
    fresh.load_state_dict(source.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(fresh(x), source(x))
    for module in (ChannelShuffle(2), CReLU(), DepthwiseSeparableConv2d(4, 8, 3)):
        rebuilt = build_from_record(module.structure_record())
        assert type(rebuilt) is type(module) and rebuilt.structure_record() == module.structure_record()
