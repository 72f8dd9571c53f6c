"""Every convolution type through the whole library (issue 16 item 2): layer selection, conversion, the callbacks
during fit, BatchNorm folding and the per-layer forms of ``optimize_for_inference``.

The modules themselves (exactness, records, counts of one layer) are tested in tests/test_nn_nd.py and
tests/test_nn_transposed.py; whole models in tests/test_breadth.py.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_cheapconv import (
    GhostConvCallback,
    StructuredConvCallback,
    convert_to_ghost,
    decompose_structured,
    restructure,
    select_layers,
)
from lightning_cheapconv.convert import (
    CHEAP_TYPES,
    ghost_from_conv,
    structure_spec_for,
    structured_from_dense,
    structured_like,
)
from lightning_cheapconv.deploy import fold_batchnorm
from lightning_cheapconv.deploy.optimize import layer_forms, optimize_for_inference
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
)
from lightning_cheapconv.structure import project, structural_residual

pytestmark = pytest.mark.usefixtures("one_thread")

GHOST = {
    nn.Conv1d: GhostConv1d,
    nn.Conv2d: GhostConv2d,
    nn.Conv3d: GhostConv3d,
    nn.ConvTranspose1d: GhostConvTranspose1d,
    nn.ConvTranspose2d: GhostConvTranspose2d,
    nn.ConvTranspose3d: GhostConvTranspose3d,
}
STRUCTURED = {
    nn.Conv1d: StructuredConv1d,
    nn.Conv2d: StructuredConv2d,
    nn.Conv3d: StructuredConv3d,
    nn.ConvTranspose1d: StructuredConvTranspose1d,
    nn.ConvTranspose2d: StructuredConvTranspose2d,
    nn.ConvTranspose3d: StructuredConvTranspose3d,
}


# ------------------------------------------------------------------------------------------------ small nets


def audio_net(seed: int = 0) -> nn.Module:
    """A Conv1d net on raw audio ``(B, 1, 256)``: strided stem, three 1-d convs with BatchNorm1d, a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 8, 9, stride=2, padding=4),
        nn.ReLU(),
        nn.Conv1d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 16, 5, padding=4, dilation=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


class UNet(nn.Module):
    """A two-level U-Net ``(B, 3, 16, 16) -> (B, 3, 16, 16)``: the decoder upsamples with a ConvTranspose2d (stride 2)
    and a grouped ConvTranspose2d, a skip connection is concatenated, a 1x1 conv predicts per pixel."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, bias=False)
        self.up_bn = nn.BatchNorm2d(8)
        self.mix = nn.ConvTranspose2d(16, 8, 3, padding=1, groups=2)
        self.dec = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc1(x)
        up = F.relu(self.up_bn(self.up(self.enc2(skip))))
        return self.head(self.dec(F.relu(self.mix(torch.cat([up, skip], 1)))))


def video_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.video.r3d_18(num_classes=4)


NETS: dict[str, tuple[Any, tuple[int, ...], tuple[str, ...]]] = {
    # builder, input shape (batch 1), the prediction layers (kept dense)
    "audio": (audio_net, (1, 1, 256), ("12",)),
    "unet": (UNet, (1, 3, 16, 16), ("head",)),
    "r3d_18": (video_net, (1, 3, 4, 32, 32), ("fc",)),
}


def every_conv_type() -> nn.Module:
    """One of each conv type (plus a grouped transposed conv), as separate branches of one model."""

    class AllTypes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Conv1d(4, 8, 3, padding=1)
            self.c1 = nn.Conv1d(8, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.c3 = nn.Conv3d(8, 8, 3, padding=1)
            self.t1 = nn.ConvTranspose1d(8, 8, 4, stride=2, padding=1)
            self.t2 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
            self.t3 = nn.ConvTranspose3d(8, 8, 2, stride=2, bias=False)
            self.grouped = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c1(self.stem(x))  # (B, 8, L)
            a = self.t1(h).mean(-1)
            b = self.grouped(self.t2(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 4)))).mean((-1, -2))
            c = self.t3(self.c3(h[..., :4].reshape(h.shape[0], 8, 1, 2, 2).expand(-1, -1, 2, -1, -1))).mean(
                (-1, -2, -3)
            )
            return self.out(a + b + c)

    return AllTypes()


ALL_TYPES_INPUT = (2, 4, 8)


# ------------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_every_conv_type_is_a_candidate_and_each_skip_has_its_reason(method: str) -> None:
    model = every_conv_type().eval()
    x = torch.randn(*ALL_TYPES_INPUT)
    plan = {p.name: p for p in select_layers(model, method, channel_ratio=0.5, example_input=x)}
    assert set(plan) == {"stem", "c1", "c2", "c3", "t1", "t2", "t3", "grouped", "out"} - {"out"}
    assert plan["stem"].reason.startswith("first conv")
    converted = {"c1", "c2", "c3", "t1", "t2", "t3"} | ({"grouped"} if method == "structured" else set())
    assert {n for n, p in plan.items() if p.action == "convert"} == converted
    if method == "ghost":
        assert plan["grouped"].reason == "grouped transposed conv (groups=2); a Ghost primary transposed conv is dense"

    expected = model(x)
    convert = (
        convert_to_ghost if method == "ghost" else lambda m, **kw: decompose_structured(m, channel_ratio=0.5, **kw)
    )
    result = convert(model, example_input=x, progress=False)
    table = {cls: (GHOST if method == "ghost" else STRUCTURED)[cls] for cls in GHOST}
    before = every_conv_type()
    for name in converted:
        assert type(model.get_submodule(name)) is table[type(before.get_submodule(name))], name
    text = str(result)
    for name in plan:  # every candidate is in print(result), converted or skipped with its reason
        assert f"  {name}: " in text, name
    if method == "ghost":
        assert "  grouped: skipped (grouped transposed conv (groups=2)" in text
    # The converted parts are no candidates of a second selection: the cheap modules are "already" converted.
    again = {p.name: p.reason for p in select_layers(model, method, example_input=x)}
    assert all(not any(n.startswith(f"{c}.") for c in converted) for n in again)
    assert {n for n, r in again.items() if r.startswith("already a ")} == converted
    # Counts of the change rows against the modules themselves.
    for change in result.changes:
        assert change.params_after == sum(p.numel() for p in model.get_submodule(change.name).parameters())
    # A fresh model takes the converted state dict.
    fresh = every_conv_type()
    state = model.state_dict()
    restructure(fresh, state)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.eval()(x), model(x))
    assert expected.shape == model(x).shape


def test_transposed_structure_is_on_each_input_channels_block() -> None:
    """The spec of a transposed conv describes ``W[i]``, one input channel's ``(C_out/groups, K...)`` block."""
    conv = nn.ConvTranspose2d(6, 8, (3, 2), stride=2, groups=2)
    spec = structure_spec_for(conv, channel_ratio=0.5, kernel_reduction=1)
    assert (spec.channels, spec.kernel_size) == (2, (2, 1))  # C_out/groups = 4 -> 2, K - 1
    new, residual = structured_from_dense(conv, spec, "up")
    assert isinstance(new, StructuredConvTranspose2d) and new.weight.shape == (6, 2, 2, 1)
    assert residual == pytest.approx(float(structural_residual(conv.weight.detach().double(), spec)))
    torch.testing.assert_close(new.to_dense().weight, project(conv.weight.detach(), spec))
    twin = structured_like(conv, spec)
    assert twin.structure_record() == new.structure_record()
    with pytest.raises(ValueError, match=r"up: structured channels \(c\)=5 is out of range; valid range is 1..4"):
        structured_from_dense(conv, type(spec)(5, (2, 1)), "up")


@pytest.mark.parametrize(
    "conv, macs",
    [
        # transposed: per input position, C_in · C_out/groups · taps; Ghost: primary + cheap · prod(stride)
        (nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1), (8 * 6 * 4, 8 * 3 * 4 + 3 * 3 * 2)),
        (nn.ConvTranspose2d(8, 6, 3, stride=2, bias=False), (8 * 6 * 9, 8 * 3 * 9 + 3 * 9 * 4)),
        (nn.ConvTranspose3d(4, 4, 2, stride=2), (4 * 4 * 8, 4 * 2 * 8 + 2 * 27 * 8)),
        (nn.Conv3d(4, 6, 3), (6 * 4 * 27, 3 * 4 * 27 + 3 * 27)),
        (nn.Conv1d(4, 6, 5), (6 * 4 * 5, 3 * 4 * 5 + 3 * 3)),
    ],
)
def test_ghost_counts_of_the_new_kinds_by_hand(conv: nn.Module, macs: tuple[int, int]) -> None:
    model = nn.Sequential(nn.Identity(), conv)
    result = convert_to_ghost(model, skip_first=False, skip_last=False, init="random", progress=False)
    (change,) = result.changes
    dims = len(conv.kernel_size)
    m, taps, bias = math.ceil(conv.out_channels / 2), math.prod(conv.kernel_size), conv.bias is not None
    assert change.params_after == m * conv.in_channels * taps + m * bias + m * (3**dims + bias)
    assert (change.macs_per_position_before, change.macs_per_position_after) == macs


def test_transposed_ghost_inherits_in_kernel_space_with_calibration() -> None:
    model = UNet().eval()
    x = torch.randn(4, 3, 16, 16)
    result = convert_to_ghost(model, calibration=x, progress=False)
    details = {c.name: c for c in result.changes}
    assert "kernel-space fit: transposed convs are not fitted on the calibration batch" in details["up"].detail
    assert details["up"].error is None and details["enc2.0"].error is not None
    assert isinstance(model.up, GhostConvTranspose2d) and model.up.output_index is not None  # inherited order
    with pytest.raises(ValueError, match="up: calibration_input is not read for a ConvTranspose2d"):
        ghost_from_conv(nn.ConvTranspose2d(16, 8, 4), calibration_input=torch.randn(1, 16, 4, 4), name="up")


def test_subclass_that_keeps_forward_converts_and_one_that_overrides_it_is_skipped() -> None:
    class Renamed(nn.Conv3d):  # torchvision's Conv3DSimple: a constructor and a static method, nothing else
        @staticmethod
        def get_downsample_stride(stride: int) -> tuple[int, int, int]:
            return stride, stride, stride

    class Scaled(nn.Conv3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(
        nn.Conv3d(3, 8, 1), Renamed(8, 8, 3, padding=1), Scaled(8, 8, 3, padding=1), nn.Conv3d(8, 2, 1)
    )
    plan = {p.name: p for p in select_layers(model, "ghost", example_input=torch.randn(1, 3, 4, 4, 4))}
    assert plan["1"].action == "convert"
    assert plan["2"].reason == "subclass Scaled of nn.Conv3d may change forward(); only plain layers convert"


# ------------------------------------------------------------------------------------------------ callbacks


def lit_module(lp: Any, net: str, loss_scale: float = 1.0) -> Any:
    """``lp``'s LightningModule around one of :data:`NETS`: a squared-output loss times ``loss_scale`` (0: only the
    callbacks move the weights), SGD, ``example_input_array`` set."""
    build, shape, _ = NETS[net]

    class Wrapped(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build()
            self.example_input_array = torch.randn(*shape)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return loss_scale * self(batch[0]).pow(2).mean()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self(batch[0]).pow(2).mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05 if loss_scale else 0.5)

    return Wrapped()


def loader(net: str, n: int = 4) -> torch.utils.data.DataLoader:
    shape = NETS[net][1]
    data = torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)


def trainer(lp: Any, **kwargs: Any) -> Any:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "max_epochs": 2,
    }
    return lp.Trainer(**{**options, **kwargs})


def _fit_and_check(lp: Any, net: str, method: str) -> None:
    module = lit_module(lp, net)
    x = module.example_input_array
    if method == "ghost":
        # Converted at epoch 1 (mid-fit: optimizer edited in place), fitted on a recorded batch where it can be.
        callback = GhostConvCallback(start_epoch=1, calibration_batches=1, init="inherit", verbose=0)
        cheap = GHOST
    else:
        callback = StructuredConvCallback(channel_ratio=0.5, project_start_epoch=0, project_end_epoch=1, verbose=0)
        cheap = STRUCTURED
    original = NETS[net][0]()
    fit = trainer(lp, callbacks=[callback])
    fit.fit(module, loader(net), loader(net, 2))
    assert callback.targets
    for name in callback.targets:
        layer = module.get_submodule(name)
        before = original.get_submodule(name.removeprefix("net."))
        assert type(layer) is cheap[next(t for t in cheap if isinstance(before, t))], name
    for name in NETS[net][2]:
        assert type(module.net.get_submodule(name)) in (nn.Conv2d, nn.Linear), name  # prediction layers stay dense
    assert float(fit.callback_metrics["compression/macs_ratio"]) > 1.0
    # A fresh module takes the state dict of the converted one.
    fresh = lit_module(lp, net)
    state = module.state_dict()
    restructure(fresh, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), module.eval()(x))


@pytest.mark.parametrize("method", ["ghost", "structured"])
@pytest.mark.parametrize("net", ["audio", "unet"])
def test_callbacks_convert_during_fit(net: str, method: str) -> None:
    _fit_and_check(importlib.import_module("lightning.pytorch"), net, method)


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_callbacks_convert_during_fit_under_both_packages(pl_ns: Any, method: str) -> None:
    _fit_and_check(pl_ns, "unet", method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_callbacks_convert_r3d_18_during_fit(method: str) -> None:
    _fit_and_check(importlib.import_module("pytorch_lightning"), "r3d_18", method)


@pytest.mark.filterwarnings("ignore:.*are not all reached")
@pytest.mark.parametrize("net", ["audio", "unet"])
def test_structured_callback_regularizes_every_conv_type_toward_its_structure(net: str) -> None:
    """With a zero task loss only the regularizer moves the weights: every target's residual ‖(I-P)W‖/‖W‖ drops,
    the transposed convs' measured on their input-channel blocks."""
    lp = importlib.import_module("lightning.pytorch")
    module = lit_module(lp, net, loss_scale=0.0)
    callback = StructuredConvCallback(
        channel_ratio=0.5, reg_weight=1.0, project_start_epoch=5, decompose_on_fit_end=False, verbose=0
    )
    before = {}

    class Before(lp.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            before.update(
                {
                    n: float(structural_residual(pl_module.get_submodule(n).weight.detach(), callback.specs[n]))
                    for n in callback.targets
                }
            )

    trainer(lp, max_epochs=1, callbacks=[callback, Before()]).fit(module, loader(net))
    kinds = {type(module.get_submodule(n)) for n in callback.targets}
    assert kinds >= ({nn.Conv1d} if net == "audio" else {nn.Conv2d, nn.ConvTranspose2d})
    for name in callback.targets:
        assert callback.layer_residuals[name] < before[name] - 1e-3, name
        spec = callback.specs[name]
        layer = module.get_submodule(name)
        if isinstance(layer, nn.ConvTranspose2d):
            assert spec == structure_spec_for(layer, 0.5)  # (C_out/groups, K): the block of each input channel
            assert spec.channels == layer.out_channels // layer.groups // 2


# ------------------------------------------------------------------------------------------------ deploy


def _bn(n: int, dims: int, seed: int = 0) -> nn.Module:
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](n)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
        bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
        bn.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return bn


@pytest.mark.parametrize(
    "layer, dims, applied, reason",
    [
        (nn.Conv1d(4, 6, 3, padding=1), 1, True, "exact"),
        (nn.Conv3d(4, 6, 3, padding=1), 3, True, "exact"),
        (nn.ConvTranspose2d(4, 6, 2, stride=2), 2, True, "exact"),
        (nn.Conv1d(4, 6, 3, bias=False), 1, False, "Conv1d without bias: the folded bias needs a fused Conv1d"),
        (nn.ConvTranspose3d(4, 6, 2, bias=False), 3, False, "ConvTranspose3d without bias"),
        (StructuredConv1d(4, 6, 3, padding=1, hidden_channels=2), 1, True, "exact"),
        (StructuredConv3d(4, 6, 3, padding=1, bias=False), 3, True, "exact"),
        (GhostConv1d(4, 6, 3, padding=1, dw_size=1), 1, True, "exact: scale into both convs"),
        (GhostConv3d(4, 6, 3, padding=1), 3, False, "which needs a fused GhostConv3d"),
        (StructuredConvTranspose2d(4, 6, 3), 2, False, "StructuredConvTranspose2d: the box filter mixes"),
        (GhostConvTranspose1d(4, 6, 3), 1, False, "GhostConvTranspose1d: a fold needs a fused form"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_fold_batchnorm_after_the_new_kinds_folds_or_says_why(layer: nn.Module, dims: int, applied: bool, reason: str):
    torch.manual_seed(0)
    model = nn.Sequential(layer, _bn(6, dims), nn.ReLU()).eval()
    x = torch.randn(2, 4, *[6] * dims)
    expected = model(x)
    (fold,) = fold_batchnorm(model, x)
    assert (fold.source, fold.target, fold.applied) == ("0", "1", applied)
    assert reason in fold.detail
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    if applied:  # the folded state dict restructures into a fresh model
        fresh = nn.Sequential(__import__("copy").deepcopy(layer), _bn(6, dims), nn.ReLU()).eval()
        state = model.state_dict()
        restructure(fresh, state)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


def test_layer_forms_of_the_new_kinds() -> None:
    assert list(layer_forms(StructuredConv1d(4, 4, 3))) == [
        "decomposed/adds",
        "decomposed/avg_pool",
        "decomposed/cumsum",
        "dense",
    ]
    assert list(layer_forms(StructuredConv3d(4, 4, 3))) == ["decomposed/adds", "decomposed/cumsum", "dense"]
    assert list(layer_forms(StructuredConvTranspose2d(4, 4, 3))) == ["decomposed", "dense"]
    for ghost in (GhostConv1d(4, 4, 3), GhostConv3d(4, 4, 3), GhostConvTranspose2d(4, 4, 3)):
        assert list(layer_forms(ghost)) == ["ghost"]
    assert all(t in CHEAP_TYPES for t in (*GHOST.values(), *STRUCTURED.values()))


@pytest.mark.parametrize("method", ["ghost", "structured"])
def test_optimize_for_inference_takes_every_conv_type(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_cheapconv.deploy import optimize
    from lightning_cheapconv.deploy.timing import Latency

    def fake_timing(runners, repeats, min_time, warmup, device):  # no timed unit tests: a fixed order instead
        return {name: Latency((1.0 + i,)) for i, name in enumerate(runners)}

    monkeypatch.setattr(optimize, "time_interleaved", fake_timing)
    model = every_conv_type().eval()
    x = torch.randn(*ALL_TYPES_INPUT)
    convert = (
        convert_to_ghost if method == "ghost" else lambda m, **kw: decompose_structured(m, channel_ratio=0.5, **kw)
    )
    convert(model, example_input=x, progress=False)
    report = optimize_for_inference(model, x, repeats=1, min_time=0.0, warmup=0)
    kinds = {row.kind: row.chosen for row in report.layers}
    cheap = GHOST if method == "ghost" else STRUCTURED
    expected = {cls.__name__ for src, cls in cheap.items()}
    assert set(kinds) == expected
    if method == "ghost":
        assert set(kinds.values()) == {"ghost"}
        assert report.cheap_form_won is None  # Ghost layers have no dense form to compare with
    else:
        assert kinds["StructuredConvTranspose2d"] in ("decomposed", "dense")
    torch.testing.assert_close(report.model(x), model(x), atol=1e-5, rtol=1e-5)
