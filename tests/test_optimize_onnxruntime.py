"""``optimize_for_inference(runtime="onnxruntime")``, ``deploy/onnx_runtime.py`` and ``cheapconv-optimize --runtime``.

Timings are never asserted: the choice tests replace ``time_interleaved`` with a timer that returns fixed latencies
(and checks that what it is given are ONNX Runtime sessions), so the choice logic itself is what is tested. One
real run checks the ONNX Runtime path end to end on a tiny model.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from nets import randomize_bn
from rich.console import Console
from torch import nn

import lightning_cheapconv.deploy.optimize as deploy_optimize  # monkeypatched: it looks up time_interleaved
import lightning_cheapconv.models as models
from lightning_cheapconv import GhostConv2d, StructuredConv2d, convert_to_ghost, decompose_structured, restructure
from lightning_cheapconv.cli import main
from lightning_cheapconv.deploy import (
    RUNTIMES,
    InferenceReport,
    Latency,
    onnx_session,
    optimize_for_inference,
    relative_difference,
    time_onnxruntime,
)
from lightning_cheapconv.deploy.onnx_runtime import check_onnx_file, onnx_runner
from lightning_cheapconv.nn.record import decode_record

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
]

FAST = {"repeats": 1, "min_time": 0.0, "warmup": 0}
ORT = {"runtime": "onnxruntime", **FAST}


class TinyNet(nn.Module):
    """Three conv+BN+ReLU blocks (two of one configuration) and a classifier: exports in about a second."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 8), (8, 16), (16, 16)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def tiny(method: str | None = None, seed: int = 0, include: list[str] | None = None) -> nn.Module:
    """TinyNet, its convs (``include``: only these; fewer cheap layers = fewer exports) structured or Ghost."""
    torch.manual_seed(seed)
    model = randomize_bn(TinyNet())
    if method == "structured":
        decompose_structured(model, skip_first=False, include=include)
    elif method == "ghost":
        convert_to_ghost(model, skip_first=False, init="random", include=include)
    return model.eval()


ONE = ["features.6"]  # one cheap layer: each of its forms and each whole model is one export


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


class OrtTimer:
    """Stands in for ``time_interleaved``: checks that every candidate is an ONNX Runtime runner (it carries the
    exported graph), runs it once, and returns ``pick(name, call)`` ms, ``call`` counting the timer's calls."""

    def __init__(self, pick: Callable[[str, int], float]) -> None:
        self.pick = pick
        self.calls: list[list[str]] = []

    def __call__(self, candidates: Mapping[str, Callable[[], Any]], *args: Any, **kwargs: Any) -> dict[str, Latency]:
        self.calls.append(list(candidates))
        for fn in candidates.values():
            assert isinstance(getattr(fn, "graph", None), bytes), "not an ONNX Runtime runner"
            assert all(isinstance(o, np.ndarray) for o in fn())  # a session's run returns numpy arrays
        call = len(self.calls) - 1
        return {name: Latency((self.pick(name, call),)) for name in candidates}


def op_types(graph: bytes) -> list[str]:
    return [node.op_type for node in onnx.load_from_string(graph).graph.node]


# ----------------------------------------------------------------------------------------------- choice (stubbed)


def test_per_layer_choice_follows_the_onnxruntime_timings(monkeypatch):
    model = tiny("structured", include=["features.3", "features.6"])
    x = torch.randn(2, 3, 16, 16)
    names = [n for n, m in model.named_modules() if isinstance(m, StructuredConv2d)]
    assert len(names) == 2
    forms = list(deploy_optimize.layer_forms(model.get_submodule(names[0])))
    # The first layer wins in its last decomposed form (not the first one timed), the second one dense.
    want = {names[0]: forms[-2], names[1]: "dense"}

    def pick(form: str, call: int) -> float:
        if call < len(names):
            return 1.0 if form == want[names[call]] else 2.0
        return {"optimized": 1.0}.get(form, 2.0)

    timer = OrtTimer(pick)
    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    monkeypatch.setattr(deploy_optimize, "_form_key", lambda module, seen, device: id(module))  # no shared timings
    report = optimize_for_inference(model, x, **ORT)

    assert [set(c) for c in timer.calls[: len(names)]] == [set(forms)] * len(names)
    assert {row.name: row.chosen for row in report.layers} == want
    assert report.chosen_configuration == "optimized"
    for name, form in want.items():
        layer = report.model.get_submodule(name)
        if form == "dense":
            assert not isinstance(layer, StructuredConv2d)
        else:
            assert isinstance(layer, StructuredConv2d)
            if form != "decomposed":  # the sum-pool form that won is in the layer's record
                assert form == f"decomposed/{layer.structure_record()['pooling']}"
    assert relative_difference(run(report.model, x), run(model, x)) < 1e-4
    # The report says where it measured.
    assert report.runtime == "onnxruntime" and report.to_dict()["runtime"] == "onnxruntime"
    assert report.runtime_label == "ONNX Runtime (CPUExecutionProvider, 1 intra-op threads)"
    assert report.summary.startswith("On cpu (1 threads) in ONNX Runtime (CPUExecutionProvider")
    assert "measured in ONNX Runtime" in report.table().title
    # The graph kept is the optimized model's, and it runs in ONNX Runtime to the same outputs.
    session = onnxruntime.InferenceSession(report.onnx_model, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert relative_difference(torch.from_numpy(got), run(report.model, x)) < 1e-4


@pytest.mark.parametrize("original_ms", [0.5, 1.5])
def test_never_slower_in_onnxruntime_than_the_original(monkeypatch, original_ms):
    original = tiny(seed=1)
    model = tiny("ghost", include=ONE)
    x = torch.randn(1, 3, 16, 16)
    whole = {"as given": 1.2, "optimized": 1.0, "original": original_ms}
    timer = OrtTimer(lambda form, call: whole.get(form, 1.0))
    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    report = optimize_for_inference(model, x, original=original, **ORT)

    assert set(timer.calls[-1]) == {"as given", "optimized", "original"}  # the whole models, timed in ORT
    assert report.latency_after_ms <= report.configurations["original"]
    if original_ms < 1.0:
        assert report.chosen_configuration == "original"
        assert not any(isinstance(m, GhostConv2d) for m in report.model.modules())
        assert relative_difference(run(report.model, x), run(original, x)) < 1e-4
        assert "No cheap form was faster anywhere" in report.summary
    else:
        assert report.chosen_configuration == "optimized" and report.cheap_form_won is True
        assert relative_difference(run(report.model, x), run(model, x)) < 1e-4
    # What is kept is the graph of the model returned.
    assert op_types(report.onnx_model).count("Conv") == sum(isinstance(m, nn.Conv2d) for m in report.model.modules())


def test_as_given_kept_in_onnxruntime_still_reports_each_layer(monkeypatch):
    """When the model as given wins, its structured layers read "decomposed/auto" (the form is chosen at export):
    the table shows their MAC ratio all the same, and says the folds noted were not applied."""
    model = tiny("structured", include=["features.3"])
    x = torch.randn(1, 3, 16, 16)
    timer = OrtTimer(lambda form, call: {"as given": 0.5}.get(form, 1.0))
    monkeypatch.setattr(deploy_optimize, "time_interleaved", timer)
    report = optimize_for_inference(model, x, **ORT)
    assert report.chosen_configuration == "as given"
    (row,) = [r for r in report.layers if r.input_shape is not None]
    assert row.chosen == "decomposed/auto"
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(report.table())
    line = next(line for line in console.export_text().splitlines() if row.name in line)
    ratio = row.macs["dense"] / next(m for f, m in row.macs.items() if f.startswith("decomposed"))
    assert f"{ratio:.2f}×" in line


def test_pytorch_report_says_it_measured_pytorch():
    report = optimize_for_inference(tiny("structured"), torch.randn(1, 3, 16, 16), **FAST)
    assert report.runtime == "pytorch" and report.onnx_model is None and report.to_dict()["runtime"] == "pytorch"
    assert "in PyTorch eager" in report.summary and "measured in PyTorch eager" in report.table().title


# ----------------------------------------------------------------------------------------------- real run


def test_real_onnxruntime_run_end_to_end():
    model = tiny("structured", include=ONE)
    x = torch.randn(2, 3, 16, 16)
    report = optimize_for_inference(model, x, runtime="onnxruntime", repeats=2, min_time=0.0)
    assert set(report.configurations) >= {"as given", "optimized"}
    assert all(ms > 0 for ms in report.configurations.values())
    assert all(row.times_ms and all(t > 0 for t in row.times_ms.values()) for row in report.layers)
    assert report.latency_after_ms == min(report.configurations.values())
    # Eager and ONNX Runtime agree with the model as given (the chosen model has the same weights).
    assert relative_difference(run(report.model, x), run(model, x)) < 1e-4
    session = onnxruntime.InferenceSession(report.onnx_model, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert relative_difference(torch.from_numpy(got), run(model, x)) < 1e-4
    # The choices are in the records: a fresh model restructures to it.
    fresh = TinyNet()
    state = report.model.state_dict()
    restructure(fresh, state)
    fresh.load_state_dict(state)
    assert torch.equal(run(fresh, x), run(report.model, x))


def test_onnx_helpers_agree_with_eager():
    model = tiny("ghost")
    x = torch.randn(2, 3, 16, 16)
    session = onnx_session(model, x)
    assert session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert relative_difference(torch.from_numpy(got), run(model, x)) < 1e-4
    latency = time_onnxruntime({"dense": tiny(), "ghost": model}, x, repeats=2, min_time=0.0)
    assert set(latency) == {"dense", "ghost"} and all(lat.median_ms > 0 for lat in latency.values())


def test_onnx_runner_refuses_outputs_that_differ(monkeypatch, tmp_path):
    model = tiny()
    x = torch.randn(1, 3, 16, 16)
    runner = onnx_runner(model, x)
    path = tmp_path / "model.onnx"
    path.write_bytes(runner.graph)
    assert check_onnx_file(path, model, x) < 1e-4
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # eager changes, the file does not
    with pytest.raises(RuntimeError, match=r"model.onnx differs from eager TinyNet"):
        check_onnx_file(path, model, x)


# ----------------------------------------------------------------------------------------------- bad input


def test_unknown_runtime_names_the_valid_ones():
    assert RUNTIMES == ("pytorch", "onnxruntime")
    with pytest.raises(ValueError, match=r"runtime='tensorrt'; valid runtimes are 'pytorch', 'onnxruntime'"):
        optimize_for_inference(tiny("structured"), torch.randn(1, 3, 16, 16), runtime="tensorrt", **FAST)


def test_compile_with_onnxruntime_is_refused():
    with pytest.raises(ValueError, match=r"compile=True.*runtime='onnxruntime'"):
        optimize_for_inference(tiny("structured"), torch.randn(1, 3, 16, 16), compile=True, **ORT)


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript"])
def test_missing_onnx_packages_say_how_to_install(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(ImportError, match=rf"{missing} is not installed.*pip install 'lightning-cheapconv\[export\]'"):
        optimize_for_inference(tiny("structured"), torch.randn(1, 3, 16, 16), **ORT)


def test_bfloat16_input_is_refused_for_onnxruntime():
    model = tiny("structured").to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        optimize_for_inference(model, torch.randn(1, 3, 16, 16, dtype=torch.bfloat16), **ORT)


# ----------------------------------------------------------------------------------------------- command line


@pytest.fixture
def tiny_arch(monkeypatch):
    monkeypatch.setitem(models._MODELS, "tinynet", lambda num_classes: TinyNet(num_classes))
    return "tinynet"


def test_cli_runtime_onnxruntime_exports_what_was_measured(tmp_path, monkeypatch, capsys, tiny_arch):
    path = tmp_path / "weights.pt"
    torch.save(tiny("structured", include=ONE).state_dict(), path)
    reports: list[InferenceReport] = []
    real = optimize_for_inference

    def spy(*args: Any, **kwargs: Any) -> InferenceReport:
        reports.append(real(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr("lightning_cheapconv.deploy.optimize_for_inference", spy)
    monkeypatch.setattr(deploy_optimize, "time_interleaved", OrtTimer(lambda form, call: 1.0))
    argv = [str(path), "--arch", tiny_arch, "--input-shape", "1,3,16,16", "--runtime", "onnxruntime"]
    assert main([*argv, "--export", "onnx", "--repeats", "1", "--min-time", "0"]) == 0
    out = capsys.readouterr().out
    assert "measured in ONNX Runtime" in out and "the graph timed in ONNX Runtime" in out
    (report,) = reports
    assert report.runtime == "onnxruntime"
    assert (tmp_path / "weights.optimized.onnx").read_bytes() == report.onnx_model


def test_cli_runtime_errors_exit_2(tmp_path, capsys, tiny_arch, monkeypatch):
    path = tmp_path / "weights.pt"
    torch.save(tiny("structured").state_dict(), path)
    argv = [str(path), "--arch", tiny_arch, "--input-shape", "1,3,16,16", "--runtime", "onnxruntime"]
    assert main([*argv, "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cheapconv-optimize: error:") and "compile=True" in err and "onnxruntime" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(argv) == 2
    assert "pip install 'lightning-cheapconv[export]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: an unknown runtime exits 2 with the choices
        main([*argv[:-1], "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


@pytest.mark.parametrize("original_ms", [0.5, 2.0])
def test_cli_original_is_compared_and_returned_when_faster(tmp_path, monkeypatch, capsys, tiny_arch, original_ms):
    """--original (the dense checkpoint): the CLI compares it as a whole and writes it when it is faster."""
    converted, dense = tmp_path / "ghost.pt", tmp_path / "dense.pt"
    torch.save(tiny("ghost", include=ONE).state_dict(), converted)
    torch.save(tiny(seed=1).state_dict(), dense)
    whole = {"as given": 1.2, "optimized": 1.0, "original": original_ms}
    monkeypatch.setattr(deploy_optimize, "time_interleaved", OrtTimer(lambda form, call: whole.get(form, 1.0)))
    argv = [str(converted), "--arch", tiny_arch, "--input-shape", "1,3,16,16", "--runtime", "onnxruntime"]
    assert main([*argv, "--original", str(dense), "--repeats", "1", "--min-time", "0"]) == 0
    assert "original" in capsys.readouterr().out
    state = torch.load(tmp_path / "ghost.optimized.pt", weights_only=True)
    kinds = {decode_record(v)["kind"] for k, v in state.items() if k.endswith("_extra_state")}
    assert any("Ghost" in kind for kind in kinds) is (original_ms > 1.0)  # FusedGhostConv2d: its BN folded
    assert main([*argv, "--original", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
