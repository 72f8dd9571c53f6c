"""Structure records as untrusted input (lightning_cheapconv/nn/record.py, checkpoint.py): every record is checked
completely, and a state dict that does not fit leaves the model bit-identical, whichever way it is loaded."""

from __future__ import annotations

import copy
import io
import re
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_cheapconv.checkpoint import install_restructure_hook, restructure
from lightning_cheapconv.convert import replace_modules
from lightning_cheapconv.nn import (
    FoldedBatchNorm,
    FusedConv2d,
    FusedGhostConv2d,
    GhostConv2d,
    SqueezeExcite,
    StructuredConv2d,
    StructuredLinear,
    build_from_record,
)
from lightning_cheapconv.nn.record import check_conv_args, decode_record, records_equal

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """Dense; :func:`_saved` turns ``ghost``/``ghost_bn`` into Ghost modules and ``structured``/``fc`` into
    structured ones."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.ghost = nn.Conv2d(8, 11, 3, padding=1)
        self.ghost_bn = nn.Conv2d(11, 12, 1, bias=False)
        self.structured = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.structured(self.ghost_bn(torch.relu(self.ghost(x))))
        return self.head(torch.relu(self.fc(torch.relu(x).mean((2, 3)))))


def _dense(seed: int = 1) -> _Net:
    torch.manual_seed(seed)
    return _Net().eval()


def _saved() -> _Net:
    """Every cheap form with its checkpoint entries: a permuted Ghost whose index skips a concatenated channel
    (11 of 12), a GhostNet-style Ghost with its own BatchNorm, a structured conv and a structured linear layer."""
    model = _dense(seed=0)
    torch.manual_seed(0)
    ghost = GhostConv2d(8, 11, 3, padding=1, bias=True, ratio=2)
    ghost.set_output_index(torch.randperm(12)[:11])
    ghost_bn = GhostConv2d(11, 12, 1, ratio=3, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU)
    with torch.no_grad():
        for bn in (ghost_bn.primary_conv[1], ghost_bn.cheap_operation[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    replace_modules(
        model,
        {
            "ghost": ghost,
            "ghost_bn": ghost_bn,
            "structured": StructuredConv2d.from_dense(model.structured, hidden_channels=6, hidden_kernel_size=2),
            "fc": StructuredLinear.from_dense(model.fc, hidden_features=5),
        },
    )
    return model.eval()


# Records as dicts (the form 0.1 checkpoints hold; the tensors of today's decode to them), so tests can edit them.
_SAVED = {k: decode_record(v) for k, v in _saved().state_dict().items()}
_X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def _state(**changes) -> dict:
    """The saved state dict with ``changes`` (keys with dots spelled with ``__``; ``None`` drops a key)."""
    state = dict(_SAVED)
    for name, value in changes.items():
        key = name.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


def _record(path: str, **fields) -> dict:
    return {**_SAVED[f"{path}._extra_state"], **fields}


def _snapshot(model: nn.Module):
    state = [
        (k, v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v))
        for k, v in model.state_dict(keep_vars=True).items()
    ]
    types = [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)]
    return state, types, [id(p) for p in model.parameters()]


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    state, types, params = snapshot
    now = list(model.state_dict(keep_vars=True).items())
    assert [k for k, _ in now] == [k for k, _ in state]
    for (key, value), (_, was) in zip(now, state, strict=True):
        if torch.is_tensor(was):
            assert value.dtype == was.dtype and value.device == was.device, key
            assert torch.equal(value.detach(), was), key
        else:
            assert value == was, key
    assert [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)] == types
    assert [id(p) for p in model.parameters()] == params


def _load(model: nn.Module, state: dict, how: str) -> None:
    if how == "restructure":
        restructure(model, state)
        model.load_state_dict(state)
    else:
        install_restructure_hook(model)
        model.load_state_dict(state, strict=False)


def _refused(state: dict, how: str, target=_dense) -> str:
    """Load ``state`` into a fresh model; it must raise ``ValueError`` and leave the model bit-identical."""
    model = target()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError) as info:
        _load(model, state, how)
    _assert_unchanged(model, snapshot)
    return str(info.value)


def test_the_saved_state_dict_loads_both_ways():
    reference = _saved()
    with torch.no_grad():
        expected = reference(_X)
    for how in ("restructure", "hook"):
        model = _dense()
        _load(model, _SAVED, how)
        assert isinstance(model.ghost, GhostConv2d) and isinstance(model.fc, StructuredLinear)
        with torch.no_grad():
            assert torch.equal(model(_X), expected)


# ----------------------------------------------------------------------------- what review found


@pytest.mark.parametrize("how", ["restructure", "hook"])
@pytest.mark.parametrize("field", ["stride", "dilation"])
def test_ghost_record_with_a_zero_stride_or_dilation_is_refused(field, how):
    message = _refused(_state(ghost___extra_state=_record("ghost", **{field: [0, 0]})), how)
    assert "'ghost._extra_state': cannot rebuild GhostConv2d:" in message
    assert f"{field}=(0, 0) is out of range; each side must be in 1..9223372036854775807" in message


@pytest.mark.parametrize("how", ["restructure", "hook"])
def test_record_with_an_unknown_or_a_missing_field_is_refused(how):
    message = _refused(_state(ghost___extra_state=_record("ghost", device="meta")), how)
    assert "'ghost._extra_state': cannot rebuild GhostConv2d: unknown field(s) ['device']" in message
    record = {k: v for k, v in _record("structured").items() if k != "hidden_channels"}
    message = _refused(_state(structured___extra_state=record), how)
    assert "'structured._extra_state': cannot rebuild StructuredConv2d: missing field(s) ['hidden_channels']" in message


class _LargestAllocation(TorchDispatchMode):
    """The most elements of any tensor that an operation makes off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and not t.is_meta]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize(
    "path,field,value,match",
    [
        # Sizes of the layer: pinned by the model's layer there.
        (
            "ghost",
            "out_channels",
            10**5,
            "out_channels=100000 does not match the model's Conv2d there; valid value: 11",
        ),
        ("structured", "in_channels", 10**5, "in_channels=100000 does not match .*; valid value: 12"),
        # Sizes of its parts: pinned by the state dict's tensors (12 x 99999 and 12 x 999 x 999 ghost kernels).
        ("ghost", "ratio", 10**5, r"'ghost.cheap_operation.weight': shape \(6, 1, 3, 3\) .*'ratio': 100000"),
        ("ghost", "dw_size", 999, r"'ghost.cheap_operation.weight': shape \(6, 1, 3, 3\) .*'dw_size': 999"),
    ],
)
def test_huge_sizes_are_refused_before_anything_is_allocated(path, field, value, match):
    state = _state(**{f"{path}___extra_state": _record(path, **{field: value})})
    model = _dense()
    snapshot = _snapshot(model)
    with _LargestAllocation() as allocations, pytest.raises(ValueError, match=match):
        restructure(model, state)
    assert allocations.largest < 1000  # the claimed layer would need millions of elements
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("how", ["restructure", "hook"])
def test_absurd_sizes_are_refused_quickly_by_name(how):
    start = time.perf_counter()
    message = _refused(_state(ghost___extra_state=_record("ghost", out_channels=10**9)), how)
    assert "'ghost._extra_state': GhostConv2d record field out_channels=1000000000 does not match" in message
    message = _refused(_state(structured___extra_state=_record("structured", in_channels=10**9)), how)
    assert "'structured._extra_state': StructuredConv2d record field in_channels=1000000000" in message
    message = _refused(_state(ghost___extra_state=_record("ghost", out_channels=10**30)), how)
    assert f"out_channels={10**30} is out of range; valid range is 1..9223372036854775807 (an int)" in message
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("how", ["restructure", "hook"])
@pytest.mark.parametrize("target", ["dense", "same structure"])
def test_bad_output_index_is_refused(how, target):
    make = _dense if target == "dense" else _saved  # a model of the same structure rebuilds nothing
    duplicate = _SAVED["ghost.output_index"].clone()
    duplicate[1] = duplicate[0]
    message = _refused(_state(ghost__output_index=duplicate), how, make)
    assert "'ghost.output_index' must hold 11 distinct indices" in message
    assert f"got duplicates [{int(duplicate[0])}]" in message
    for bad in (12, -1):
        out_of_range = _SAVED["ghost.output_index"].clone()
        out_of_range[3] = bad
        message = _refused(_state(ghost__output_index=out_of_range), how, make)
        assert "'ghost.output_index' values must lie in 0..11" in message
    message = _refused(_state(ghost__output_index=_SAVED["ghost.output_index"].float()), how, make)
    assert "'ghost.output_index' must hold 11 distinct indices" in message and "torch.float32" in message


def test_a_valid_output_index_may_skip_a_concatenated_channel():
    # Weight inheritance for an odd out_channels keeps any 11 of the 12 concatenated channels, in any order.
    index = torch.tensor([11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 10])
    model = _dense()
    state = _state(ghost__output_index=index)
    restructure(model, state)
    model.load_state_dict(state)
    assert torch.equal(model.ghost.output_index, index)
    with torch.no_grad():
        assert torch.isfinite(model(_X)).all()


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"ghost___extra_state": _record("ghost", device="meta")}, r"unknown field\(s\) \['device'\]"),
        ({"ghost___extra_state": _record("ghost", stride=[0, 0])}, r"stride=\(0, 0\) is out of range"),
        ({"fc___extra_state": _record("fc", hidden_features=17)}, r"structured channels \(c\)=17 is out of range"),
        ({"stem__weight": [[0.0]]}, r"'stem.weight': expected a tensor of shape \(8, 3, 3, 3\), got list"),
        ({"bn__running_var": torch.ones(8, device="meta")}, "'bn.running_var': a tensor on the meta device"),
    ],
)
def test_the_hook_never_half_loads(changes, match):
    # The first entries of the state dict (stem, BatchNorm) used to load before a later record was refused.
    model = _dense()
    install_restructure_hook(model)
    stem, running_mean = model.stem.weight.detach().clone(), model.bn.running_mean.clone()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(_state(**changes))
    assert torch.equal(model.stem.weight, stem) and torch.equal(model.bn.running_mean, running_mean)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    "record,match",
    [
        ("junk", "'junk' is not the structure record of the GhostConv2d there"),
        ({}, "{} is not the structure record of the GhostConv2d there"),
        ([8, 11], r"\[8, 11\] is not the structure record of the GhostConv2d there"),
        ({"in_channels": 8}, "{'in_channels': 8} is not the structure record of the GhostConv2d there"),
        ({"kind": "GhostConv2d"}, "cannot rebuild GhostConv2d: version=None is not an int"),
        ({"kind": None}, "unknown structure kind None"),
        # Equal to the model's own record to Python (True == 1), so nothing to rebuild, but not a valid record.
        (_record("ghost", version=True), "cannot rebuild GhostConv2d: version=True is not an int"),
        (
            _record("ghost", permuted=1),
            "cannot rebuild GhostConv2d: permuted=1 is not a bool; valid values are True and False",
        ),
    ],
)
def test_what_is_not_the_record_of_a_cheap_module_is_refused(record, match):
    # Into a model of the same structure: restructure has nothing to rebuild, and set_extra_state used to refuse
    # the record only after the tensors before it had loaded.
    message = _refused(_state(ghost___extra_state=record), "hook", _saved)
    assert "'ghost._extra_state':" in message
    assert re.search(match, message), message


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bias", False, r"'ghost.primary_conv.bias': unexpected key; the GhostConv2d at 'ghost'"),
        ("permuted", False, r"'ghost.output_index': unexpected key; the GhostConv2d at 'ghost'"),
    ],
)
def test_tensors_a_record_does_not_describe_are_refused_even_non_strict(field, value, match):
    with pytest.raises(ValueError, match=match):
        restructure(_dense(), _state(ghost___extra_state=_record("ghost", **{field: value})), strict=False)


# ----------------------------------------------------------------------------- the record format and its rules


def test_record_format_is_unchanged():
    # Checkpoints written by earlier versions must keep loading: every kind's fields, in order.
    expected = {
        GhostConv2d: "in_channels out_channels kernel_size stride padding dilation bias ratio dw_size padding_mode "
        "norm_layer act_layer permuted",
        StructuredConv2d: "in_channels out_channels kernel_size stride padding dilation groups bias padding_mode "
        "hidden_channels hidden_kernel_size pooling",
        FusedGhostConv2d: "in_channels out_channels kernel_size stride padding dilation ratio dw_size padding_mode "
        "permuted",
        StructuredLinear: "in_features out_features bias hidden_features",
        FusedConv2d: "in_channels out_channels kernel_size stride padding dilation groups bias padding_mode",
        FoldedBatchNorm: "num_features",
        SqueezeExcite: "channels se_ratio divisor act_layer gate_layer",
    }
    for cls, fields in expected.items():
        assert cls.record_fields() == tuple(fields.split())
    for module in (GhostConv2d(4, 6, 3), StructuredLinear(4, 2), FusedConv2d(2, 4, 1), SqueezeExcite(8)):
        record = decode_record(module.get_extra_state())
        assert list(record) == ["kind", "version", *type(module).record_fields()]
    literal = {  # as a GhostConv2d of version 1 writes it
        "kind": "GhostConv2d",
        "version": 1,
        "in_channels": 4,
        "out_channels": 6,
        "kernel_size": [3, 3],
        "stride": [1, 1],
        "padding": [1, 1],
        "dilation": [1, 1],
        "bias": False,
        "ratio": 3,
        "dw_size": 3,
        "padding_mode": "zeros",
        "norm_layer": "BatchNorm2d",
        "act_layer": "ReLU",
        "permuted": True,
    }
    ghost = build_from_record(literal)
    assert isinstance(ghost, GhostConv2d) and ghost.ratio == 3 and ghost.norm_name == "BatchNorm2d"
    ghost.set_extra_state(literal)  # its own record, in list form


_GHOST = GhostConv2d(4, 6, 3, padding=1).structure_record()
_STRUCTURED = StructuredConv2d(4, 6, 3, padding=1, hidden_channels=2).structure_record()


@pytest.mark.parametrize(
    "record,match",
    [
        ({**_GHOST, "version": 0}, r"version=0 is out of range; valid range is 1\.\.1"),
        ({**_GHOST, "version": True}, r"version=True is not an int"),
        ({k: v for k, v in _GHOST.items() if k != "version"}, r"version=None is not an int"),
        ({**_GHOST, "version": 2}, "record version 2 is newer than this library's"),
        ({**_GHOST, "kernel_size": 3}, r"kernel_size=3 is not the canonical form .* records kernel_size=\(3, 3\)"),
        (
            {**_GHOST, "in_channels": True},
            r"in_channels=True is not an int; valid range is 1\.\.9223372036854775807 \(an int\)",
        ),
        ({**_GHOST, "in_channels": 4.0}, "in_channels=4.0 is not an int"),
        ({**_GHOST, "out_channels": -6}, "out_channels=-6 is out of range"),
        ({**_GHOST, "padding": [-1, 1]}, r"padding=\(-1, 1\) is out of range; each side must be in 0\.\."),
        ({**_GHOST, "padding": "half"}, "padding='half' is not valid; valid values are 'same' and 'valid'"),
        ({**_GHOST, "stride": [2, 2], "padding": "same"}, "padding='same' needs stride 1"),
        (
            {**_GHOST, "kernel_size": [3, 3, 3]},
            r"kernel_size=\(3, 3, 3\) is not an int or a pair of ints; .*\(an int, or a pair of ints\)",
        ),
        ({**_GHOST, "bias": 1}, "bias=1 is not a bool; valid values are True and False"),
        ({**_GHOST, "permuted": "yes"}, "permuted='yes' is not a bool"),
        ({**_GHOST, "padding_mode": "mirror"}, "padding_mode='mirror' is not valid; valid values are 'zeros', "),
        ({**_GHOST, "ratio": 1}, r"ratio=1 is out of range; valid range is >= 2 \(an int\)"),
        ({**_GHOST, "dw_size": 4}, "dw_size=4 is out of range"),
        ({**_GHOST, "norm_layer": "__class__"}, "norm_layer='__class__' is not valid; valid values are None and"),
        ({**_GHOST, "norm_layer": "functional"}, "norm_layer='functional' is not valid"),
        ({**_GHOST, "norm_layer": "LazyBatchNorm2d"}, "norm_layer='LazyBatchNorm2d' is not valid"),
        ({**_GHOST, "act_layer": "Linear"}, "cannot rebuild GhostConv2d: .*Linear"),
        ({**_STRUCTURED, "hidden_channels": 5}, r"structured channels \(c\)=5 is out of range; valid range is 1\.\.4"),
        ({**_STRUCTURED, "hidden_kernel_size": [0, 2]}, r"hidden_kernel_size=\(0, 2\) is out of range"),
        (
            {**_STRUCTURED, "hidden_kernel_size": [2.5, 2]},
            r"hidden_kernel_size=\(2\.5, 2\) is not an int or a pair of ints",
        ),
        ({**_STRUCTURED, "groups": 3}, "must both be divisible by groups=3"),
        ({**_STRUCTURED, "in_channels": 10**30, "out_channels": 10**30}, "cannot rebuild StructuredConv2d: "),
        ({**FusedConv2d(2, 4, 3).structure_record(), "stride": 0}, "stride=0 is out of range"),
        ({**StructuredLinear(4, 2).structure_record(), "bias": None}, "bias=None is not a bool"),
        ({**FoldedBatchNorm(4).structure_record(), "num_features": 0}, "num_features=0 is out of range"),
    ],
)
def test_build_from_record_refuses_by_the_constructors_rules(record, match):
    with pytest.raises(ValueError, match=match) as info:
        build_from_record(record, "state dict key 'x._extra_state'", device="meta")
    assert str(info.value).startswith("state dict key 'x._extra_state': cannot rebuild ")


def test_build_from_record_on_meta_allocates_nothing():
    record = {**_GHOST, "in_channels": 10**5, "out_channels": 10**5}
    with _LargestAllocation() as allocations:
        ghost = build_from_record(record, device="meta")
    assert ghost.primary.weight.shape == (50_000, 10**5, 3, 3) and ghost.primary.weight.is_meta
    assert allocations.largest == 0


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: GhostConv2d(4, 6, 3, stride=0), r"GhostConv2d: stride=0 is out of range; each side must be in 1\.\."),
        (lambda: GhostConv2d(4, 6, 3, dilation=(1, 0)), r"dilation=\(1, 0\) is out of range"),
        (lambda: GhostConv2d(4, 6, 3, padding=-1), r"padding=-1 is out of range; each side must be in 0\.\."),
        (lambda: GhostConv2d(4, 6, 3, bias=None), "bias=None is not a bool"),
        (lambda: StructuredConv2d(4, 6, 3, padding=(1, -1)), r"padding=\(1, -1\) is out of range"),
        (lambda: StructuredConv2d(4, 6, 3, stride=True), "stride=True is not an int or a pair of ints"),
        (lambda: StructuredLinear(4, 2, bias="no"), "bias='no' is not a bool"),
        (lambda: FusedConv2d(4, 6, 3, dilation=0), "FusedConv2d: dilation=0 is out of range"),
    ],
)
def test_constructors_refuse_what_nn_conv2d_accepts_but_cannot_run(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_check_conv_args_normalizes():
    args = check_conv_args("c", 4, 6, 3, [2, 1], 0, 1, 2, True, "zeros")
    assert args == (4, 6, (3, 3), (2, 1), (0, 0), (1, 1), 2, True, "zeros")
    assert (args.kernel_size, args.stride, args.padding, args.dilation) == ((3, 3), (2, 1), (0, 0), (1, 1))
    assert check_conv_args("c", 4, 6, (1, 3), 1, "same", 2, 1, False, "reflect").padding == "same"
    # numpy ints are accepted but stored as plain ints: a record holds primitives, so it loads with weights_only.
    args = check_conv_args(
        "c", np.int64(4), np.int64(6), np.int64(3), 1, (np.int64(1), 1), 1, np.int32(2), True, "zeros"
    )
    assert all(type(v) is int for v in (args.in_channels, args.out_channels, args.groups, *args.kernel_size))
    assert all(type(v) is int for v in (*args.padding, *args.stride, *args.dilation))


@pytest.mark.parametrize(
    "module",
    [
        lambda: GhostConv2d(np.int64(4), np.int64(6), 3, ratio=np.int64(3), dw_size=np.int64(3)),
        lambda: StructuredConv2d(np.int64(4), np.int64(6), 3, groups=np.int64(2)),
        lambda: StructuredLinear(np.int64(4), np.int64(2)),
        lambda: FusedConv2d(np.int64(2), np.int64(4), 1),
        lambda: FoldedBatchNorm(np.int64(4)),
        lambda: SqueezeExcite(np.int64(8)),
    ],
)
def test_records_of_modules_built_from_numpy_ints_hold_plain_ints(module):
    built = module()
    buffer = io.BytesIO()
    torch.save(built.get_extra_state(), buffer)
    buffer.seek(0)
    loaded = decode_record(torch.load(buffer, weights_only=True))
    assert records_equal(loaded, built.structure_record())
    assert all(type(v) is not np.int64 for v in built.structure_record().values())


# ----------------------------------------------------------------------------- any edit of a state dict

_RECORD_PATHS = ("ghost", "ghost_bn", "structured", "fc")
_FIELDS = sorted({f for p in _RECORD_PATHS for f in _SAVED[f"{p}._extra_state"]} | {"device", "bogus"})
# Padding, stride and dilation are the checkpoint's to choose (no tensor shows them); large ones are valid records
# whose forward needs a larger input than any test's, so they are drawn small, and the forward sees 64 x 64 pixels
# (three layers strided by 3, one dilated by 3 and unpadded, still leave one pixel).
_BIG_X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
_GEOMETRY = ("padding", "stride", "dilation")
_SMALL = st.one_of(st.integers(-2, 3), st.lists(st.integers(-2, 3), max_size=3), st.sampled_from(["same", "valid"]))
_ANY = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([10**7, 10**9, 2**62, 10**30]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["meta", "same", "reflect", "circular", "BatchNorm2d", "ReLU", "Identity", "Linear", "Bogus"]),
    st.sampled_from(["GhostConv2d", "StructuredConv2d", "StructuredLinear", "FusedConv2d", "__class__"]),
    st.lists(st.integers(-2, 2**40), max_size=3),
)


@st.composite
def _record_edit(draw):
    path, field = draw(st.sampled_from(_RECORD_PATHS)), draw(st.sampled_from(_FIELDS))
    if draw(st.booleans()) and field in _SAVED[f"{path}._extra_state"]:
        return ("drop field", path, field, None)
    return ("set field", path, field, draw(_SMALL if field in _GEOMETRY else _ANY))


_INDEX_EDITS = ("permute", "duplicate", "out of range", "float", "reshape", "truncate")
_TENSOR_EDITS = ("drop", "grow", "add a dim", "not a tensor", "meta", "scalar")

_edit = st.one_of(
    _record_edit(),
    st.tuples(st.just("index"), st.sampled_from(_INDEX_EDITS), st.integers(0, 10), st.integers(0, 10)),
    st.tuples(st.just("tensor"), st.sampled_from(_TENSOR_EDITS), st.sampled_from(sorted(_SAVED)), st.none()),
)


def _has_values(value) -> bool:
    """A tensor with elements to read: an earlier edit may have moved it to meta or truncated it to nothing."""
    return isinstance(value, torch.Tensor) and not value.is_meta and value.numel() > 0


def _edited(edits) -> dict:
    state = dict(_SAVED)
    for kind, a, b, c in edits:
        if kind in ("set field", "drop field"):
            key = f"{a}._extra_state"
            record = dict(state[key]) if isinstance(state.get(key), dict) else {}
            if kind == "drop field":
                record.pop(b, None)
            else:
                record[b] = c
            state[key] = record
        elif kind == "index" and _has_values(state.get("ghost.output_index")):
            index = state["ghost.output_index"].flatten().clone()  # an earlier edit may have reshaped it
            if a == "permute":
                index = index[torch.randperm(index.numel(), generator=torch.Generator().manual_seed(b))]
            elif a == "duplicate" and index.numel() > 1 and b % index.numel() != c % index.numel():
                index[b % index.numel()] = index[c % index.numel()]
            elif a == "out of range" and index.numel():
                index[b % index.numel()] = 12 if c % 2 else -1
            elif a == "float":
                index = index.float()
            elif a == "reshape":
                index = index.unsqueeze(0)
            elif a == "truncate":
                index = index[: b % max(index.numel(), 1)]
            state["ghost.output_index"] = index
        elif kind == "tensor" and b in state:
            value = state[b]
            if a == "drop":
                del state[b]
            elif not _has_values(value):
                continue
            elif a == "grow" and value.dim() > 0:
                state[b] = torch.cat([value, value[:1]])
            elif a == "add a dim":
                state[b] = value.unsqueeze(-1)
            elif a == "not a tensor":
                state[b] = value.tolist()
            elif a == "meta":
                state[b] = value.to("meta")
            elif a == "scalar":
                state[b] = value.flatten()[0].clone()
    return state


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(_edit, min_size=1, max_size=3), how=st.sampled_from(["restructure", "hook"]))
def test_any_edit_is_refused_cleanly_or_loads_a_working_model(edits, how):
    state = _edited(edits)
    model = _dense()
    snapshot = _snapshot(model)
    try:
        _load(model, state, how)
    except ValueError:
        _assert_unchanged(model, snapshot)
        return
    with torch.no_grad():
        out = model(_BIG_X)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
