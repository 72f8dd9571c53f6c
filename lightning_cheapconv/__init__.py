"""lightning-cheapconv: make convolutional networks cheaper while they train.

Example::

    from pytorch_lightning import Trainer
    from lightning_cheapconv import GhostConvCallback

    trainer = Trainer(max_epochs=30, callbacks=[GhostConvCallback(ratio=2)])
    trainer.fit(model, datamodule=datamodule)
"""

from .budget import BudgetPlan, BudgetResult, compress_to_budget, plan_budget
from .callbacks import BudgetConvCallback, GhostConvCallback, StructuredConvCallback
from .calls import ModelCall
from .checkpoint import install_restructure_hook, restructure
from .complexity import Complexity, LayerComplexity, compression_ratios, count_complexity, format_count
from .convert import ConversionResult, convert_to_ghost, decompose_structured, select_layers
from .data import CIFAR10DataModule, DigitsDataModule, ImageNetDataModule
from .deploy import InferenceReport, compile_for_inference, export_model, fold_batchnorm, optimize_for_inference
from .heads import find_prediction_layers
from .models import CifarResNet, CifarVGG, GhostNet, get_model, list_models
from .module import ImageClassifier
from .nn import (
    ChannelShuffle,
    CReLU,
    DepthwiseSeparableConv2d,
    GhostBottleneck,
    GhostConv1d,
    GhostConv2d,
    GhostConv3d,
    GhostConvTranspose1d,
    GhostConvTranspose2d,
    GhostConvTranspose3d,
    SqueezeExcite,
    StructuredConv1d,
    StructuredConv2d,
    StructuredConv3d,
    StructuredConvTranspose1d,
    StructuredConvTranspose2d,
    StructuredConvTranspose3d,
    StructuredLinear,
)
from .report import compression_report
from .structure import StructureSpec

__version__ = "0.1.0"

__all__ = [
    "BudgetConvCallback",
    "BudgetPlan",
    "BudgetResult",
    "CIFAR10DataModule",
    "CReLU",
    "ChannelShuffle",
    "CifarResNet",
    "CifarVGG",
    "Complexity",
    "ConversionResult",
    "DepthwiseSeparableConv2d",
    "DigitsDataModule",
    "GhostBottleneck",
    "GhostConv1d",
    "GhostConv2d",
    "GhostConv3d",
    "GhostConvCallback",
    "GhostConvTranspose1d",
    "GhostConvTranspose2d",
    "GhostConvTranspose3d",
    "GhostNet",
    "ImageClassifier",
    "ModelCall",
    "ImageNetDataModule",
    "InferenceReport",
    "LayerComplexity",
    "SqueezeExcite",
    "StructureSpec",
    "StructuredConv1d",
    "StructuredConv2d",
    "StructuredConv3d",
    "StructuredConvCallback",
    "StructuredConvTranspose1d",
    "StructuredConvTranspose2d",
    "StructuredConvTranspose3d",
    "StructuredLinear",
    "compile_for_inference",
    "compress_to_budget",
    "compression_ratios",
    "compression_report",
    "convert_to_ghost",
    "count_complexity",
    "decompose_structured",
    "export_model",
    "find_prediction_layers",
    "fold_batchnorm",
    "format_count",
    "get_model",
    "install_restructure_hook",
    "list_models",
    "optimize_for_inference",
    "plan_budget",
    "restructure",
    "select_layers",
]
