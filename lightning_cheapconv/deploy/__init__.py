"""Deployment: the fastest form of every cheap layer on *your* device, BatchNorm folding, and export.

"MACs went down, latency did not" is the common complaint about cheap convolutions: Ghost modules
add a memory-bound depthwise pass and a concatenation, structured convolutions a sum-pool. So the
form of each layer is chosen by measurement, not by MACs. The submodules:

- :mod:`~lightning_cheapconv.deploy.optimize`: :func:`optimize_for_inference` times, for every
  cheap layer (:data:`CHEAP_TYPES`) and with the input shape that layer really sees, the forms it
  has (structured: decomposed, in each sum-pool form, or folded to dense; Ghost: as it is, its
  output permutation folded where exact), keeps the fastest, folds BatchNorm, and returns whichever
  whole model was fastest (as given, optimized, all dense, or the ``original`` dense model when you
  pass it), measured in PyTorch or, with ``runtime="onnxruntime"``, in ONNX Runtime (:data:`RUNTIMES`);
- :mod:`~lightning_cheapconv.deploy.onnx_runtime`: :func:`onnx_session` and :func:`time_onnxruntime`,
  models exported with the dynamo exporter and timed in ONNX Runtime;
- :mod:`~lightning_cheapconv.deploy.report`: :class:`InferenceReport` and :class:`LayerForms`, what
  it measured and chose (rich table, dict);
- :mod:`~lightning_cheapconv.deploy.folding`: :func:`fold_batchnorm` and
  :func:`fold_ghost_permutations`, exact in-place folds, each recorded as a :class:`Fold`;
- :mod:`~lightning_cheapconv.deploy.timing`: :func:`time_interleaved` and :class:`Latency`;
- :mod:`~lightning_cheapconv.deploy.compiled`: :func:`compile_for_inference`, ``torch.compile`` with
  frozen weights for deployment, checked against eager;
- :mod:`~lightning_cheapconv.deploy.export`: :func:`export_model` (TorchScript, ``torch.export``,
  ONNX) with an output check, :class:`ExportMismatchError`;
- :func:`relative_difference`, the measure of every exactness check here.

Every choice lives in the modules' structure records (a dense choice is a plain conv, a folded
BatchNorm is a :class:`~lightning_cheapconv.nn.FoldedBatchNorm`, a conv that absorbed a BatchNorm a
:class:`~lightning_cheapconv.nn.FusedConv2d`), so the optimized model's state dict loads into a
fresh dense or converted model through :func:`~lightning_cheapconv.restructure`.

Example::

    >>> from lightning_cheapconv import decompose_structured, get_model, restructure
    >>> model = get_model("resnet56", num_classes=10)
    >>> _ = decompose_structured(model)
    >>> report = optimize_for_inference(model, torch.randn(32, 3, 32, 32))
    >>> report.print()                                   # per-layer forms and times, whole-model latency
    >>> torch.save(report.model.state_dict(), "resnet56.optimized.pt")
    >>> fresh = get_model("resnet56", num_classes=10)
    >>> state = torch.load("resnet56.optimized.pt")
    >>> _ = restructure(fresh, state); _ = fresh.load_state_dict(state)
    >>> ort = optimize_for_inference(model, torch.randn(32, 3, 32, 32), runtime="onnxruntime")
    >>> _ = Path("resnet56.onnx").write_bytes(ort.onnx_model)   # the graph timed in ONNX Runtime
"""

from ..nn.fused import FoldedBatchNorm, FusedConv2d
from ._utils import relative_difference
from .compiled import compile_for_inference
from .export import ExportFormat as ExportFormat  # not in __all__, importable from here as before
from .export import ExportMismatchError, export_model
from .folding import Fold, fold_batchnorm, fold_ghost_permutations
from .onnx_runtime import onnx_session, time_onnxruntime
from .optimize import CHEAP_TYPES, RUNTIMES, optimize_for_inference
from .report import InferenceReport, LayerForms
from .timing import Latency, time_interleaved

__all__ = [
    "CHEAP_TYPES",
    "ExportMismatchError",
    "Fold",
    "InferenceReport",
    "LayerForms",
    "Latency",
    "RUNTIMES",
    "compile_for_inference",
    "FoldedBatchNorm",
    "FusedConv2d",
    "export_model",
    "fold_batchnorm",
    "fold_ghost_permutations",
    "onnx_session",
    "optimize_for_inference",
    "relative_difference",
    "time_interleaved",
    "time_onnxruntime",
]
