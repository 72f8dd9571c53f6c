"""Deployment: per-layer form choice, BatchNorm and permutation folding, restructure of optimized models, the CLI.

Timings are never asserted: where a test needs a particular choice, it replaces the timer with one
that returns fixed latencies, so the choice logic itself is what is tested.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from nets import randomize_bn
from rich.console import Console
from torch import nn

import lightning_cheapconv.deploy.optimize as deploy_optimize  # monkeypatched: it looks up time_interleaved, _form_key
from lightning_cheapconv import (
    GhostConv2d,
    ImageClassifier,
    StructuredConv2d,
    convert_to_ghost,
    decompose_structured,
    get_model,
    restructure,
)
from lightning_cheapconv.cli import main, parse_input_shape
from lightning_cheapconv.complexity import format_count
from lightning_cheapconv.deploy import (
    FoldedBatchNorm,
    FusedConv2d,
    InferenceReport,
    Latency,
    compile_for_inference,
    fold_batchnorm,
    fold_ghost_permutations,
    optimize_for_inference,
    relative_difference,
    time_interleaved,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"repeats": 1, "min_time": 0.0, "warmup": 0}


def converted(arch: str, method: str, num_classes: int = 10, init: str = "inherit") -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(get_model(arch, num_classes=num_classes))
    if method == "ghost":
        convert_to_ghost(model, init=init)
    else:
        decompose_structured(model)
    return model.eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


class FixedTimer:
    """Stands in for ``time_interleaved``: runs each candidate once, returns latencies from ``pick(name)``."""

    def __init__(self, pick: Callable[[str], float]) -> None:
        self.pick = pick
        self.calls: list[list[str]] = []

    def __call__(self, candidates: Mapping[str, Callable[[], Any]], *args: Any, **kwargs: Any) -> dict[str, Latency]:
        self.calls.append(list(candidates))
        with torch.inference_mode():
            for fn in candidates.values():
                fn()
        return {name: Latency((self.pick(name),)) for name in candidates}


# ----------------------------------------------------------------------------------------------- form selection


@pytest.mark.parametrize(
    ("arch", "shape", "method", "init"),
    [
        ("resnet56", (2, 3, 32, 32), "ghost", "inherit"),
        ("resnet56", (2, 3, 32, 32), "structured", "inherit"),
        ("resnet18", (1, 3, 64, 64), "ghost", "random"),
        ("resnet18", (1, 3, 64, 64), "structured", "inherit"),
    ],
)
def test_optimized_model_matches_and_reports_every_cheap_layer(arch, shape, method, init):
    model = converted(arch, method, init=init)
    x = torch.randn(shape)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    expected = run(model, x)

    report = optimize_for_inference(model, x, **FAST)

    assert isinstance(report, InferenceReport)
    assert relative_difference(run(report.model, x), expected) < 1e-4
    assert not report.model.training
    # The input model is untouched (the optimizer works on a copy).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    cheap = [n for n, m in model.named_modules() if isinstance(m, (GhostConv2d, StructuredConv2d))]
    assert [row.name for row in report.layers] == cheap
    for row in report.layers:
        assert row.input_shape is not None and row.input_shape[0] == shape[0]
        if method == "structured":
            forms = set(deploy_optimize.layer_forms(model.get_submodule(row.name)))
            assert set(row.times_ms) == forms and "dense" in forms and len(forms) >= 2
            assert all(row.macs["dense"] > row.macs[form] for form in forms - {"dense"})
        else:
            assert "ghost" in row.times_ms
        assert row.chosen in row.times_ms
    assert report.latency_before_ms == report.configurations["as given"]
    assert report.latency_after_ms == min(report.configurations.values())
    assert report.model is not model
    assert report.summary.startswith("On cpu")
    assert report.macs_before > 0 and report.macs_after > 0


def test_choice_keeps_the_faster_form_per_layer_and_records_it(monkeypatch):
    model = converted("resnet20", "structured")
    x = torch.randn(2, 3, 32, 32)
    names = [n for n, m in model.named_modules() if isinstance(m, StructuredConv2d)]
    fast_decomposed = set(names[::2])  # every other layer is faster decomposed, in its last decomposed form
    winner = [f for f in deploy_optimize.layer_forms(model.get_submodule(names[0])) if f != "dense"][-1]
    current: dict[str, str] = {}

    def pick(form: str) -> float:
        if form == "dense":
            return 2.0 if current["layer"] in fast_decomposed else 1.0
        if form.startswith("decomposed"):
            return 1.0 if form == winner and current["layer"] in fast_decomposed else 3.0
        return {"optimized": 1.0, "as given": 3.0, "all dense": 2.0}[form]

    # Tell the fake timer which layer it is timing: _time_layers visits the layers in this order.
    order = iter(names)

    def timer(candidates, *args, **kwargs):
        if "dense" in candidates:
            current["layer"] = next(order)
        return FixedTimer(pick)(candidates)

    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    monkeypatch.setattr(deploy_optimize, "_form_key", lambda module, seen, device: id(module))  # no shared measurements
    report = optimize_for_inference(model, x, **FAST)

    assert report.chosen_configuration == "optimized"
    chosen = {row.name: row.chosen for row in report.layers}
    assert chosen == {n: winner if n in fast_decomposed else "dense" for n in names}
    for name in names:
        layer = report.model.get_submodule(name)
        if name in fast_decomposed:
            assert type(layer) is StructuredConv2d and layer.bias is not None  # BatchNorm folded into alpha
            # The sum-pool form that won is set on the layer (so it is in its structure record).
            assert winner == "decomposed" or winner == f"decomposed/{layer.structure_record()['pooling']}"
        else:
            assert type(layer) is FusedConv2d  # dense, with its BatchNorm folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in report.model.modules())
    assert report.cheap_form_won is True
    assert "No cheap form was faster anywhere" not in report.summary
    assert relative_difference(run(report.model, x), run(model, x)) < 1e-4


def test_says_when_no_cheap_form_wins(monkeypatch):
    model = converted("resnet20", "structured")
    timer = FixedTimer(lambda form: {"decomposed": 2.0, "dense": 1.0, "as given": 3.0, "optimized": 1.0}.get(form, 5))
    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    report = optimize_for_inference(model, torch.randn(1, 3, 32, 32), **FAST)
    assert all(row.chosen == "dense" for row in report.layers)
    assert not any(isinstance(m, StructuredConv2d) for m in report.model.modules())
    assert report.cheap_form_won is False
    assert "No cheap form was faster anywhere" in report.summary
    # Every structured layer dense already: no separate all-dense candidate is timed.
    assert set(timer.calls[-1]) == {"as given", "optimized"}


@pytest.mark.parametrize("winner", ["as given", "all dense"])
def test_falls_back_when_the_per_layer_choice_is_slower_as_a_whole(monkeypatch, winner):
    model = converted("resnet20", "structured")
    x = torch.randn(1, 3, 32, 32)
    whole = {"as given": 3.0, "optimized": 2.0, "all dense": 2.5, winner: 1.0}
    timer = FixedTimer(lambda form: 1.0 if form.startswith("decomposed") else {"dense": 2.0, **whole}[form])
    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    report = optimize_for_inference(model, x, **FAST)
    assert report.chosen_configuration == winner
    assert report.latency_after_ms == 1.0 and report.latency_before_ms == whole["as given"]
    if winner == "as given":
        assert "returned unchanged" in report.summary
        assert report.folds == []
        assert sum(isinstance(m, StructuredConv2d) for m in report.model.modules()) == 18
        # The table still shows each layer's MAC ratio, and no fold note reads as if it were applied.
        console = Console(width=400, record=True, file=io.StringIO())
        console.print(report.table())
        text = console.export_text()
        layer_rows = [line for line in text.splitlines() if "layer1.0.conv1" in line]
        assert layer_rows and "×" in layer_rows[0] and "not applied" in layer_rows[0]
    else:
        assert "beat the per-layer choice" in report.summary
        assert not any(isinstance(m, StructuredConv2d) for m in report.model.modules())
        assert report.macs_after > report.macs_before  # the summary says what the fallback costs in MACs
        ratio = report.macs_after / report.macs_before
        assert (
            f"MACs for this input against {format_count(report.macs_before)} as given ({ratio:.2f}×)" in report.summary
        )
    assert relative_difference(run(report.model, x), run(model, x)) < 1e-4


def test_ghost_model_compared_with_its_original(monkeypatch):
    torch.manual_seed(0)
    original = randomize_bn(get_model("resnet20", 10))
    model = converted("resnet20", "ghost")
    monkeypatch.setattr(deploy_optimize, "time_interleaved", FixedTimer(lambda f: 0.5 if f == "original" else 1.0))
    report = optimize_for_inference(model, torch.randn(1, 3, 32, 32), original=original, **FAST)
    assert report.chosen_configuration == "original"
    assert not any(isinstance(m, GhostConv2d) for m in report.model.modules())
    assert "No cheap form was faster anywhere" in report.summary
    x = torch.randn(1, 3, 32, 32)
    assert relative_difference(run(report.model, x), run(original, x)) < 1e-5

    monkeypatch.setattr(deploy_optimize, "time_interleaved", FixedTimer(lambda f: 2.0 if f == "original" else 1.0))
    report = optimize_for_inference(model, torch.randn(1, 3, 32, 32), original=original, **FAST)
    assert report.chosen_configuration in ("as given", "optimized")
    assert report.cheap_form_won is True
    assert "beat the original dense model (BatchNorm folded, 2.000 ms) as a whole: 2.00× faster" in report.summary
    assert "MACs, batch 1" in [column.header for column in report.table().columns]


@pytest.mark.parametrize("noisy", [True, False])
def test_summary_says_when_whole_model_timings_were_noisy(monkeypatch, noisy):
    """IQR / median of the 'as given' samples (1, 1, 1, 2, 2): 1.0 (quartiles 1 and 2), or 0 for equal samples."""
    model = converted("resnet20", "structured")

    def timer(candidates: Mapping[str, Callable[[], Any]], *args: Any, **kwargs: Any) -> dict[str, Latency]:
        with torch.inference_mode():
            for fn in candidates.values():
                fn()
        samples = (1.0, 1.0, 1.0, 2.0, 2.0) if noisy else (1.0,) * 5
        return {name: Latency(samples if name == "as given" else (1.0,) * 5) for name in candidates}

    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    report = optimize_for_inference(model, torch.randn(1, 3, 32, 32), **FAST)
    sentence = "The whole-model timings were noisy (IQR 100% of the median for 'as given'; above 20% for 1 of "
    assert (sentence in report.summary) is noisy
    assert ("time on an idle machine or raise repeats=" in report.summary) is noisy


def test_report_table_and_dict():
    model = converted("resnet20", "structured")
    report = optimize_for_inference(model, torch.randn(1, 3, 32, 32), **FAST)
    table = report.table()
    headers = [c.header for c in table.columns]
    forms = list(deploy_optimize.layer_forms(model.get_submodule(report.layers[0].name)))
    assert headers[: 3 + len(forms)] == ["layer", "type", "input", *(f"{form} ms" for form in forms)]
    assert forms[-1] == "dense" and all(form.startswith("decomposed") for form in forms[:-1])
    assert table.row_count == len(report.layers) + len(report.configurations)
    data = report.to_dict()
    assert data["chosen_configuration"] == report.chosen_configuration
    assert len(data["layers"]) == 18 and data["summary"] == report.summary
    from rich.console import Console

    console = Console(record=True, width=200)
    report.print(console=console)
    text = console.export_text()
    assert "Inference forms on cpu" in text and "model: as given" in text and report.summary[:40] in text
    piped = Console(file=io.StringIO(), width=80)  # a log file or pipe: the table at its full width, not wrapped
    report.print(console=piped)
    full = console.measure(report.table(), options=console.options.update(width=10_000)).maximum
    rows = [line for line in piped.file.getvalue().splitlines() if line.startswith("│")]
    assert len(rows) >= len(report.layers) and max(len(line) for line in rows) == full > 80


def test_time_interleaved_runs_every_candidate():
    counts = {"a": 0, "b": 0}

    def bump(name: str) -> Callable[[], None]:
        def fn() -> None:
            counts[name] += 1

        return fn

    result = time_interleaved({"a": bump("a"), "b": bump("b")}, repeats=3, min_time=0.0, warmup=1)
    assert set(result) == {"a", "b"}
    assert all(len(r.samples_ms) == 3 and r.median_ms >= 0 for r in result.values())
    assert counts == {"a": 5, "b": 5}  # 1 warm-up + 1 calibration + 3 samples
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": bump("a")}, repeats=0)


def test_half_precision_channels_last_model():
    model = converted("resnet20", "structured").to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    report = optimize_for_inference(model, x, **FAST)
    assert report.layers[0].input_shape == (2, 16, 32, 32)
    out = run(report.model, x)
    assert out.dtype == torch.bfloat16 and relative_difference(out, run(model, x)) < 5e-2
    for p in report.model.parameters():
        assert p.dtype == torch.bfloat16
        if p.dim() == 4 and p.shape[1] > 1:
            assert p.is_contiguous(memory_format=torch.channels_last)
    state = report.model.state_dict()
    fresh = get_model("resnet20", num_classes=10).to(torch.bfloat16)
    restructure(fresh, state)
    fresh.load_state_dict(state)
    assert torch.equal(run(fresh, x), out)


# ----------------------------------------------------------------------------------------------- restructure


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_optimized_state_dict_restructures_into_fresh_models(monkeypatch, method):
    model = converted("resnet20", method)
    x = torch.randn(2, 3, 32, 32)
    # Mixed choices (structured): every other layer decomposed, the rest dense.
    flip = iter(range(10_000))

    def pick(form: str) -> float:
        if form.startswith("decomposed"):
            return 1.0 if next(flip) % 2 else 3.0
        return {"dense": 2.0, "optimized": 0.5}.get(form, 1.0)

    monkeypatch.setattr(deploy_optimize, "_form_key", lambda module, seen, device: id(module))
    monkeypatch.setattr(deploy_optimize, "time_interleaved", FixedTimer(pick))
    report = optimize_for_inference(model, x, **FAST)
    assert report.chosen_configuration == "optimized"
    state = report.model.state_dict()
    expected = run(report.model, x)

    fresh_dense = get_model("resnet20", num_classes=10)
    fresh_converted = converted("resnet20", "ghost" if method == "structured" else "structured", init="random")
    for fresh in (fresh_dense, fresh_converted):
        restructure(fresh, state)
        fresh.load_state_dict(state)
        assert torch.equal(run(fresh, x), expected)
        assert [type(m) for m in fresh.modules()] == [type(m) for m in report.model.modules()]


def test_optimized_checkpoint_loads_into_image_classifier_through_the_hook():
    classifier = ImageClassifier("resnet20", num_classes=10)
    classifier.backbone = converted("resnet20", "ghost")
    x = torch.randn(1, 3, 32, 32)
    report = optimize_for_inference(classifier.backbone, x, **FAST)
    state = {f"backbone.{k}": v for k, v in report.model.state_dict().items()}
    fresh = ImageClassifier("resnet20", num_classes=10)
    fresh.load_state_dict(state)  # the restructure pre-hook rebuilds Ghost and folded layers
    assert torch.equal(run(fresh, x), run(report.model, x))


# ----------------------------------------------------------------------------------------------- BatchNorm folding


def test_fold_batchnorm_torchvision_resnet18_is_exact():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    expected = run(model, x)
    folds = fold_batchnorm(model, x)
    assert len(folds) == 20 and all(f.applied for f in folds)
    assert all(f.max_rel_diff is not None and f.max_rel_diff < 1e-5 for f in folds)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FoldedBatchNorm) for m in model.modules()) == 20
    assert relative_difference(run(model, x), expected) < 1e-5


def test_fold_batchnorm_into_structured_conv_is_exact():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    model[0] = StructuredConv2d.from_dense(model[0], hidden_channels=4, hidden_kernel_size=2)
    x = torch.randn(2, 8, 10, 10)
    expected = run(model, x)
    folds = fold_batchnorm(model, x)
    assert [f.applied for f in folds] == [True]
    assert type(model[0]) is StructuredConv2d and model[0].hidden_channels == 4 and model[0].bias is not None
    assert isinstance(model[1], FoldedBatchNorm)
    assert relative_difference(run(model, x), expected) < 1e-5


@pytest.mark.parametrize("dw_size", [1, 3])
def test_fold_batchnorm_into_ghost_is_exact(dw_size):
    from lightning_cheapconv.nn import FusedGhostConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=False)
    ghost, _ = deploy_ghost(conv, dw_size)
    model = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(12), nn.ReLU()))
    x = torch.randn(2, 8, 9, 9)
    expected = run(model, x)
    folds = fold_batchnorm(model, x)
    assert len(folds) == 1 and folds[0].applied and isinstance(model[1], FoldedBatchNorm)
    if dw_size == 1:  # a 1x1 depthwise conv reads no padding: the whole shift goes into the primary conv's bias
        assert type(model[0]) is GhostConv2d and model[0].primary.bias is not None
    else:  # the intrinsic maps' shift is added after the depthwise conv has read them (tests/test_folding.py)
        assert type(model[0]) is FusedGhostConv2d and "FusedGhostConv2d" in folds[0].detail
    assert relative_difference(run(model, x), expected) < 1e-5


def test_fold_batchnorm_into_ghost_with_zero_intrinsic_shift_is_exact():
    torch.manual_seed(0)
    ghost, _ = deploy_ghost(nn.Conv2d(8, 12, 3, padding=1, bias=False), 3)
    model = randomize_bn(nn.Sequential(ghost, nn.BatchNorm2d(12)))
    with torch.no_grad():  # bn(x) = scale * x on the intrinsic channels: no shift that padding could distort
        intrinsic = ghost.output_index < ghost.intrinsic_channels
        model[1].bias[intrinsic] = (
            model[1].running_mean[intrinsic]
            * model[1].weight[intrinsic]
            / torch.sqrt(model[1].running_var[intrinsic] + model[1].eps)
        )
    x = torch.randn(2, 8, 9, 9)
    expected = run(model, x)
    folds = fold_batchnorm(model, x)
    assert folds[0].applied
    assert relative_difference(run(model, x), expected) < 1e-5


def deploy_ghost(conv: nn.Conv2d, dw_size: int) -> tuple[GhostConv2d, float | None]:
    from lightning_cheapconv.convert import ghost_from_conv

    return ghost_from_conv(conv, ratio=2, dw_size=dw_size)  # inherited: a permuted output


class Reused(nn.Module):
    """The conv's output feeds the BatchNorm *and* the sum: folding would change the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Untraceable(nn.Module):
    """Data-dependent control flow (no fx graph): only the Sequential's conv→bn order is known."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if float(y.mean()) > 1e9:  # never true, but fx cannot know
            return y
        return self.bn(self.conv(y))


def test_fold_batchnorm_leaves_what_is_not_a_pure_conv_bn_chain():
    torch.manual_seed(0)
    model = randomize_bn(Reused())
    x = torch.randn(1, 4, 6, 6)
    expected = run(model, x)
    assert fold_batchnorm(model, x) == []
    assert isinstance(model.bn, nn.BatchNorm2d) and torch.equal(run(model, x), expected)

    model = randomize_bn(Untraceable())
    x = torch.randn(1, 3, 6, 6)
    expected = run(model, x)
    folds = fold_batchnorm(model, x)
    assert [(f.source, f.target, f.applied) for f in folds] == [("body.0", "body.1", True)]
    assert isinstance(model.bn, nn.BatchNorm2d)  # attribute order proves nothing without a graph
    assert relative_difference(run(model, x), expected) < 1e-5


def test_fold_batchnorm_skips_batch_statistics_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    folds = fold_batchnorm(model, torch.randn(2, 3, 5, 5))
    assert len(folds) == 1 and not folds[0].applied and "running statistics" in folds[0].detail


# ----------------------------------------------------------------------------------------------- Ghost permutations


def test_ghost_permutations_fold_into_the_next_layers_where_exact():
    model = converted("resnet20", "ghost")
    x = torch.randn(2, 3, 32, 32)
    expected = run(model, x)
    folds = fold_ghost_permutations(model, x)
    applied = {f.source for f in folds if f.applied}
    kept = {f.source: f.detail for f in folds if not f.applied}
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert applied == {f"{blk}.conv1" for blk in blocks}  # conv1 → bn1 → relu → conv2 (a Ghost primary)
    assert set(kept) == {f"{blk}.conv2" for blk in blocks}  # conv2 → bn2 → residual add: kept
    assert all("add" in detail for detail in kept.values())
    for blk in blocks:
        assert model.get_submodule(f"{blk}.conv1").structure_record()["permuted"] is False
        assert model.get_submodule(f"{blk}.conv2").structure_record()["permuted"] is True
    assert relative_difference(run(model, x), expected) < 1e-5


def test_identity_permutation_is_dropped():
    ghost = GhostConv2d(4, 6, 3, padding=1, permuted=True)  # registers an identity output_index
    model = nn.Sequential(ghost, nn.ReLU()).eval()
    x = torch.randn(1, 4, 5, 5)
    expected = run(model, x)
    folds = fold_ghost_permutations(model, x)
    assert [f.kind for f in folds] == ["identity"] and model[0].output_index is None
    assert torch.equal(run(model, x), expected)


# ----------------------------------------------------------------------------------------------- bad input


def test_no_cheap_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no cheap layers.*convert_to_ghost"):
        optimize_for_inference(get_model("resnet20", 10), torch.randn(1, 3, 32, 32), **FAST)


def test_wrong_input_shape_is_a_clear_error():
    model = converted("resnet20", "structured")
    with pytest.raises(ValueError, match=r"does not accept an example input of shape 1×1×32×32"):
        optimize_for_inference(model, torch.randn(1, 1, 32, 32), **FAST)
    with pytest.raises(ValueError, match="example_input must be a Tensor"):
        optimize_for_inference(model, [1, 3, 32, 32], **FAST)  # type: ignore[arg-type]


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        optimize_for_inference(converted("resnet20", "structured"), torch.randn(1, 3, 32, 32), "cuda", **FAST)


def small_structured_net() -> nn.Module:
    """Three structured convs with BatchNorm: compiles in seconds."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 8), (8, 8), (8, 8)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    model = randomize_bn(nn.Sequential(*layers))
    decompose_structured(model, skip_first=False, skip_last=False)
    return model.eval()


needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler"
)


@needs_cxx
def test_compile_times_every_whole_model_compiled(monkeypatch):
    model = small_structured_net()
    x = torch.randn(2, 3, 16, 16)
    compiled: list[nn.Module] = []
    real = deploy_optimize.compile_for_inference

    def spy(module, example_input):
        compiled.append(module)
        return real(module, example_input)

    monkeypatch.setattr(deploy_optimize, "compile_for_inference", spy)
    report = optimize_for_inference(model, x, compile=True, **FAST)

    # Each whole-model candidate (as given, optimized, all dense where it differs) was compiled once and timed so.
    assert report.compiled and {"as given", "optimized"} <= set(report.configurations)
    assert len(compiled) == len(report.configurations)
    assert "compile_for_inference" in report.summary and report.to_dict()["compiled"] is True
    # What is returned is the plain module (savable), equal to the model as given.
    assert not isinstance(report.model, torch._dynamo.eval_frame.OptimizedModule)
    assert relative_difference(run(report.model, x), run(model, x)) < 1e-4


@needs_cxx
def test_compile_for_inference_freezes_weights_and_matches_eager():
    model = small_structured_net()
    x = torch.randn(2, 3, 16, 16)
    runner = compile_for_inference(model, x)
    with torch.inference_mode():
        before = runner(x)
        assert relative_difference(before, model(x)) < 1e-4
        model[0].weight.mul_(2.0)  # frozen into the compiled code: not seen
        assert torch.equal(runner(x), before)


@needs_cxx
def test_compile_for_inference_compiles_past_dynamos_default_recompile_limit():
    """Each frozen model is a new compilation of the same forward code; dynamo's default limit (8) would leave the
    ninth one eager without a word."""
    x = torch.randn(1, 3, 8, 8)
    for seed in range(9):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
        runner = compile_for_inference(model, x)
    with torch.inference_mode():
        before = runner(x)
        model[0].weight.mul_(2.0)
        assert torch.equal(runner(x), before)  # frozen: the ninth model was compiled too


def test_compile_failure_is_a_clear_error(monkeypatch):
    def broken(module, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match=r"compile=True.*'as given'.*InvalidCxxCompiler.*without compile=True"):
        optimize_for_inference(small_structured_net(), torch.randn(1, 3, 16, 16), compile=True, **FAST)


def test_compiled_output_that_differs_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: lambda x: module(x) + 1.0)
    with pytest.raises(RuntimeError, match=r"compiled Sequential differs from its eager outputs"):
        compile_for_inference(small_structured_net(), torch.randn(1, 3, 16, 16))


# ----------------------------------------------------------------------------------------------- command line

CLI_FAST = ["--repeats", "1", "--min-time", "0"]


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_cli_on_a_state_dict(tmp_path, capsys):
    model = converted("resnet20", "structured", num_classes=7)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    argv = [str(path), "--arch", "resnet20", "--input-shape", "2,3,32,32", "--export", "torchscript", *CLI_FAST]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Inference forms on cpu" in out and "wrote" in out
    assert (tmp_path / "weights.optimized.torchscript.pt").is_file()
    written = tmp_path / "weights.optimized.pt"
    state = torch.load(written, weights_only=True)
    fresh = get_model("resnet20", num_classes=7)  # num_classes was inferred from the checkpoint
    restructure(fresh, state)
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    assert relative_difference(run(fresh, x), run(model, x)) < 1e-4


def test_cli_compile_flag_reaches_the_optimizer(tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    torch.save(converted("resnet20", "structured").state_dict(), path)
    seen: dict[str, Any] = {}
    real = optimize_for_inference

    def spy(*args: Any, **kwargs: Any) -> InferenceReport:
        seen.update(kwargs)
        return real(*args, **{**kwargs, "compile": False})

    monkeypatch.setattr("lightning_cheapconv.deploy.optimize_for_inference", spy)
    assert main([str(path), "--arch", "resnet20", "--input-shape", "1,3,32,32", "--compile", *CLI_FAST]) == 0
    assert seen["compile"] is True


def test_cli_on_a_lightning_checkpoint(tmp_path, capsys):
    classifier = ImageClassifier("resnet20", num_classes=10)
    classifier.backbone = converted("resnet20", "ghost")
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(classifier)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    output = tmp_path / "out" / "optimized.pt"
    code = main([str(path), "--input-shape", "1x3x32x32", "--output", str(output), *CLI_FAST])
    assert code == 0, capsys.readouterr().err
    state = torch.load(output, weights_only=True)
    assert all(key.startswith("backbone.") for key in state)
    fresh = ImageClassifier("resnet20", num_classes=10)
    fresh.load_state_dict(state)  # restructured by the module's load hook
    x = torch.randn(1, 3, 32, 32)
    assert relative_difference(run(fresh, x), run(classifier, x)) < 1e-4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{dense}", "--arch", "resnet20", "--input-shape", "1,3,32,32"], "no cheap layers"),
        (["{converted}", "--arch", "resnet20", "--input-shape", "1,3,32"], "does not accept an example input"),
        (["{converted}", "--arch", "resnet20", "--input-shape", "1,three,32,32"], "expected comma-separated"),
        (["{converted}", "--input-shape", "1,3,32,32"], "needs --arch"),
        (["{missing}", "--arch", "resnet20", "--input-shape", "1,3,32,32"], "no such file"),
        (["{garbage}", "--arch", "resnet20", "--input-shape", "1,3,32,32"], "cannot read it"),
        (["{converted}", "--arch", "resnet32", "--input-shape", "1,3,32,32"], "cannot load it"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    paths = {
        "dense": tmp_path / "dense.pt",
        "converted": tmp_path / "converted.pt",
        "missing": tmp_path / "missing.pt",
        "garbage": tmp_path / "garbage.pt",
    }
    torch.save(get_model("resnet20", 10).state_dict(), paths["dense"])
    torch.save(converted("resnet20", "structured").state_dict(), paths["converted"])
    paths["garbage"].write_text("not a checkpoint")
    argv = [a.format(**paths) for a in argv]
    assert main([*argv, *CLI_FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cheapconv-optimize: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_parse_input_shape():
    assert parse_input_shape("1,3,32,32") == (1, 3, 32, 32)
    assert parse_input_shape("8x3x224x224") == (8, 3, 224, 224)
    for bad in ("", "3", "1,0,4", "a,b"):
        with pytest.raises(ValueError):
            parse_input_shape(bad)


def test_console_script_is_declared_and_runs(tmp_path):
    try:
        scripts = metadata.entry_points(group="console_scripts")
    except Exception:  # pragma: no cover - metadata missing
        scripts = []
    declared = {ep.name: ep.value for ep in scripts}
    if "cheapconv-optimize" not in declared:
        pytest.skip("package metadata not installed (pip install -e .)")
    assert declared["cheapconv-optimize"] == "lightning_cheapconv.cli:main"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_cheapconv.cli", str(tmp_path / "nope.pt"), "--input-shape", "1,3,8,8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "no such file" in result.stderr


def test_latency_summarizes_its_samples() -> None:
    """Median and interquartile range over the median (quartiles 0.9 and 1.2 around a median of 1.0: 30%); the repr
    says them instead of listing every sample."""
    latency = Latency((1.0, 1.2, 0.9))
    assert latency.median_ms == 1.0 and latency.min_ms == 0.9
    assert latency.spread == pytest.approx(0.3)
    assert repr(latency) == "Latency(median 1 ms, IQR 30%, 3 samples)"
    assert repr(Latency((15.234,))) == "Latency(median 15.23 ms, IQR 0%, 1 sample)"
