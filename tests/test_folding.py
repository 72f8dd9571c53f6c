"""BatchNorm folding into Ghost modules (exact, :class:`FusedGhostConv2d`), in half precision, and Ghost modules'
own output permutations moved into their weights; the lean Ghost export (no Slice, no Gather where exact)."""

from __future__ import annotations

import copy

import pytest
import torch
from nets import randomize_bn
from torch import nn

import lightning_cheapconv.deploy.folding as folding
from lightning_cheapconv import GhostConv2d, StructuredConv2d, convert_to_ghost, get_model, restructure
from lightning_cheapconv.deploy import FoldedBatchNorm, fold_batchnorm, fold_ghost_permutations, relative_difference
from lightning_cheapconv.nn import FusedGhostConv2d, build_from_record

pytestmark = pytest.mark.usefixtures("one_thread")


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def random_ghost(out_channels: int, ratio: int, dw_size: int, bias: bool, permuted: bool, seed: int = 0) -> GhostConv2d:
    """A conv-only Ghost module with random weights (and biases), and a random output permutation if asked."""
    torch.manual_seed(seed)
    ghost = GhostConv2d(5, out_channels, 3, padding=1, bias=bias, ratio=ratio, dw_size=dw_size)
    with torch.no_grad():
        for p in ghost.parameters():
            p.uniform_(-1, 1)
    if permuted:
        ghost.set_output_index(torch.randperm(ghost.intrinsic_channels * ratio)[:out_channels])
    return ghost.eval()


# ----------------------------------------------------------------------------------------------- exact Ghost fold


@pytest.mark.parametrize("dw_size", [1, 3, 5])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("out_channels", "ratio"), [(12, 2), (7, 2), (10, 3)])
def test_batchnorm_folds_exactly_into_ghost_modules(dw_size, permuted, bias, out_channels, ratio):
    ghost = random_ghost(out_channels, ratio, dw_size, bias, permuted)
    model = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(out_channels), nn.ReLU()))
    x = torch.randn(2, 5, 7, 7)
    expected, elsewhere = run(model, x), torch.randn(1, 5, 11, 4)  # exact on every input, not just the example
    expected_elsewhere = run(model, elsewhere)
    folds = fold_batchnorm(model, x)
    assert [f.applied for f in folds] == [True] and folds[0].detail.startswith("exact: scale into both convs")
    assert isinstance(model[1], FoldedBatchNorm)
    assert type(model[0]) is (GhostConv2d if dw_size == 1 else FusedGhostConv2d)
    assert model[0].structure_record()["permuted"] is permuted
    assert relative_difference(run(model, x), expected) < 1e-6
    assert relative_difference(run(model, elsewhere), expected_elsewhere) < 1e-6


def test_zero_intrinsic_shift_folds_into_a_plain_ghost_module():
    ghost = random_ghost(12, 2, 3, False, True)
    model = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(12)))
    with torch.no_grad():  # bn(x) = scale * x on the intrinsic channels: nothing for the padding to distort
        bn, intrinsic = model[1], ghost.output_index < ghost.intrinsic_channels
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        bn.bias[intrinsic] = bn.running_mean[intrinsic] * scale[intrinsic]
    x = torch.randn(2, 5, 9, 9)
    expected = run(model, x)
    assert fold_batchnorm(model, x)[0].applied
    assert type(model[0]) is GhostConv2d and model[0].primary.bias is not None
    assert relative_difference(run(model, x), expected) < 1e-6


def test_ghost_module_with_its_own_norm_is_not_folded():
    ghost = GhostConv2d(4, 8, 1, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU)
    model = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(8)))
    folds = fold_batchnorm(model, torch.randn(1, 4, 5, 5))
    assert [f.applied for f in folds] == [False] and "own norm/activation" in folds[0].detail
    assert isinstance(model[1], nn.BatchNorm2d)


def test_a_second_batchnorm_folds_into_a_fused_ghost_module():
    ghost = random_ghost(8, 2, 3, True, True)
    first = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(8)), seed=1)
    x = torch.randn(2, 5, 6, 6)
    fold_batchnorm(first, x)
    assert type(first[0]) is FusedGhostConv2d and bool(first[0].intrinsic_bias.abs().min() > 0)
    model = randomize_bn(nn.Sequential(first[0], nn.BatchNorm2d(8)), seed=2)
    expected = run(model, x)
    folds = fold_batchnorm(model, x)  # its intrinsic_bias is scaled and shifted
    assert [f.applied for f in folds] == [True] and type(model[0]) is FusedGhostConv2d
    assert relative_difference(run(model, x), expected) < 1e-6


def test_ghost_resnet20_folds_every_batchnorm_and_restructures():
    torch.manual_seed(0)
    model = randomize_bn(get_model("resnet20", num_classes=10))
    convert_to_ghost(model)  # inherited weights: permuted outputs
    x = torch.randn(2, 3, 32, 32)
    expected = run(model, x)
    folds = fold_batchnorm(model, x)
    assert len(folds) == 19 and all(f.applied for f in folds)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(type(m) is FusedGhostConv2d for m in model.modules()) == 18
    assert relative_difference(run(model, x), expected) < 1e-5

    fresh = get_model("resnet20", num_classes=10)  # dense: restructure rebuilds the fused Ghost modules
    state = model.state_dict()
    restructure(fresh, state)
    fresh.load_state_dict(state)
    assert type(fresh.layer1[0].conv1) is FusedGhostConv2d and isinstance(fresh.layer1[0].bn1, FoldedBatchNorm)
    assert torch.equal(run(fresh, x), run(model, x))


def test_fused_ghost_module_record_and_errors():
    fused = FusedGhostConv2d(4, 6, 3, padding=1, dw_size=5, permuted=True)
    record = fused.structure_record()
    assert record["kind"] == "FusedGhostConv2d" and "bias" not in record and "norm_layer" not in record
    rebuilt = build_from_record(record)
    assert type(rebuilt) is FusedGhostConv2d and rebuilt.intrinsic_bias.shape == (3,)
    with pytest.raises(ValueError, match="FusedGhostConv2d: dw_size=2"):
        FusedGhostConv2d(4, 6, 3, dw_size=2)
    with pytest.raises(ValueError, match="FusedGhostConv2d: stride=0"):
        FusedGhostConv2d(4, 6, 3, stride=0)


# ----------------------------------------------------------------------------------------------- half precision


def half_models() -> dict[str, nn.Module]:
    """Three conv+BatchNorm pairs (dense, and with a structured middle conv), and a Ghost ResNet-20 (19 pairs)."""
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8),
    )  # fmt: skip
    structured = copy.deepcopy(dense)
    structured[3] = StructuredConv2d.from_dense(structured[3], hidden_channels=8, hidden_kernel_size=2)
    ghost = get_model("resnet20", num_classes=10)
    convert_to_ghost(ghost)
    return {"dense": randomize_bn(dense), "structured": randomize_bn(structured), "ghost": randomize_bn(ghost)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "structured", "ghost"])
def test_half_precision_models_fold_within_their_own_rounding(dtype, kind):
    model = half_models()[kind].to(dtype).eval()
    x = torch.randn(2, 3, 16, 16)
    reference = run(model.double(), x.double())  # the half model's weights, computed exactly
    model.to(dtype)
    own = relative_difference(run(model, x.to(dtype)), reference)
    folds = fold_batchnorm(model, x)
    assert folds and all(f.applied for f in folds), [f.detail for f in folds if not f.applied]
    assert all("rounding of the unfolded pair" in f.detail for f in folds)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert next(model.parameters()).dtype == dtype
    assert relative_difference(run(model, x.to(dtype)), reference) <= folding.HALF_ERROR_FACTOR * own


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fold_that_is_wrong_is_refused(dtype, monkeypatch):
    plain = folding._fuse_plain

    def wrong(conv, bn):  # a fold that forgets 10% of the BatchNorm's shift
        fused = plain(conv, bn)
        with torch.no_grad():
            fused.bias.mul_(0.9)
        return fused

    monkeypatch.setattr(folding, "_fuse_plain", wrong)
    model = half_models()["dense"].to(dtype)
    folds = fold_batchnorm(model, torch.randn(2, 3, 16, 16))
    assert folds and not any(f.applied for f in folds)
    assert all(f.detail.startswith(f"not exact in {str(dtype)[6:]}") for f in folds)


# ----------------------------------------------------------------------------------------------- own permutation


@pytest.mark.parametrize(("out_channels", "ratio"), [(8, 2), (7, 2), (12, 3), (11, 3)])
@pytest.mark.parametrize("fused", [False, True])
def test_permutation_that_reorders_intrinsics_with_their_ghosts_moves_into_the_weights(out_channels, ratio, fused):
    ghost = random_ghost(out_channels, ratio, 3, True, False)
    if fused:
        model = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(out_channels)))
        fold_batchnorm(model, torch.randn(1, 5, 6, 6))
        ghost = model[0]
        assert type(ghost) is FusedGhostConv2d
    m, per = ghost.intrinsic_channels, ratio - 1
    order = torch.randperm(m)
    ghosts = torch.cat([torch.randperm(per) + per * i for i in order.tolist()])  # each intrinsic's ghosts, any order
    ghost.set_output_index(torch.cat([order, m + ghosts[: out_channels - m]]))
    model = nn.Sequential(ghost, nn.ReLU(), nn.AdaptiveAvgPool2d(1))  # nothing after it could absorb a permutation
    x = torch.randn(2, 5, 6, 6)
    expected = run(model, x)
    folds = fold_ghost_permutations(model, x)
    assert [(f.kind, f.source, f.target, f.applied) for f in folds] == [("permutation", "0", "0", True)]
    assert model[0].output_index is None and type(model[0]) is type(ghost)
    assert relative_difference(run(model, x), expected) < 1e-6


@pytest.mark.parametrize(
    "index",
    [[4, 0, 1, 2, 3, 5, 6, 7], [1, 0, 2, 3, 4, 5, 6, 7]],
    ids=["a ghost among the intrinsics", "intrinsics reordered without their ghosts"],
)
def test_permutation_that_mixes_intrinsics_and_ghosts_stays(index):
    ghost = random_ghost(8, 2, 3, False, False)
    ghost.set_output_index(torch.tensor(index))
    model = nn.Sequential(ghost, nn.AdaptiveAvgPool2d(1))
    folds = fold_ghost_permutations(model, torch.randn(1, 5, 6, 6))
    assert [f.applied for f in folds] == [False] and model[0].output_index is not None
    assert "undone" not in folds[0].detail  # refused up front, not only caught by the whole-model check


# ----------------------------------------------------------------------------------------------- lean export


def exported_ops(module: nn.Module, x: torch.Tensor) -> list[str]:
    program = torch.export.export(module.eval(), (x,))
    return [str(n.target).split(".")[1] for n in program.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(("out_channels", "slices"), [(8, 0), (7, 1)])
def test_unpermuted_ghost_exports_one_concat_and_slices_only_what_it_drops(out_channels, slices):
    ghost = random_ghost(out_channels, 2, 3, False, False)
    x = torch.randn(1, 5, 6, 6)
    ops = exported_ops(ghost, x)
    assert ops.count("cat") == 1 and ops.count("slice") == slices and "index_select" not in ops
    program = torch.export.export(ghost, (x,))
    if slices:  # the slice cuts the depthwise conv's output (the dropped ghost), not the concatenation
        cat = next(n for n in program.graph.nodes if "cat" in str(n.target))
        assert "slice" in str(cat.args[0][1].target)
    assert torch.equal(program.module()(x), run(ghost, x))


def test_fused_ghost_exports_an_add_and_no_batchnorm():
    ghost = random_ghost(8, 2, 3, False, True)
    model = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(8)))
    x = torch.randn(1, 5, 6, 6)
    assert "batch_norm" in exported_ops(model, x)
    fold_batchnorm(model, x)
    ops = exported_ops(model, x)
    assert sorted(ops) == ["add", "cat", "conv2d", "conv2d", "index_select", "view"]
