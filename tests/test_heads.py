"""Prediction layers (lightning_cheapconv/heads.py): found from the data flow, kept by every conversion."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from lightning_cheapconv.calls import ModelCall
from lightning_cheapconv.convert import (
    PREDICTION_KEPT,
    PredictionLayersUnknownWarning,
    convert_to_ghost,
    decompose_structured,
    select_layers,
)
from lightning_cheapconv.heads import find_prediction_layers
from lightning_cheapconv.nn import GhostConv2d

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = torch.randn(1, 3, 16, 16)


class TwoHeads(nn.Module):
    """A detector in miniature: a backbone, a class head and a box head (prediction layers), and a second stage that
    reads the backbone's features at the class head's detached top scores (post-processing, as proposals are)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 16, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # in place on body's output: the graph still leads back to body
        self.cls_logits = nn.Conv2d(16, 4, 1)
        self.bbox_pred = nn.Conv2d(16, 4, 1)
        self.refine = nn.Conv2d(16, 16, 3, padding=1)
        self.refine_pred = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.act(self.body(self.stem(x)))
        scores = self.cls_logits(features)
        boxes = self.bbox_pred(features)
        top = scores.detach().flatten(1).argmax(1, keepdim=True) % features.shape[1]  # a channel: post-processing
        index = top[:, :, None, None].expand(-1, 1, features.shape[2], features.shape[3])
        picked = features.gather(1, index) * torch.ones_like(features)
        second = self.refine(picked).mean((2, 3))
        return {"scores": scores, "boxes": boxes, "refined": self.refine_pred(second)}


class Untraceable(TwoHeads):
    """Control flow on a value: ``torch.fx`` cannot trace it."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.sum() > float("inf"):
            x = -x
        return super().forward(x)


class HiddenFlow(Untraceable):
    """Part of the forward pass runs without autograd: the example's graph cannot tell who reads what."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.sum() > float("inf"):
            x = -x
        with torch.no_grad():
            x = self.stem(x)
        return {"out": self.cls_logits(self.act(self.body(x)))}


class BoxSampler(nn.Module):
    """A box head whose output only places ``roi_align``'s sampling boxes (as Mask R-CNN's box regression places the
    mask head's RoIs): coordinates, not values, reach the mask conv."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.box = nn.Linear(8, 4)
        self.mask = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        corners = torch.sigmoid(self.box(features.mean((2, 3)))) * x.shape[-1]
        low, high = corners[:, :2], corners[:, :2] + corners[:, 2:] + 1
        rois = torch.cat([torch.arange(len(x), dtype=x.dtype)[:, None], low, high], 1)
        return self.mask(roi_align(features, rois, (4, 4)))


def test_a_classifier_has_one_prediction_layer_found_both_ways() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    assert find_prediction_layers(model) == ["3"]
    assert find_prediction_layers(model, EXAMPLE) == ["3"]
    assert find_prediction_layers(model, ModelCall((EXAMPLE,))) == ["3"]


@pytest.mark.parametrize("example", [None, EXAMPLE], ids=["fx", "example"])
def test_every_head_and_post_processing(example: torch.Tensor | None) -> None:
    assert find_prediction_layers(TwoHeads(), example) == ["cls_logits", "bbox_pred", "refine_pred"]


def test_untraceable_model_needs_an_example_and_hidden_flow_is_unknown() -> None:
    assert find_prediction_layers(Untraceable()) is None
    assert find_prediction_layers(Untraceable(), EXAMPLE) == ["cls_logits", "bbox_pred", "refine_pred"]
    assert find_prediction_layers(HiddenFlow(), EXAMPLE) is None  # not ["stem", ...]: stem's reader is unseen


def test_coordinates_are_no_data_flow() -> None:
    assert find_prediction_layers(BoxSampler(), EXAMPLE) == ["box", "mask"]


def test_layers_not_called_are_not_prediction_layers() -> None:
    class Aux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.aux = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.body(x)
            return (self.head(features), self.aux(features)) if self.training else self.head(features)

    assert find_prediction_layers(Aux().train(), EXAMPLE) == ["head"]  # the pass runs in eval mode
    assert find_prediction_layers(Aux().train()) == ["head", "aux"]  # a trace sees the module's own mode


def test_cheap_modules_are_layers_and_their_parts_are_not() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    convert_to_ghost(model, skip_first=False, skip_last=False)
    assert isinstance(model[2], GhostConv2d)
    assert find_prediction_layers(model) == ["2"]
    assert find_prediction_layers(model, EXAMPLE) == ["2"]


def test_the_model_is_left_as_it_was() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Flatten(), nn.Linear(1568, 3))
    model.train()
    model[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    example = EXAMPLE.clone()
    assert find_prediction_layers(model, example) == ["4"]
    assert model.training and not model[1].training and model[2].training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not example.requires_grad
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"find_prediction_layers: example_input with input shapes \[\(1, 5, 8, 8\)\]"):
        find_prediction_layers(TwoHeads(), torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="example_input must be a torch.Tensor batch of model inputs or a ModelCall"):
        find_prediction_layers(TwoHeads(), [EXAMPLE])
    with pytest.raises(ValueError, match="model must be a Module"):
        find_prediction_layers(EXAMPLE)
    with pytest.raises(ValueError, match="skip_prediction=1 is not a bool"):
        select_layers(TwoHeads(), "ghost", skip_prediction=1)


# -- the selection ------------------------------------------------------------------------------------------------
def _reasons(plan) -> dict[str, str]:
    return {p.name: p.reason for p in plan if p.action == "skip"}


def test_selection_keeps_every_prediction_layer() -> None:
    for plan in (select_layers(TwoHeads(), "ghost"), select_layers(Untraceable(), "ghost", example_input=EXAMPLE)):
        reasons = _reasons(plan)
        assert reasons["cls_logits"] == reasons["bbox_pred"] == "prediction layer, kept"
        assert [p.name for p in plan if p.action == "convert"] == ["body", "refine"]


def test_selection_falls_back_to_the_last_layer_and_says_why() -> None:
    # No example, no trace: only the last layer (refine_pred, a Linear: no Ghost candidate) would be kept.
    plan = select_layers(Untraceable(), "ghost")
    assert [p.name for p in plan if p.action == "convert"] == ["body", "cls_logits", "bbox_pred", "refine"]
    plan = select_layers(Untraceable(), "structured", linear=True, channel_ratio=0.5)
    assert _reasons(plan)["refine_pred"] == (
        "last layer (classifier) is kept, as in the papers (prediction layers not found: no example input (a "
        "LightningModule's example_input_array) and the model does not trace with torch.fx)"
    )
    hidden = _reasons(select_layers(HiddenFlow(), "structured", linear=True, channel_ratio=0.5, example_input=EXAMPLE))
    assert "the example's forward pass runs partly without autograd" in hidden["refine_pred"]


def test_conversion_that_cannot_find_the_heads_warns() -> None:
    """Not only a skip reason: a conversion that would convert other heads' convs warns."""
    model = Untraceable()
    with pytest.warns(PredictionLayersUnknownWarning, match="prediction layers were not found .* Pass example_input="):
        convert_to_ghost(model, skip_first=False)
    assert isinstance(model.cls_logits, GhostConv2d)  # converted: the warning is why a user should care
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        convert_to_ghost(Untraceable(), skip_first=False, example_input=EXAMPLE)
    assert not [w for w in record if "prediction layers were not found" in str(w.message)]


def test_skip_last_and_skip_prediction() -> None:
    def converted(**kwargs) -> list[str]:
        plan = select_layers(TwoHeads(), "structured", linear=True, channel_ratio=0.5, **kwargs)
        return [p.name for p in plan if p.action == "convert"]

    assert converted() == ["body", "refine"]  # skip_prediction follows skip_last (True)
    assert converted(skip_last=False) == ["body", "cls_logits", "bbox_pred", "refine", "refine_pred"]
    assert converted(skip_prediction=False) == ["body", "cls_logits", "bbox_pred", "refine"]  # the last layer only
    assert converted(skip_last=False, skip_prediction=True) == ["body", "refine"]
    plain = _reasons(select_layers(TwoHeads(), "structured", linear=True, channel_ratio=0.5, skip_prediction=False))
    assert plain["refine_pred"] == "last layer (classifier) is kept, as in the papers"


def test_conversions_keep_the_heads_dense_and_print_why() -> None:
    model = Untraceable()
    result = convert_to_ghost(model, example_input=EXAMPLE)
    assert result.converted == ["body", "refine"]
    assert "  cls_logits: skipped (prediction layer, kept)" in str(result).splitlines()
    assert isinstance(model.cls_logits, nn.Conv2d) and isinstance(model.bbox_pred, nn.Conv2d)
    # From the calibration batch's first example when no example is given, as the callbacks do.
    result = decompose_structured(Untraceable(), channel_ratio=0.5, calibration=torch.randn(4, 3, 16, 16))
    assert result.converted == ["body", "refine"]
    everything = ["body", "cls_logits", "bbox_pred", "refine"]  # the last layer is a Linear, no Ghost candidate
    assert convert_to_ghost(Untraceable(), example_input=EXAMPLE, skip_prediction=False).converted == everything


def test_shapes_and_functional_post_processing_are_no_data_flow() -> None:
    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.classifier, self.detail = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 5, 1), nn.Conv2d(8, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.body(x)
            logits = self.classifier(features)
            detail = self.detail(F.interpolate(features, size=logits.shape[-2:]))  # reads the logits' shape only
            return F.interpolate(logits + detail, size=x.shape[-2:], mode="bilinear")

    expected = ["classifier", "detail"]
    assert find_prediction_layers(Segmenter()) == find_prediction_layers(Segmenter(), EXAMPLE) == expected


# -- the callbacks ------------------------------------------------------------------------------------------------
def test_callback_finds_prediction_layers_on_the_recorded_input(tmp_path) -> None:
    """A LightningModule with neither a trace nor ``example_input_array``: setup keeps only the last layer, and the
    conversion at epoch 1 keeps every prediction layer, found on the input recorded in the first batch."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_cheapconv import GhostConvCallback

    class Detector(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Untraceable()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return sum(t.mean() for t in self(batch[0]).values())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Detector()
    callback = GhostConvCallback(start_epoch=1, verbose=0)
    data = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16)), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    assert isinstance(model.net.body, GhostConv2d) and isinstance(model.net.refine, GhostConv2d)
    assert type(model.net.cls_logits) is nn.Conv2d and type(model.net.bbox_pred) is nn.Conv2d
    assert _reasons(callback.plan)["net.cls_logits"] == _reasons(callback.plan)["net.bbox_pred"] == PREDICTION_KEPT
