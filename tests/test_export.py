"""Export of converted and optimized models: torch.jit.trace, torch.export.export and ONNX (through onnxruntime).

One small CIFAR ResNet-8 holds every deployable kind: Ghost modules (permuted and with the
permutation folded), structured convs decomposed (with a folded BatchNorm as bias) and folded to
dense (``FusedConv2d``), ``FoldedBatchNorm`` placeholders and plain layers. Outputs must match
PyTorch's to 1e-4 relative.
"""

from __future__ import annotations

import pytest
import torch
from nets import randomize_bn
from torch import nn

import lightning_cheapconv.deploy.export as deploy_export  # monkeypatched: it looks up _run_exported
import lightning_cheapconv.deploy.optimize as deploy_optimize  # monkeypatched: it looks up time_interleaved
from lightning_cheapconv import GhostConv2d, StructuredConv2d, convert_to_ghost, decompose_structured
from lightning_cheapconv.deploy import (
    ExportMismatchError,
    FoldedBatchNorm,
    FusedConv2d,
    Latency,
    export_model,
    optimize_for_inference,
    relative_difference,
)
from lightning_cheapconv.models import CifarResNet

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4


def mixed_resnet8() -> nn.Module:
    """ResNet-8 with layer1 Ghost (inherited, so permuted), layer2 and layer3 structured; non-trivial BatchNorms."""
    torch.manual_seed(0)
    model = randomize_bn(CifarResNet(8, num_classes=10))
    convert_to_ghost(model, include="layer1.*")
    decompose_structured(model, include=["layer2.*", "layer3.*"])
    return model.eval()


def optimized_resnet8(monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """The mixed model optimized with fixed timings: layer2 stays decomposed, layer3 goes dense."""

    def timer(candidates, *args, **kwargs):
        with torch.inference_mode():
            for fn in candidates.values():
                fn()
        layer = "layer2" if timer.next_is_layer2 else "layer3"
        picks = {"decomposed": 1.0 if layer == "layer2" else 2.0, "dense": 1.5, "optimized": 0.5}
        if "decomposed" in candidates:
            timer.next_is_layer2 = False  # layer2 is visited first, then layer3
        return {name: Latency((picks.get(name, 1.0),)) for name in candidates}

    timer.next_is_layer2 = True
    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    report = optimize_for_inference(mixed_resnet8(), torch.randn(2, 3, 32, 32), repeats=1, min_time=0, warmup=0)
    monkeypatch.undo()
    return report.model


def test_the_optimized_model_holds_every_kind(monkeypatch):
    model = optimized_resnet8(monkeypatch)
    kinds = {type(m) for m in model.modules()}
    assert {GhostConv2d, StructuredConv2d, FusedConv2d, FoldedBatchNorm, nn.BatchNorm2d} <= kinds
    ghosts = [m for m in model.modules() if isinstance(m, GhostConv2d)]
    assert {m.output_index is None for m in ghosts} == {True, False}  # one permutation folded, one kept
    assert type(model.layer2[0].conv1) is StructuredConv2d and type(model.layer3[0].conv1) is FusedConv2d


@pytest.fixture(params=["converted", "optimized"])
def model(request, monkeypatch):
    return mixed_resnet8() if request.param == "converted" else optimized_resnet8(monkeypatch)


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_round_trip(model, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
    path = tmp_path / "model.torchscript.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    other = torch.randn(2, 3, 32, 32)  # a traced graph must not have baked in the example's values
    with torch.no_grad():
        assert relative_difference(loaded(other), reference(model, other)) < RTOL


def test_torch_export_round_trip(model, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    other = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_difference(loaded(other), reference(model, other)) < RTOL


def test_onnx_round_trip(model, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(2, 3, 32, 32)
    path = export_model(model, x, tmp_path / "model.onnx", format="onnx")  # checks through onnxruntime too
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(2, 3, 32, 32)
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    assert relative_difference(torch.from_numpy(got), reference(model, other)) < RTOL


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "exported_program"])
def test_export_model_checks_its_file(fmt, tmp_path, monkeypatch):
    model = mixed_resnet8()
    x = torch.randn(1, 3, 32, 32)
    path = export_model(model, x, tmp_path / f"model.{fmt}", format=fmt)
    assert path.is_file()
    # A file whose outputs differ is reported, not silently written.
    monkeypatch.setattr(deploy_export, "_run_exported", lambda path, fmt, x: torch.zeros(1, 10))
    with pytest.raises(ExportMismatchError, match="differs from PyTorch"):
        export_model(model, x, tmp_path / f"again.{fmt}", format=fmt)


def test_export_model_rejects_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="valid formats"):
        export_model(mixed_resnet8(), torch.randn(1, 3, 32, 32), tmp_path / "m", format="tflite")  # type: ignore
