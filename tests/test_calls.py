"""ModelCall: the batch size and the first examples of the calls the callbacks record, for every batch layout."""

from __future__ import annotations

from collections import namedtuple

import torch

from lightning_cheapconv.calls import ModelCall, as_calls

Pair = namedtuple("Pair", "image mask")


def test_a_tensor_batch():
    x = torch.randn(8, 3, 4, 4)
    call = ModelCall((x,), {"scale": torch.tensor(2.0), "mask": torch.ones(8, 1)})
    assert call.batch_size == 8
    first = call.first(2)
    assert first.args[0].shape == (2, 3, 4, 4) and torch.equal(first.args[0], x[:2])
    assert first.kwargs["mask"].shape == (2, 1) and first.kwargs["scale"].shape == ()
    assert first.args[0].data_ptr() != x.data_ptr()  # copies


def test_torchvision_detection_lists_of_images_and_targets():
    """torchvision's detection models take a list of ``(3, H, W)`` images (any sizes) and a list of target dicts:
    the batch is the list, not the images' 3 colour channels, and boxes with 3 rows stay whole."""
    images = [torch.rand(3, 16 + i, 16) for i in range(4)]
    targets = [{"boxes": torch.rand(3, 4), "labels": torch.ones(3, dtype=torch.int64)} for _ in range(4)]
    call = ModelCall((images, targets))
    assert call.batch_size == 4
    first = call.first(1)
    assert [tuple(t.shape) for t in first.args[0]] == [(3, 16, 16)]
    assert len(first.args[1]) == 1 and first.args[1][0]["boxes"].shape == (3, 4)
    assert torch.equal(first.args[0][0], images[0]) and first.args[0][0].data_ptr() != images[0].data_ptr()


def test_a_list_of_batched_inputs_and_a_namedtuple():
    """A list of 4-D tensors is several batched inputs, not examples; a namedtuple keeps its type."""
    x, m = torch.randn(5, 3, 4, 4), torch.randn(5, 1, 4, 4)
    call = ModelCall(([x, m], Pair(x, m)))
    assert call.batch_size == 5
    first = call.first(2)
    assert [tuple(t.shape) for t in first.args[0]] == [(2, 3, 4, 4), (2, 1, 4, 4)]
    assert isinstance(first.args[1], Pair) and first.args[1].mask.shape == (2, 1, 4, 4)


def test_as_calls():
    x = torch.randn(2, 3)
    calls = as_calls([x, ModelCall((x,), {"y": 1})])
    assert [c.kwargs for c in calls] == [{}, {"y": 1}] and calls[0].args[0] is x
