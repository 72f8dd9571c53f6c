"""Train a torchvision detector while GhostConvCallback turns its convolutions into Ghost modules.

The detector is torchvision's Faster R-CNN with a MobileNetV3-Large FPN backbone, trained from scratch (no
pretrained weights: nothing is downloaded) on shapes the script draws itself: rectangles, ellipses and triangles at
random places and sizes, with their boxes and labels. The module is an ordinary LightningModule around the torchvision
model (images and a list of targets in, a loss dict in training, boxes in evaluation); the callback converts the
backbone, FPN and RPN convolutions at --start-epoch (inheriting the trained weights), while the prediction layers stay
dense. mAP (torchmetrics, COCO-style, box IoU; needs pycocotools) is logged next to the callback's compression ratios.

python examples/detection_ghost.py          # offline: 3 epochs dense, 3 Ghost; about 12 minutes on 2 CPU cores
python examples/detection_ghost.py --accelerator gpu --epochs 40 --start-epoch 20 --train-images 4096
python examples/detection_ghost.py --fast-dev-run --lightning lightning
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import common
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
from torchvision.transforms.functional import pil_to_tensor

from lightning_cheapconv import GhostConv2d, GhostConvCallback, count_complexity, install_restructure_hook

CLASSES = ("background", "rectangle", "ellipse", "triangle")  # label 0 is the detector's background


Target = dict[str, Tensor]


# -- data: shapes drawn with their boxes ----------------------------------------------------------------------------
def _colour(rng: random.Random, far_from: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    """A random RGB colour; with ``far_from``, one that differs from it by at least 160 in total (visible)."""
    while True:
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if far_from is None or sum(abs(a - b) for a, b in zip(colour, far_from, strict=True)) >= 160:
            return colour


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def draw_shapes(
    rng: random.Random, image_size: int, max_shapes: int, min_extent: int, max_extent: int
) -> tuple[Image.Image, Target]:
    """One image with 1 to ``max_shapes`` non-overlapping shapes and their targets.

    Returns a ``image_size`` x ``image_size`` RGB image and ``{"boxes": float32 (n, 4) in pixels, (x0, y0, x1, y1),
    x1/y1 exclusive; "labels": int64 (n,) indices into CLASSES}``. Each shape fills its box edge to edge (an ellipse
    touches all four sides, a triangle has its base on one side and its apex on the opposite one), so the box is the
    tight box of the drawn pixels. Width and height are drawn independently from [min_extent, max_extent].
    """
    background = _colour(rng)
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    wanted = rng.randint(1, max_shapes)
    for _ in range(20 * max_shapes):  # rejection sampling of free places
        if len(boxes) == wanted:
            break
        w, h = rng.randint(min_extent, max_extent), rng.randint(min_extent, max_extent)
        x0, y0 = rng.randrange(image_size - w + 1), rng.randrange(image_size - h + 1)
        box = (x0, y0, x0 + w, y0 + h)
        if _overlaps(box, boxes):
            continue
        label = rng.randint(1, len(CLASSES) - 1)
        fill = _colour(rng, far_from=background)
        corners = (x0, y0, x0 + w - 1, y0 + h - 1)  # PIL's coordinates are inclusive
        if CLASSES[label] == "rectangle":
            draw.rectangle(corners, fill=fill)
        elif CLASSES[label] == "ellipse":
            draw.ellipse(corners, fill=fill)
        else:
            apex = rng.randint(x0, x0 + w - 1)
            up = rng.random() < 0.5
            base_y, apex_y = (corners[3], y0) if up else (y0, corners[3])
            draw.polygon([(x0, base_y), (corners[2], base_y), (apex, apex_y)], fill=fill)
        boxes.append(box)
        labels.append(label)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    return image, target


class ShapesDataset(Dataset):
    """``size`` images of shapes with their boxes, drawn on demand; image ``i`` depends only on ``(seed, i)``.

    Items are ``(image, target)``: a float tensor (3, image_size, image_size) in [0, 1] and the target dict of
    :func:`draw_shapes`, the input format of torchvision's detection models.

    Example::

        >>> image, target = ShapesDataset(8, image_size=128, seed=0)[3]
        >>> image.shape, target["boxes"].shape[1], target["labels"].dtype
        (torch.Size([3, 128, 128]), 4, torch.int64)
    """

    def __init__(self, size: int, image_size: int = 128, seed: int = 0, max_shapes: int = 3) -> None:
        if size < 1 or image_size < 32 or max_shapes < 1:
            raise ValueError(
                f"ShapesDataset: size={size}, image_size={image_size}, max_shapes={max_shapes}; "
                "valid: size >= 1, image_size >= 32, max_shapes >= 1"
            )
        self.size, self.image_size, self.seed, self.max_shapes = size, image_size, seed, max_shapes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not 0 <= index < self.size:
            raise IndexError(f"ShapesDataset: index {index} out of range [0, {self.size})")
        rng = random.Random(self.seed * 1_000_003 + index)
        extent = self.image_size
        image, target = draw_shapes(rng, extent, self.max_shapes, min_extent=extent // 8, max_extent=extent // 2)
        return pil_to_tensor(image).float().div_(255), target


def collate(batch: list[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target]]:
    """The images stacked into one (B, 3, H, W) tensor (they have one size), and the list of their targets."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


# -- the LightningModule --------------------------------------------------------------------------------------------
class DetectionTask:
    """The Lightning hooks of a detector; :func:`make_detector` mixes them into the chosen package's LightningModule.

    ``forward(images, targets=None)`` runs the torchvision model: in training mode it returns a dict of losses, in
    eval mode a list of ``{"boxes", "labels", "scores"}`` per image. ``images`` is one (B, 3, H, W) tensor rather than
    torchvision's list of (3, H, W) images: GhostConvCallback counts MACs on the first example of what ``forward``
    received, and it takes the first dimension of the first tensor for the batch, which for a list of images is the
    3 colour channels (it would count all B images on one channel each). Validation and test log COCO mAP
    (``val/map``, ``val/map_50``, ``val/map_75``, ``val/mar_100``; ``test/...``) from
    :class:`torchmetrics.detection.MeanAveragePrecision`.
    """

    def __init__(
        self,
        num_classes: int = len(CLASSES),
        image_size: int = 128,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = fasterrcnn_mobilenet_v3_large_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            # Images are resized to image_size (the default 320-640 is for photos); fewer proposals and sampled
            # boxes than the defaults keep a CPU step around a second at batch 4.
            min_size=image_size,
            max_size=image_size,
            rpn_pre_nms_top_n_train=300,
            rpn_post_nms_top_n_train=150,
            rpn_pre_nms_top_n_test=150,
            rpn_post_nms_top_n_test=75,
            rpn_batch_size_per_image=64,
            box_batch_size_per_image=64,
            box_detections_per_img=20,
        )
        # One image: Lightning's model summary counts FLOPs on it, and at setup (before any training step) the
        # callback runs it to find the prediction layers and weights shared between layers. A detector does not
        # trace with torch.fx, so without it only the single last layer would count as a prediction layer.
        self.example_input_array = torch.zeros(1, 3, image_size, image_size)
        self.val_map = mean_average_precision()
        self.test_map = mean_average_precision()
        # Checkpoints of any stage (dense, part or all Ghost) load into a fresh, dense detector: --ckpt fine-tunes them.
        install_restructure_hook(self)

    def forward(self, images: Tensor, targets: list[Target] | None = None) -> Any:
        return self.model(list(images), targets)

    def training_step(self, batch: tuple[Tensor, list[Target]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self(images, targets)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch: tuple[Tensor, list[Target]], metric: Any) -> None:
        images, targets = batch
        metric.update(self(images), targets)

    def _log_map(self, metric: Any, stage: str) -> None:
        result = metric.compute()
        metric.reset()
        keys = ("map", "map_50", "map_75", "mar_100")
        self.log_dict({f"{stage}/{k}": result[k].float() for k in keys}, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, list[Target]], batch_idx: int) -> None:
        self._evaluate(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def test_step(self, batch: tuple[Tensor, list[Target]], batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (momentum 0.9) or AdamW on every parameter; linear warm-up over ``warmup_epochs``, then cosine."""
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, self.trainer.max_epochs or 1)
        factor = functools.partial(lr_factor, warmup=hp.warmup_epochs, total=total)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}


def lr_factor(epoch: int, warmup: int, total: int) -> float:
    """Learning-rate factor at ``epoch``: linear from 1/(warmup+1) to 1 over ``warmup`` epochs, then a cosine to 0."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def mean_average_precision() -> Any:
    """COCO-style box mAP; torchmetrics evaluates it with pycocotools."""
    from torchmetrics.detection import MeanAveragePrecision

    try:
        return MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    except ModuleNotFoundError as err:  # torchmetrics checks for its backend here
        raise ImportError(
            f"detection_ghost.py: mAP needs pycocotools: `pip install pycocotools` "
            f"(or `pip install torchmetrics[detection]`); torchmetrics said: {err}"
        ) from err


@functools.cache
def detector_class(pl: ModuleType) -> type:
    """:class:`DetectionTask` as a LightningModule of the package ``pl`` (``pytorch_lightning``/``lightning.pytorch``):
    a Trainer accepts only its own package's modules."""
    return type("ShapesDetector", (DetectionTask, pl.LightningModule), {"__module__": __name__})


def make_detector(args: argparse.Namespace) -> Any:
    cls = detector_class(common.lightning_package(args))
    if args.ckpt is not None:  # fine-tune a detector trained earlier (a dense one, or any stage: it restructures)
        return cls.load_from_checkpoint(args.ckpt, map_location="cpu")
    return cls(
        image_size=args.image_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
    )


# -- the run --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("shapes data (drawn by the script, seeded)")
    data.add_argument("--train-images", type=int, default=256)
    data.add_argument("--val-images", type=int, default=64)
    data.add_argument("--image-size", type=int, default=128, help="pixels; also the detector's min/max size")
    data.add_argument("--max-shapes", type=int, default=3, help="shapes per image: 1 to this many")
    common.trainer_arguments(parser, epochs=6, batch_size=4, lr=1e-3)
    common.ghost_arguments(parser)
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1, help="2: per-layer plan and fit errors")
    parser.set_defaults(optimizer="adamw", weight_decay=1e-4, start_epoch=3, output=Path("runs/detection_ghost"))
    args = parser.parse_args(argv)
    for flag, value, default in (
        ("--label-smoothing", args.label_smoothing, 0.0),
        ("--channels-last", args.channels_last, False),
    ):
        if value != default:
            parser.error(f"{flag} does not apply to the detection example")
    return args


def make_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train, validation and test loaders of three disjoint seeds (test: as many images as validation)."""
    loader = functools.partial(DataLoader, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    sets = [
        ShapesDataset(n, args.image_size, seed=args.seed * 3 + offset, max_shapes=args.max_shapes)
        for offset, n in enumerate((args.train_images, args.val_images, args.val_images))
    ]
    return loader(sets[0], shuffle=True), loader(sets[1]), loader(sets[2])


def layer_kinds(model: Any, callback: GhostConvCallback) -> dict[str, Any]:
    """Which layers ended up Ghost modules, their mean inheritance fit error (relative, on calibration activations or
    in kernel space; None with ``--init random``), and the type of each prediction layer (they must stay dense)."""
    ghost = [n for n in callback.targets if isinstance(model.get_submodule(n), GhostConv2d)]
    heads = ("rpn.head.cls_logits", "rpn.head.bbox_pred", "box_predictor.cls_score", "box_predictor.bbox_pred")
    prediction = [n for n, _ in model.named_modules() if n.endswith(heads)]
    errors = [e for n, e in callback.fit_errors.items() if n in ghost and e is not None]
    return {
        "ghost_layers": ghost,
        "ghost/mean_fit_error": sum(errors) / len(errors) if errors else None,
        "prediction_layers": {n: type(model.get_submodule(n)).__name__ for n in prediction},
    }


def backbone_cost(model: Any) -> tuple[int, int]:
    """Parameters and MACs per image of the backbone (MobileNetV3 body and FPN), from the detector's own rows.

    The whole-model ratios the callback logs include the RoI box head, two Linear layers (12,544 -> 1,024 -> 1,024)
    that hold most of the detector's parameters and, at 75 proposals per image, most of its MACs; Ghost modules
    replace convolutions only, so the backbone's own ratio is the one to compare with the classification examples.
    ``main`` compares the model as fit starts (dense, or the --ckpt's structure) with the model after fit.
    """
    complexity = count_complexity(model, example_input=model.example_input_array)
    rows = [row for row in complexity.rows if row.name.startswith("model.backbone.")]
    return sum(row.params for row in rows), sum(row.macs for row in rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pl = common.lightning_package(args)
    pl.seed_everything(args.seed, workers=True)
    train, val, test = make_loaders(args)
    model = make_detector(args)
    callback = GhostConvCallback(  # the prediction layers stay dense by the default rule: found from the data flow
        ratio=args.ratio,
        dw_size=args.dw_size,
        init=args.init,
        calibration_batches=args.calibration_batches,
        start_epoch=0 if args.fast_dev_run else args.start_epoch,  # a one-batch check of the setup converts at once
        end_epoch=args.end_epoch,
        stages=args.stages,
        verbose=args.verbose,
    )
    trainer = common.make_trainer(args, callback, monitor="val/map")
    backbone_before = backbone_cost(model)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    backbone_after = backbone_cost(model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("compression/", "val/map"))}
    # The final (converted) model as it is: `ckpt_path=None` keeps the in-memory weights.
    results = trainer.test(model, dataloaders=test, verbose=False)[0] if not args.fast_dev_run else {}
    summary = {
        "method": "ghost",
        "arch": "fasterrcnn_mobilenet_v3_large_fpn",
        **{k: float(v) for k, v in results.items()},
        **metrics,
        "backbone/params_ratio": backbone_before[0] / backbone_after[0],
        "backbone/macs_ratio": backbone_before[1] / backbone_after[1],
        **layer_kinds(model, callback),
    }
    if trainer.is_global_zero:
        args.output.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.output / "converted.pt")
        (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    shown = summary.get("test/map", summary.get("val/map"))
    pl.utilities.rank_zero.rank_zero_info(
        f"\nghost fasterrcnn_mobilenet_v3_large_fpn: {len(summary['ghost_layers'])} Ghost layers, "
        f"{'test' if 'test/map' in summary else 'val'} mAP@[.5:.95] "
        + (f"{shown:.3f}" if shown is not None else "n/a")
        + (
            f", params {metrics['compression/params']:,.0f} ({metrics['compression/params_ratio']:.2f}x fewer),"
            f" MACs/image {metrics['compression/macs']:,.0f} ({metrics['compression/macs_ratio']:.2f}x fewer)"
            if "compression/params" in metrics
            else ""
        )
        + f"\nsummary: {args.output / 'summary.json'}, converted model: {args.output / 'converted.pt'}"
    )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
