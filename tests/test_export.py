"""Export of converted and optimized models with every exporter users call: torch.jit.trace and script,
torch.export.export, ONNX with both exporters (checked through onnxruntime), Lightning's to_torchscript() and
to_onnx() on every checkpoint of a fit; and checkpoints written by lightning-cheapconv 0.1.

One small CIFAR ResNet-8 holds every deployable kind: Ghost modules (permuted and with the
permutation folded), structured convs decomposed (with a folded BatchNorm as bias) and folded to
dense (``FusedConv2d``), ``FoldedBatchNorm`` placeholders and plain layers. Outputs must match
PyTorch's to 1e-4 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nets import randomize_bn, tiny_backbone, user_trainer
from torch import nn

import lightning_cheapconv.deploy.export as deploy_export  # monkeypatched: it looks up _run_exported
import lightning_cheapconv.deploy.optimize as deploy_optimize  # monkeypatched: it looks up time_interleaved
from lightning_cheapconv import (
    GhostConv2d,
    GhostConvCallback,
    StructuredConv2d,
    StructuredConvCallback,
    convert_to_ghost,
    decompose_structured,
    restructure,
)
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
from lightning_cheapconv.nn import FusedGhostConv2d
from lightning_cheapconv.nn.record import (
    MAX_RECORD_BYTES,
    RECORD_PREFIX,
    decode_record,
    is_encoded_record,
    records_equal,
)

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
        decomposed = 1.0 if layer == "layer2" else 2.0
        picks = {"dense": 1.5, "optimized": 0.5}
        if "dense" in candidates:  # a structured layer's forms: dense and decomposed/<pooling>
            timer.next_is_layer2 = False  # layer2 is visited first, then layer3
        return {
            name: Latency((decomposed if name.startswith("decomposed") else picks.get(name, 1.0),))
            for name in candidates
        }

    timer.next_is_layer2 = True
    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    report = optimize_for_inference(mixed_resnet8(), torch.randn(2, 3, 32, 32), repeats=1, min_time=0, warmup=0)
    monkeypatch.undo()
    return report.model


def test_the_optimized_model_holds_every_kind(monkeypatch):
    model = optimized_resnet8(monkeypatch)
    kinds = {type(m) for m in model.modules()}
    # Every BatchNorm folds: into dense and structured convs, and exactly into Ghost modules (FusedGhostConv2d).
    assert {FusedGhostConv2d, StructuredConv2d, FusedConv2d, FoldedBatchNorm} <= kinds
    assert nn.BatchNorm2d not in kinds
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
@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".pt"), ("exported_program", ".pt2")])
def test_export_model_checks_its_file(fmt, suffix, tmp_path, monkeypatch):
    model = mixed_resnet8()
    x = torch.randn(1, 3, 32, 32)
    path = export_model(model, x, tmp_path / f"model{suffix}", format=fmt)
    assert path.is_file()
    # A file whose outputs differ is reported, not silently written.
    monkeypatch.setattr(deploy_export, "_run_exported", lambda path, fmt, x: torch.zeros(1, 10))
    with pytest.raises(ExportMismatchError, match="differs from PyTorch"):
        export_model(model, x, tmp_path / f"again{suffix}", format=fmt)


@pytest.mark.parametrize(
    ("name", "fmt", "match"),
    [
        ("model.pt", "onnx", r"suffix '\.pt' \(that suffix is for format='torchscript'\); format='onnx' writes \.onnx"),
        ("model.tflite", "onnx", r"suffix '\.tflite'; format='onnx' writes \.onnx"),
        ("model.onnx", "exported_program", r"that suffix is for format='onnx'"),
    ],
)
def test_export_model_refuses_a_path_whose_suffix_names_another_format(name, fmt, match, tmp_path):
    """export_model("model.pt") used to write ONNX into a file torch.jit.load then could not read."""
    with pytest.raises(ValueError, match=match):
        export_model(mixed_resnet8(), torch.randn(1, 3, 32, 32), tmp_path / name, format=fmt)
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize(("fmt", "suffix"), [("onnx", ".onnx"), ("exported_program", ".pt2")])
def test_export_model_with_a_dynamic_batch(fmt, suffix, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    model = mixed_resnet8()
    path = export_model(model, torch.randn(2, 3, 32, 32), tmp_path / f"m{suffix}", format=fmt, dynamic_batch=True)
    other = torch.randn(5, 3, 32, 32)
    got = _onnx_outputs(path, other) if fmt == "onnx" else torch.export.load(str(path)).module()(other)
    assert relative_difference(got, reference(model, other)) < RTOL
    fixed = export_model(model, torch.randn(2, 3, 32, 32), tmp_path / f"fixed{suffix}", format=fmt)
    with pytest.raises(Exception):  # noqa: B017 - each runtime raises its own type for a batch it was not made for
        _onnx_outputs(fixed, other) if fmt == "onnx" else torch.export.load(str(fixed)).module()(other)


def test_export_model_rejects_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="valid formats"):
        export_model(mixed_resnet8(), torch.randn(1, 3, 32, 32), tmp_path / "m", format="tflite")  # type: ignore


# ----------------------------------------------------------------------------------------------- every exporter
# Structure records live in the state dict as uint8 tensors (nn/record.py), so the exporters that treat every
# state-dict entry as a tensor run: the TorchScript-based ONNX exporter and torch.jit.script.


def _onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(got)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*is deprecated:FutureWarning")
def test_onnx_torchscript_exporter_round_trip(model, tmp_path):
    """``torch.onnx.export(..., dynamo=False)``, which deployment tools still call, used to fail on every converted
    model (``'dict' object has no attribute 'detach'``)."""
    pytest.importorskip("onnx")
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    other = torch.randn(3, 3, 32, 32)
    assert relative_difference(_onnx_outputs(path, other), reference(model, other)) < RTOL


def test_jit_script_round_trip(model, tmp_path):
    scripted = torch.jit.script(model)
    path = tmp_path / "model.scripted.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_difference(loaded(x), reference(model, x)) < RTOL


@pytest.mark.parametrize("kwargs", [{}, {"permuted": True}, {"norm_layer": nn.BatchNorm2d, "act_layer": nn.ReLU}])
def test_ghost_module_scripts_twice_in_one_process(kwargs):
    """The first attempt used to fail on the ``primary`` property, and the second with "Can't redefine method"."""
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        ghost = GhostConv2d(3, 6, 3, padding=1, **kwargs).eval()
        scripted = torch.jit.script(ghost)
        with torch.no_grad():
            assert torch.equal(scripted(x), ghost(x))


# ----------------------------------------------------------------------------------------------- Lightning's exporters


def _fit(project, pl_ns, tmp_path, callback) -> tuple[nn.Module, list]:
    """Fit the user's project for 3 epochs with ``callback``, saving a checkpoint every epoch: the fitted model and
    the checkpoint paths."""
    pl_ns.seed_everything(0)
    every_epoch = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, save_last=False)
    trainer = user_trainer(pl_ns, callbacks=[callback, every_epoch], enable_checkpointing=True)
    model = project.Model()
    trainer.fit(model, datamodule=project.DataModule())
    return model, sorted(tmp_path.glob("epoch=*.ckpt"))


def _loaded(project, path) -> nn.Module:
    state = torch.load(path, weights_only=True)["state_dict"]
    model = project.Model()
    restructure(model, state)
    model.load_state_dict(state)
    return model


@pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",
    "ignore:.*is deprecated:FutureWarning",
    "ignore::torch.jit.TracerWarning",
    "ignore:.*callbacks used to create the checkpoint need to be provided.*",
)
@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_lightning_exporters_on_every_checkpoint(pl_ns, project, tmp_path, method):
    """Every epoch checkpoint of a fit (Ghost: dense before the stage, half-converted after stage 1 of 2, converted;
    structured: projected dense weights), loaded into a fresh copy of the user's module, and the fitted module itself
    (structured: decomposed at fit end) export with ``LightningModule.to_torchscript()`` (script and trace) and
    ``to_onnx()`` (both exporters), outputs equal."""
    pytest.importorskip("onnxscript")
    if method == "ghost":
        callback = GhostConvCallback(start_epoch=1, end_epoch=2, stages=2, verbose=0)
    else:
        callback = StructuredConvCallback(verbose=0)
    fitted, paths = _fit(project, pl_ns, tmp_path, callback)
    assert len(paths) == 3
    x = torch.randn(2, 3, 8, 8)
    cheap = {"ghost": GhostConv2d, "structured": StructuredConv2d}[method]
    assert any(isinstance(m, cheap) for m in fitted.modules())
    counts = []
    for name, model in [*((p.name, _loaded(project, p)) for p in paths), ("fit end", fitted)]:
        model.eval()
        counts.append(sum(isinstance(m, cheap) for m in model.modules()))
        expected = reference(model, x)
        for how in ("script", "trace"):
            exported = model.to_torchscript(method=how, example_inputs=x)
            with torch.no_grad():
                assert relative_difference(exported(x), expected) < RTOL, (name, how)
        for dynamo in (False, True):
            onnx_path = tmp_path / f"{len(counts)}.{dynamo}.onnx"
            model.to_onnx(str(onnx_path), x, dynamo=dynamo)
            assert relative_difference(_onnx_outputs(onnx_path, x), expected) < RTOL, (name, dynamo)
    if method == "ghost":  # dense, then some layers Ghost, then all of them
        assert counts[0] == 0 < counts[1] < counts[2] == counts[3]
    else:  # checkpoints hold projected dense weights; fit end decomposes
        assert counts == [0, 0, 0, len(callback.targets)]


# ----------------------------------------------------------------------------------------------- old checkpoints
_V1 = Path(__file__).parent / "data" / "records_v1.pt"


@pytest.mark.parametrize("name", ["ghost", "structured", "folded"])
def test_checkpoints_of_version_0_1_still_load(name):
    """tests/data/records_v1.pt was written by lightning-cheapconv 0.1 at commit 58e33ae
    (tests/data/make_records_v1.py): records stored as dicts, every kind at record version 1."""
    saved = torch.load(_V1, weights_only=True)[name]
    assert all(isinstance(v, dict) for k, v in saved["state_dict"].items() if k.endswith("_extra_state"))
    model = tiny_backbone(seed=5)
    restructure(model, saved["state_dict"])
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        assert relative_difference(model.eval()(saved["input"]), saved["output"]) < 1e-6
    # Saved again, the records are tensors, and the state dict loads into a fresh model the same way.
    state = model.state_dict()
    assert all(is_encoded_record(v) for k, v in state.items() if k.endswith("_extra_state"))
    fresh = tiny_backbone(seed=6)
    restructure(fresh, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(saved["input"]), model(saved["input"]))


# ----------------------------------------------------------------------------------------------- records as tensors


def test_record_tensor_round_trip_and_bad_bytes():
    ghost = GhostConv2d(4, 6, 3, padding=1, permuted=True)
    encoded = ghost.get_extra_state()
    assert encoded.dtype == torch.uint8 and encoded.dim() == 1
    assert records_equal(decode_record(encoded), ghost.structure_record())
    prefix = encoded[: len(RECORD_PREFIX)]
    bad = {
        "not JSON": torch.cat([prefix, torch.tensor(list(b"{oops"), dtype=torch.uint8)]),
        "not an object": torch.cat([prefix, torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)]),
        "NaN": torch.cat([prefix, torch.tensor(list(b'{"kind": NaN}'), dtype=torch.uint8)]),
        "too long": torch.cat([encoded, torch.full((MAX_RECORD_BYTES,), 32, dtype=torch.uint8)]),
    }
    messages = {
        "not JSON": "is not valid JSON",
        "not an object": "expected a structure record",
        "NaN": "is not valid JSON",
        "too long": f"records are at most {MAX_RECORD_BYTES}",
    }
    for case, value in bad.items():
        target = tiny_backbone(seed=1)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        state = {"3._extra_state": value, **{k: v for k, v in target.state_dict().items()}}
        with pytest.raises(ValueError, match=f"'3._extra_state'.*{messages[case]}"):
            restructure(target, state)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), case
        with pytest.raises(ValueError, match=messages[case]):
            GhostConv2d(4, 6, 3, padding=1, permuted=True).set_extra_state(value)
    # A tensor without the prefix is another library's extra state: not ours to read.
    assert decode_record(torch.zeros(3, dtype=torch.uint8)).shape == (3,)
