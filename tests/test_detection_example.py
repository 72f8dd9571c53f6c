"""examples/detection_ghost.py: a torchvision Faster R-CNN fine-tuned into Ghost modules, on shapes it draws itself."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from test_examples import EXAMPLES, run_example, summary

from lightning_cheapconv import restructure
from lightning_cheapconv.nn.record import decode_record

# Faster R-CNN's prediction layers: the RPN's output convs, which must stay dense, and the box predictor (Linear).
PREDICTION = {
    "model.rpn.head.cls_logits": "Conv2d",
    "model.rpn.head.bbox_pred": "Conv2d",
    "model.roi_heads.box_predictor.cls_score": "Linear",
    "model.roi_heads.box_predictor.bbox_pred": "Linear",
}
# 96-pixel images, a handful of them: a CPU step takes about a second.
SMALL = ["--image-size", "96", "--batch-size", "2", "--accelerator", "cpu"]


@pytest.fixture
def example(monkeypatch):
    """The example's module (it imports ``common`` from examples/)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    import detection_ghost

    return detection_ghost


def test_shapes_have_tight_boxes_and_are_seeded(example):
    data = example.ShapesDataset(6, image_size=64, seed=3)
    for index in range(len(data)):
        image, target = data[index]
        again, _ = example.ShapesDataset(6, image_size=64, seed=3)[index]
        assert torch.equal(image, again) and image.shape == (3, 64, 64)
        assert target["labels"].min() >= 1 and target["labels"].max() < len(example.CLASSES)
        covered = torch.zeros(64, 64, dtype=torch.bool)
        for x0, y0, x1, y1 in target["boxes"].long().tolist():
            covered[y0:y1, x0:x1] = True
        background = image[:, ~covered][:, 0]  # the colour of a pixel outside every box
        assert (image[:, ~covered] == background[:, None]).all()  # nothing is drawn outside the boxes
        for x0, y0, x1, y1 in target["boxes"].long().tolist():
            inside = (image[:, y0:y1, x0:x1] != background[:, None, None]).any(0)
            # The shape fills its box edge to edge: every side of the box touches it.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    assert not torch.equal(data[0][0], example.ShapesDataset(6, image_size=64, seed=4)[0][0])


@pytest.mark.parametrize("lightning", ["pytorch_lightning", "lightning"])
def test_fast_dev_run(tmp_path, lightning):
    # Conversion at epoch 0 (in setup): the one training batch already runs the Ghost detector.
    run_example(
        "detection_ghost.py", "--fast-dev-run", *SMALL, "--train-images", "2", "--val-images", "2",
        "--start-epoch", "0", "--lightning", lightning, "--output", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    result = summary(tmp_path)
    assert len(result["ghost_layers"]) > 40
    assert result["prediction_layers"] == PREDICTION
    assert result["compression/params_ratio"] > 1.0 and math.isfinite(result["val/map"])


def test_tiny_run_converts_mid_fit_and_reports_map(tmp_path, example):
    # Epoch 0 dense; in epoch 1 the trained weights are inherited, fitted on the activations of one recorded training
    # batch (what forward received: images and targets), BatchNorm recalibrated; then a test on held-out images.
    run_example(
        "detection_ghost.py", *SMALL, "--epochs", "2", "--start-epoch", "1", "--calibration-batches", "1",
        "--train-images", "4",
        "--val-images", "2", "--output", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    result = summary(tmp_path)
    metrics = ("test/map", "test/map_50", "val/map", "compression/params_ratio", "compression/macs_ratio")
    for key in (*metrics, "ghost/mean_fit_error"):
        assert math.isfinite(result[key]), key
    assert result["compression/params_ratio"] > 1.0 and result["compression/macs_ratio"] > 1.0
    # The backbone (body and FPN) alone: Ghost with ratio 2 about halves its convolutions.
    assert result["backbone/params_ratio"] > 1.3 and result["backbone/macs_ratio"] > 1.3
    assert result["prediction_layers"] == PREDICTION
    # The saved model is the converted one: Ghost records where the summary says, dense prediction convs, and it
    # restructures into a fresh detector.
    state = torch.load(tmp_path / "converted.pt", weights_only=True)
    kinds = {k.removesuffix("._extra_state"): decode_record(v)["kind"] for k, v in state.items() if "extra_state" in k}
    assert sorted(n for n, kind in kinds.items() if kind == "GhostConv2d") == sorted(result["ghost_layers"])
    assert state["model.rpn.head.cls_logits.weight"].shape == (15, 256, 1, 1)
    import pytorch_lightning as pl

    fresh = example.detector_class(pl)(image_size=96)
    restructure(fresh, state)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        (detections,) = fresh(torch.rand(1, 3, 96, 96))
    assert detections["boxes"].shape[1] == 4
