"""Deployment: the fastest form of every cheap layer on *your* device, BatchNorm folding, and export.

"MACs went down, latency did not" is the common complaint about cheap convolutions: Ghost modules
add a memory-bound depthwise pass and a concatenation, structured convolutions a sum-pool. So the
form of each layer is chosen by measurement, not by MACs. :func:`optimize_for_inference` times,
for every cheap layer and with the input shape that layer really sees, the forms it has (a
:class:`~lightning_cheapconv.nn.StructuredConv2d` decomposed, or folded back into one dense conv
with ``to_dense()``; a :class:`~lightning_cheapconv.nn.GhostConv2d` as it is, its output
permutation folded into the next layers where that is exact), keeps the fastest, folds BatchNorm
into the preceding layer where that is exact, and then times the whole model against the model as
given (and the all-dense fold, and the original dense model when you pass it), keeping whichever
is fastest: the result is never slower than what it is compared with, up to measurement noise.

Every choice lives in the modules' structure records (a dense choice is a plain conv, a folded
BatchNorm is a :class:`~lightning_cheapconv.nn.structured.FoldedBatchNorm`, a conv that absorbed a
BatchNorm a :class:`~lightning_cheapconv.nn.structured.FusedConv2d`), so the optimized model's
state dict loads into a fresh dense or converted model through
:func:`~lightning_cheapconv.restructure`.

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
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import rich
import torch
import torch.fx
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .complexity import count_complexity, format_count
from .convert import replace_modules
from .nn import GhostConv2d, StructuredConv2d, StructuredLinear
from .nn.fused import FoldedBatchNorm, FusedConv2d
from .nn.record import StructureRecordMixin, conv_config

__all__ = [
    "CHEAP_TYPES",
    "ExportMismatchError",
    "Fold",
    "InferenceReport",
    "LayerForms",
    "Latency",
    "FoldedBatchNorm",
    "FusedConv2d",
    "export_model",
    "fold_batchnorm",
    "fold_ghost_permutations",
    "optimize_for_inference",
    "relative_difference",
    "time_interleaved",
]

CHEAP_TYPES: tuple[type[nn.Module], ...] = (GhostConv2d, StructuredConv2d, StructuredLinear)
"""The layer types whose forms :func:`optimize_for_inference` chooses between."""

_LOG_WIDTH = 150
_DASH = "—"
# Modules and functions that act on each channel alike: a channel permutation passes through them.
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    FoldedBatchNorm,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    nn.functional.relu,
    nn.functional.relu6,
    nn.functional.silu,
    nn.functional.gelu,
    nn.functional.hardswish,
    nn.functional.hardsigmoid,
    nn.functional.leaky_relu,
    nn.functional.elu,
    nn.functional.dropout,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


# ----------------------------------------------------------------------------------------------- small helpers


def relative_difference(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` over all tensors of two (nested) outputs.

    The measure every exactness check of this module uses (0 means bitwise equal).

    Example::

        >>> relative_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
        0.2
    """
    got, want = tree_leaves(actual), tree_leaves(expected)
    got = [t for t in got if isinstance(t, Tensor)]
    want = [t for t in want if isinstance(t, Tensor)]
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return math.inf
    diff = scale = 0.0
    for a, b in zip(got, want, strict=True):
        if b.numel() == 0:
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        diff = max(diff, float((a64 - b64).abs().max()))
        scale = max(scale, float(b64.abs().max()))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` on ``reference``'s device, dtype and (for 4-D weights) memory format."""
    weight = getattr(reference, "weight", None)
    if not isinstance(weight, Tensor):
        weight = next(iter(reference.parameters()), None)
    if weight is None:
        return module
    module = module.to(device=weight.device, dtype=weight.dtype)
    if _channels_last(weight):
        module = module.to(memory_format=torch.channels_last)
    return module


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    """Exactness checks run in float32 for half-precision models (their own rounding says nothing about a fold)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tolerance(dtype: torch.dtype) -> float:
    """Whole-model agreement expected between a model and its optimized form in ``dtype``."""
    return {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-9}.get(dtype, 1e-4)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _shape_text(shape: Sequence[int] | None) -> str:
    return "?" if shape is None else "×".join(str(d) for d in shape)


def _unique_modules(model: nn.Module, types: tuple[type, ...]) -> dict[str, nn.Module]:
    """First qualified name -> module, for each module object of ``types`` (shared modules once)."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, types) and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    return found


def _forward(model: nn.Module, x: Tensor, what: str = "optimize_for_inference") -> Any:
    try:
        with torch.inference_mode():
            return model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(
            f"{what}: the model does not accept an example input of shape {_shape_text(tuple(x.shape))} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass an input of the shape the "
            f"model expects, e.g. (batch, 3, 32, 32) for the CIFAR models"
        ) from err


def _capture(model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module]) -> tuple[dict[str, Tensor], Any]:
    """Run ``model`` once; return the first sample of the input each named module saw (its first call), and the
    model's output."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = args[0][:1].detach().clone()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        output = _forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


@dataclass(frozen=True)
class _Seen:
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool


def _capture_shapes(model: nn.Module, x: Tensor, modules: Mapping[str, nn.Module]) -> tuple[dict[str, _Seen], Any]:
    """The shape, dtype and memory format of the input each named module sees (its first call), and the output."""
    seen: dict[str, _Seen] = {}
    handles = []
    for name, module in modules.items():

        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                t = args[0]
                seen[name] = _Seen(tuple(t.shape), t.dtype, _channels_last(t))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        output = _forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


def _random_input(seen: _Seen, device: torch.device) -> Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(seen.shape, generator=generator, device=device, dtype=torch.float32).to(seen.dtype)
    return t.contiguous(memory_format=torch.channels_last) if seen.channels_last else t


# ----------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Latency:
    """Per-call latency samples of one candidate, in milliseconds.

    Example::

        >>> Latency((1.0, 1.2, 0.9)).median_ms
        1.0
    """

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        """The median sample: the number every comparison here uses."""
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        """The fastest sample."""
        return min(self.samples_ms)

    @property
    def spread(self) -> float:
        """Interquartile range of the samples over their median: how noisy the machine was."""
        if len(self.samples_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4)
        return (q[2] - q[0]) / self.median_ms if self.median_ms > 0 else 0.0


def time_interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    repeats: int = 7,
    min_time: float = 0.005,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Latency]:
    """Time callables against each other: warm-up, then ``repeats`` round-robin samples each, under inference mode.

    Each sample repeats its callable enough times to last about ``min_time`` seconds (calibrated
    per candidate after warm-up) and reports the time per call; the order rotates every
    repetition, so a noisy shared machine slows all candidates alike. With a CUDA ``device`` the
    GPU is synchronized around every sample. Compare ``median_ms`` values measured in one call.

    Example::

        >>> x = torch.randn(8, 16, 32, 32)
        >>> conv = nn.Conv2d(16, 16, 3, padding=1)
        >>> t = time_interleaved({"conv": lambda: conv(x), "relu": lambda: x.relu()}, repeats=3)
        >>> t["conv"].median_ms > 0
        True
    """
    if repeats < 1 or warmup < 0 or min_time < 0:
        raise ValueError(
            f"time_interleaved: need repeats >= 1, warmup >= 0, min_time >= 0; got {repeats}, {warmup}, {min_time}"
        )
    sync = _sync(torch.device(device) if device is not None else torch.device("cpu"))
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    number: dict[str, int] = {}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                candidates[name]()
        sync()
        for name in names:
            start = time.perf_counter()
            candidates[name]()
            sync()
            elapsed = time.perf_counter() - start
            number[name] = max(1, math.ceil(min_time / max(elapsed, 1e-7))) if min_time > 0 else 1
            number[name] = min(number[name], 10_000)
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                fn, calls = candidates[name], number[name]
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: Latency(tuple(values)) for name, values in samples.items()}


# ----------------------------------------------------------------------------------------------- graph analysis


class _CheapLeafTracer(torch.fx.Tracer):
    """Symbolic tracer that keeps cheap modules (anything with a structure record) as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, StructureRecordMixin) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.Graph | None:
    """The model's fx graph, or ``None`` when it cannot be traced symbolically (data-dependent control flow)."""
    try:
        return _CheapLeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the fallback"
        return None


def _call_counts(graph: torch.fx.Graph) -> Counter:
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def _only_input(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """``source`` is ``node``'s first positional argument and appears nowhere else among its arguments."""
    if not node.args or node.args[0] is not source:
        return False
    rest = [*node.args[1:], *node.kwargs.values()]
    return source not in tree_leaves(rest)


@dataclass(frozen=True)
class Fold:
    """One fold that :func:`fold_batchnorm` or :func:`fold_ghost_permutations` applied, or refused and why.

    ``kind`` is ``"batchnorm"`` (``target`` folded into ``source``), ``"permutation"`` (the
    output permutation of Ghost module ``source`` moved into ``target``) or ``"identity"`` (an
    identity permutation dropped). ``max_rel_diff`` is the measured output difference of the
    fold (see :func:`relative_difference`).

    Example::

        >>> Fold("batchnorm", "layer1.0.conv1", "layer1.0.bn1", True, "exact", 3e-8)
        Fold(kind='batchnorm', source='layer1.0.conv1', target='layer1.0.bn1', applied=True, detail='exact', ...)
    """

    kind: Literal["batchnorm", "permutation", "identity"]
    source: str
    target: str
    applied: bool
    detail: str
    max_rel_diff: float | None = None


# ----------------------------------------------------------------------------------------------- BatchNorm folding


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` in float64 with ``bn(x) = scale * x + shift`` in eval mode."""
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _foldable_bn(bn: nn.Module) -> str | None:
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"{type(bn).__name__} is not a plain BatchNorm2d"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm keeps no running statistics (it normalizes with batch statistics)"
    return None


def _fuse_plain(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    weight, bias = fuse_conv_bn_weights(
        conv.weight.detach().double(),
        None if conv.bias is None else conv.bias.detach().double(),
        bn.running_mean.double(),
        bn.running_var.double(),
        bn.eps,
        None if bn.weight is None else bn.weight.detach().double(),
        None if bn.bias is None else bn.bias.detach().double(),
    )
    fused = FusedConv2d(
        **{**conv_config(conv), "bias": True},
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return _like(fused, conv)


def _fuse_structured(conv: StructuredConv2d, bn: nn.Module) -> nn.Module:
    scale, shift = _bn_scale_shift(bn)
    config = {**conv.config(), "bias": True}
    fused = StructuredConv2d(**config, device=conv.weight.device, dtype=conv.weight.dtype)
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach().double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bias)
    return _like(fused, conv)


def _fuse_ghost(ghost: GhostConv2d, bn: nn.Module) -> tuple[nn.Module | None, str]:
    """Fold a BatchNorm after a conv-only Ghost module where that is exact, else say why not.

    Scales fold always (the cheap conv's kernel is rescaled by ghost scale / intrinsic scale); a
    BatchNorm *shift* on an intrinsic map reaches its ghosts through the depthwise conv, which at
    zero-padded borders sums fewer taps: exact only for a 1x1 cheap conv or a zero shift.
    """
    if ghost.norm_name is not None or ghost.act_name is not None:
        return None, "the Ghost module applies its own norm/activation between its convs"
    scale, shift = _bn_scale_shift(bn)
    m, ratio = ghost.intrinsic_channels, ghost.ratio
    device = scale.device
    index = ghost.output_index if ghost.output_index is not None else torch.arange(ghost.out_channels)
    index = index.to(device)
    a = torch.ones(m * ratio, dtype=torch.float64, device=device)
    b = torch.zeros(m * ratio, dtype=torch.float64, device=device)
    a[index], b[index] = scale, shift
    a_int, b_int, a_ghost, b_ghost = a[:m], b[:m], a[m:], b[m:]
    parent = torch.arange(m * (ratio - 1), device=device) // (ratio - 1)
    if bool((a_int == 0).any()):
        return None, "a BatchNorm scale of 0 on an intrinsic channel (its ghosts could not be recovered)"
    # A shift is zero when the BatchNorm's bias cancels its mean term (up to float rounding of that cancellation).
    size = torch.zeros(m * ratio, dtype=torch.float64, device=device)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(shift)
    size[index] = beta.abs() + (beta - shift).abs()
    if ghost.dw_size > 1 and bool((b_int.abs() > 1e-6 * size[:m]).any()):
        return None, (
            "not exact: the BatchNorm shift of the intrinsic maps would reach the ghosts through the "
            f"{ghost.dw_size}x{ghost.dw_size} depthwise conv, which sums fewer taps at zero-padded borders"
        )
    primary, cheap = ghost.primary, ghost.cheap
    config = {**ghost.config(), "bias": True, "permuted": False}
    config["norm_layer"] = config["act_layer"] = None
    fused = GhostConv2d(**config, device=primary.weight.device, dtype=primary.weight.dtype)
    fused.set_output_index(ghost.output_index)
    ratio_g = a_ghost / a_int[parent]
    with torch.no_grad():
        w = primary.weight.detach().double()
        fused.primary.weight.copy_(w * a_int.view(-1, 1, 1, 1))
        b0 = primary.bias.detach().double() if primary.bias is not None else torch.zeros_like(a_int)
        fused.primary.bias.copy_(b0 * a_int + b_int)
        wc = cheap.weight.detach().double()
        fused.cheap.weight.copy_(wc * ratio_g.view(-1, 1, 1, 1))
        c0 = cheap.bias.detach().double() if cheap.bias is not None else torch.zeros_like(a_ghost)
        taps = wc.sum(dim=(1, 2, 3))
        fused.cheap.bias.copy_(a_ghost * c0 + b_ghost - ratio_g * b_int[parent] * taps)
    return _like(fused, primary), "exact"


def _fuse(conv: nn.Module, bn: nn.Module) -> tuple[nn.Module | None, str]:
    reason = _foldable_bn(bn)
    if reason is not None:
        return None, reason
    out_channels = getattr(conv, "out_channels", None)
    if out_channels != bn.num_features:
        return None, f"{out_channels} conv channels but {bn.num_features} BatchNorm features"
    if type(conv) in (nn.Conv2d, FusedConv2d):
        return _fuse_plain(conv, bn), "exact"
    if type(conv) is StructuredConv2d:
        return _fuse_structured(conv, bn), "exact"
    if type(conv) is GhostConv2d:
        return _fuse_ghost(conv, bn)
    return None, f"{type(conv).__name__} is not a layer BatchNorm folds into"


_FOLDABLE_CONVS = (nn.Conv2d, FusedConv2d, StructuredConv2d, GhostConv2d)


def _bn_pairs(model: nn.Module, graph: torch.fx.Graph | None) -> list[tuple[str, str]]:
    """``(conv, bn)`` qualified names where the BatchNorm's only input is the conv's output, and neither
    the conv's output nor either module is used anywhere else."""
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    if graph is not None:
        counts = _call_counts(graph)
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
                continue
            source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
                continue
            if type(modules.get(source.target)) not in _FOLDABLE_CONVS:
                continue
            if counts[source.target] == 1 and counts[node.target] == 1:
                pairs.append((str(source.target), str(node.target)))
        return pairs
    # No graph: consecutive children of an nn.Sequential are the only order known for sure.
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for prefix, module in model.named_modules():
        if type(module) is not nn.Sequential:
            continue
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:], strict=False):
            if type(a) in _FOLDABLE_CONVS and isinstance(b, nn.modules.batchnorm._BatchNorm):
                if uses[id(a)] == 1 and uses[id(b)] == 1:
                    join = f"{prefix}." if prefix else ""
                    pairs.append((join + name_a, join + name_b))
    return pairs


def _verify_fold(reference: Callable[[Tensor], Tensor], candidate: nn.Module, x: Tensor, dtype: torch.dtype) -> float:
    check = _check_dtype(dtype)
    with torch.inference_mode():
        expected = reference(x.to(check))
        got = copy.deepcopy(candidate).to(check)(x.to(check))
    return relative_difference(got, expected)


def fold_batchnorm(model: nn.Module, example_input: Tensor, tolerance: float = 1e-5) -> list[Fold]:
    """Fold every BatchNorm2d into the layer just before it, where that is exact, in place (eval mode).

    A BatchNorm folds when its only input is the output of a plain ``nn.Conv2d`` (the pair becomes
    a :class:`FusedConv2d`, through :func:`torch.nn.utils.fusion.fuse_conv_bn_weights`), a
    :class:`~lightning_cheapconv.nn.StructuredConv2d` (alpha scaled per output channel, bias
    added) or a conv-only :class:`~lightning_cheapconv.nn.GhostConv2d` when that is exact (see
    :class:`Fold` details), and nothing else uses that output. Pairs come from an fx trace of the
    model (cheap modules kept whole) or, when the model cannot be traced, from consecutive
    children of ``nn.Sequential`` containers. Each fold is checked on the input its layer sees
    for ``example_input`` (first sample; float32 for half-precision models) and applied only if
    the relative output difference is below ``tolerance``; the BatchNorm's place is taken by a
    :class:`FoldedBatchNorm`, so the state dict restructures into a fresh model.

    Example::

        >>> model = torchvision.models.resnet18().eval()
        >>> folds = fold_batchnorm(model, torch.randn(1, 3, 64, 64))
        >>> sum(f.applied for f in folds)
        20
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"fold_batchnorm: example_input must be a Tensor, got {type(example_input).__name__}")
    model.eval()
    device, dtype = _device_dtype(model)
    x = example_input.to(device, dtype) if example_input.is_floating_point() else example_input.to(device)
    pairs = _bn_pairs(model, _trace(model))
    if not pairs:
        return []
    inputs, _ = _capture(model, x, {conv: model.get_submodule(conv) for conv, _ in pairs})
    folds: list[Fold] = []
    replacements: dict[str, nn.Module] = {}
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fused, detail = _fuse(conv, bn)
        if fused is None:
            folds.append(Fold("batchnorm", conv_name, bn_name, False, detail))
            continue
        sample = inputs.get(conv_name)
        if sample is None:
            folds.append(Fold("batchnorm", conv_name, bn_name, False, "not called by the example input"))
            continue
        check = _check_dtype(dtype)
        pair = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).to(check).eval()
        diff = _verify_fold(pair, fused, sample, dtype)
        if not diff < tolerance:
            folds.append(
                Fold("batchnorm", conv_name, bn_name, False, f"not exact (relative difference {diff:.2e})", diff)
            )
            continue
        folds.append(Fold("batchnorm", conv_name, bn_name, True, detail, diff))
        replacements[conv_name] = fused.train(False)
        replacements[bn_name] = FoldedBatchNorm(bn.num_features)
    if replacements:
        replace_modules(model, replacements)
    return folds


# ----------------------------------------------------------------------------------------------- Ghost permutations


def _permute_consumer(module: nn.Module, index: Tensor) -> nn.Module | None:
    """A copy of ``module`` whose input channel ``index[j]`` gets the weights of input channel ``j``, or ``None``
    when ``module`` cannot absorb an input permutation."""
    if type(module) in (nn.Conv2d, FusedConv2d) and module.groups == 1:
        weight_of = lambda m: m.weight  # noqa: E731
    elif type(module) is GhostConv2d:
        weight_of = lambda m: m.primary.weight  # noqa: E731
    elif type(module) is StructuredConv2d and module.groups == 1 and module.windows[0] == 1:
        weight_of = lambda m: m.weight  # noqa: E731
    else:
        return None
    new = copy.deepcopy(module)
    with torch.no_grad():
        weight = weight_of(module).detach()
        permuted = torch.empty_like(weight)
        permuted[:, index.to(weight.device)] = weight
        weight_of(new).copy_(permuted)
    return new


def _permute_bn(bn: nn.Module, index: Tensor) -> nn.Module:
    new = copy.deepcopy(bn)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(bn, name, None)
            if isinstance(tensor, Tensor):
                permuted = torch.empty_like(tensor)
                permuted[index.to(tensor.device)] = tensor
                getattr(new, name).copy_(permuted)
    return new


def _permutation_plan(
    model: nn.Module, graph: torch.fx.Graph, name: str, index: Tensor
) -> tuple[dict[str, nn.Module] | None, str]:
    """Replacements that move Ghost module ``name``'s output permutation into the layers after it, or why not."""
    modules = dict(model.named_modules())
    counts = _call_counts(graph)
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None or counts[name] != 1:
        return None, "the Ghost module is not called exactly once"
    replacements: dict[str, nn.Module] = {}
    path = []
    while True:
        if len(node.users) != 1:
            return None, f"{node.name} has {len(node.users)} users (a branch)"
        user = next(iter(node.users))
        if not _only_input(user, node):
            return None, f"it meets other tensors in {user.name}"
        if user.op == "call_module":
            module = modules.get(user.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and _foldable_bn(module) is None:
                if counts[user.target] != 1 or len(user.args) != 1:
                    return None, f"BatchNorm {user.target} is used more than once"
                replacements[str(user.target)] = _permute_bn(module, index)
                path.append(str(user.target))
            elif type(module) in _ELEMENTWISE_MODULES:
                path.append(str(user.target))
            else:
                consumer = _permute_consumer(module, index) if counts[user.target] == 1 else None
                if consumer is None:
                    return None, f"{user.target} ({type(module).__name__}) cannot absorb it"
                replacements[str(user.target)] = consumer
                path.append(str(user.target))
                return replacements, " → ".join(path)
        elif user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS:
            path.append(user.name)
        elif user.op == "call_method" and user.target in _ELEMENTWISE_METHODS:
            path.append(user.name)
        else:
            return None, f"it meets {user.name}, not a channel-wise op"
        node = user


def fold_ghost_permutations(model: nn.Module, example_input: Tensor, tolerance: float = 1e-5) -> list[Fold]:
    """Remove the output permutations of Ghost modules where that is exact, in place (eval mode).

    Weight inheritance keeps a converted conv's channel order with an ``output_index`` gather.
    An identity permutation is dropped. Otherwise, when the permutation covers the first
    ``out_channels`` channels and the output flows, through BatchNorms (their parameters and
    statistics are permuted) and channel-wise activations only, into a single layer that can
    absorb it (a plain dense conv, a Ghost module's primary conv, or a structured conv without
    channel pooling: its input channels are permuted), the gather is removed and the Ghost
    module's record says ``permuted: False``. A residual add or a branch stops it. The whole model is
    checked on ``example_input`` afterwards and every fold is undone if it is not exact.

    Example::

        >>> model = get_model("resnet20", 10); _ = convert_to_ghost(model)   # inherited: permuted
        >>> folds = fold_ghost_permutations(model.eval(), torch.randn(1, 3, 32, 32))
        >>> [f.target for f in folds if f.applied][:1]
        ['layer1.0.bn1 → layer1.0.relu → layer1.0.conv2']
    """
    model.eval()
    ghosts = {name: m for name, m in _unique_modules(model, (GhostConv2d,)).items() if m.output_index is not None}
    if not ghosts:
        return []
    device, dtype = _device_dtype(model)
    x = example_input.to(device, dtype) if example_input.is_floating_point() else example_input.to(device)
    before = _forward(model, x, "fold_ghost_permutations")
    undo: dict[str, nn.Module] = {}
    folds: list[Fold] = []
    graph = _trace(model)
    for name in ghosts:
        ghost = model.get_submodule(name)  # may have been replaced as the consumer of an earlier fold
        index = ghost.output_index.detach().cpu()
        if torch.equal(index, torch.arange(ghost.out_channels)):
            undo.setdefault(name, copy.deepcopy(ghost))
            ghost.set_output_index(None)
            folds.append(Fold("identity", name, name, True, "identity permutation dropped"))
            continue
        if not torch.equal(index.sort().values, torch.arange(ghost.out_channels)):
            folds.append(Fold("permutation", name, "", False, "the permutation selects channels past out_channels"))
            continue
        if graph is None:
            folds.append(Fold("permutation", name, "", False, "the model cannot be traced with torch.fx"))
            continue
        replacements, detail = _permutation_plan(model, graph, name, index)
        if replacements is None:
            folds.append(Fold("permutation", name, "", False, detail))
            continue
        for target in replacements:
            undo.setdefault(target, model.get_submodule(target))
        undo.setdefault(name, copy.deepcopy(ghost))
        replace_modules(model, replacements)
        model.get_submodule(name).set_output_index(None)
        folds.append(Fold("permutation", name, detail, True, "exact"))
    if undo:
        after = _forward(model, x, "fold_ghost_permutations")
        diff = relative_difference(after, before)
        limit = max(tolerance, _tolerance(dtype)) if dtype in (torch.float16, torch.bfloat16) else tolerance
        if not diff < limit:
            replace_modules(model, undo)
            return [
                Fold(f.kind, f.source, f.target, False, f"undone: the model changed by {diff:.2e} (relative)", diff)
                for f in folds
            ]
        folds = [Fold(f.kind, f.source, f.target, f.applied, f.detail, diff if f.applied else None) for f in folds]
    return folds


# ----------------------------------------------------------------------------------------------- the report


@dataclass
class LayerForms:
    """One cheap layer: the forms timed (median ms each) and their MACs, and the form kept.

    Forms: ``"decomposed"`` (a structured layer as converted), ``"dense"`` (folded with
    ``to_dense()``), ``"ghost"`` (a Ghost module as deployed) and ``"ghost+permutation"`` (the Ghost
    module before its output permutation was folded away).

    Example::

        >>> row = report.layers[0]
        >>> row.name, row.chosen, row.times_ms[row.chosen]
        ('layer1.0.conv1', 'dense', 0.051)
    """

    name: str
    kind: str
    input_shape: tuple[int, ...] | None
    times_ms: dict[str, float] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    chosen: str = ""
    note: str = ""

    @property
    def chosen_ms(self) -> float | None:
        """Median time of the kept form (``None`` when the layer was not called)."""
        return self.times_ms.get(self.chosen)

    @property
    def cheap_faster(self) -> bool:
        """Whether a cheap form (decomposed, Ghost) was timed faster than the dense fold of this layer."""
        dense = self.times_ms.get("dense")
        cheap = [t for form, t in self.times_ms.items() if form != "dense"]
        return dense is not None and bool(cheap) and min(cheap) < dense


@dataclass
class InferenceReport:
    """What :func:`optimize_for_inference` measured and chose.

    ``model`` is the optimized copy (eval mode, on the measured device). ``cheap_form_won`` says
    whether a cheap form beat its dense alternative anywhere in the returned model (``None``: not
    known, for Ghost layers compared with no ``original``). ``layers`` has one
    :class:`LayerForms` per cheap layer; ``folds`` every BatchNorm and permutation fold tried.
    ``configurations`` holds the whole-model median latency (ms) of each candidate timed against
    each other (``"as given"``, ``"optimized"``, and where they exist ``"all dense"`` and
    ``"original"``); ``chosen_configuration`` is the one returned. ``latency_before_ms`` is the
    model as given, ``latency_after_ms`` the returned model.

    Example::

        >>> report = optimize_for_inference(model, torch.randn(1, 3, 32, 32))
        >>> report.speedup >= 1.0, report.summary
        >>> report.print()
    """

    model: nn.Module
    layers: list[LayerForms]
    folds: list[Fold]
    configurations: dict[str, float]
    chosen_configuration: str
    latency_before_ms: float
    latency_after_ms: float
    macs_before: int
    macs_after: int
    max_rel_diff: float
    device: str
    input_shape: tuple[int, ...]
    repeats: int
    summary: str = ""
    spreads: dict[str, float] = field(default_factory=dict)
    cheap_form_won: bool | None = None
    configuration_macs: dict[str, int] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Whole-model latency as given / optimized (2.0 = twice as fast)."""
        return self.latency_before_ms / self.latency_after_ms if self.latency_after_ms > 0 else math.inf

    def table(self, per_layer: bool = True) -> Table:
        """The per-layer rich table (forms with their median ms, the kept one in bold, MACs) and the
        whole-model latencies in the last section.

        Example::

            >>> rich.get_console().print(report.table())
        """
        forms = [
            f
            for f in ("decomposed", "dense", "ghost", "ghost+permutation")
            if any(f in r.times_ms for r in self.layers)
        ]
        caption = (
            f"Median of {self.repeats} interleaved samples per form, on {self.device}, input "
            f"{_shape_text(self.input_shape)}; layers of equal configuration and input share one measurement. "
            f"MACs = FLOPs / 2 from FlopCounterMode (bias, BatchNorm and the structured sum-pool's additions not "
            f"counted); MACs ratio = dense / kept (2.00× = half). Whole model: "
            f"{self.latency_before_ms:.3f} ms as given → {self.latency_after_ms:.3f} ms "
            f"({self.chosen_configuration}), {self.speedup:.2f}× faster; outputs differ by "
            f"{self.max_rel_diff:.1e} (relative)."
        )
        table = Table(title=f"Inference forms on {self.device}", caption=caption, caption_justify="left")
        table.add_column("layer", overflow="fold")
        table.add_column("type")
        table.add_column("input", justify="right")
        for form in forms:
            table.add_column(f"{form} ms", justify="right")
        table.add_column("kept")
        table.add_column("MACs", justify="right")
        table.add_column("MACs ratio", justify="right")
        table.add_column("note", overflow="fold")
        if per_layer:
            for row in self.layers:
                cells = []
                for form in forms:
                    ms = row.times_ms.get(form)
                    text = _DASH if ms is None else f"{ms:.3f}"
                    cells.append(f"[bold]{text}[/bold]" if form == row.chosen and ms is not None else text)
                macs = row.macs.get(row.chosen)
                dense = row.macs.get("dense")
                ratio = f"{dense / macs:.2f}×" if dense and macs else _DASH
                table.add_row(
                    row.name,
                    row.kind,
                    _shape_text(row.input_shape),
                    *cells,
                    row.chosen or _DASH,
                    _DASH if macs is None else format_count(macs),
                    ratio,
                    row.note,
                )
            table.add_section()
        blanks = [""] * len(forms)
        for name, ms in self.configurations.items():
            kept = "✓" if name == self.chosen_configuration else ""
            spread = self.spreads.get(name)
            note = f"{ms:.3f} ms whole model" + (f" (IQR {spread:.0%})" if spread is not None else "")
            macs = self.configuration_macs.get(name)
            table.add_row(
                f"model: {name}",
                "",
                _shape_text(self.input_shape),
                *blanks,
                kept,
                _DASH if macs is None else format_count(macs),
                "",
                note,
                style="bold" if kept else None,
            )
        return table

    def print(self, console: Console | None = None, per_layer: bool = True) -> None:
        """Print the table and the summary through ``console`` (default :func:`rich.get_console`).

        Example::

            >>> report.print()
        """
        console = console or rich.get_console()
        if not console.is_terminal and console.width < _LOG_WIDTH:
            console = Console(file=console.file, width=_LOG_WIDTH)
        console.print(self.table(per_layer=per_layer))
        console.print(self.summary, highlight=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as primitives (for JSON and loggers).

        Example::

            >>> json.dumps(report.to_dict())
        """
        return {
            "device": self.device,
            "input_shape": list(self.input_shape),
            "latency_before_ms": self.latency_before_ms,
            "latency_after_ms": self.latency_after_ms,
            "speedup": self.speedup,
            "configurations": dict(self.configurations),
            "chosen_configuration": self.chosen_configuration,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "max_rel_diff": self.max_rel_diff,
            "summary": self.summary,
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "input_shape": None if r.input_shape is None else list(r.input_shape),
                    "times_ms": dict(r.times_ms),
                    "macs": dict(r.macs),
                    "chosen": r.chosen,
                    "note": r.note,
                }
                for r in self.layers
            ],
            "folds": [
                {"kind": f.kind, "source": f.source, "target": f.target, "applied": f.applied, "detail": f.detail}
                for f in self.folds
            ],
        }


# ----------------------------------------------------------------------------------------------- optimize


def _form_key(module: nn.Module, seen: _Seen, device: torch.device) -> tuple:
    record = module.structure_record() if isinstance(module, StructureRecordMixin) else {}
    return (type(module).__name__, repr(sorted(record.items())), seen, str(device))


def _dense(module: nn.Module) -> nn.Module:
    return _like(module.to_dense(), module).train(False)


def _macs(module: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    return counter.get_total_flops() // 2


def _time_layers(
    model: nn.Module,
    shapes: Mapping[str, _Seen],
    permuted: Mapping[str, nn.Module],
    device: torch.device,
    repeats: int,
    min_time: float,
    warmup: int,
) -> list[LayerForms]:
    """Time the forms of every cheap layer; layers of equal configuration and input share one measurement."""
    cache: dict[tuple, tuple[dict[str, float], dict[str, int]]] = {}
    rows: list[LayerForms] = []
    for name, module in _unique_modules(model, CHEAP_TYPES).items():
        seen = shapes.get(name)
        row = LayerForms(name, type(module).__name__, None if seen is None else seen.shape)
        rows.append(row)
        if seen is None:
            row.chosen = "ghost" if isinstance(module, GhostConv2d) else "decomposed"
            row.note = "not called by the example input; kept as is"
            continue
        if isinstance(module, GhostConv2d):
            forms: dict[str, nn.Module] = {"ghost": module}
            if name in permuted:
                forms["ghost+permutation"] = permuted[name]
        else:
            forms = {"decomposed": module, "dense": _dense(module)}
        key = (_form_key(module, seen, device), _form_key(permuted[name], seen, device) if name in permuted else None)
        if key not in cache:
            x = _random_input(seen, device)
            latency = time_interleaved(
                {form: (lambda m=m, x=x: m(x)) for form, m in forms.items()}, repeats, min_time, warmup, device
            )
            cache[key] = (
                {form: lat.median_ms for form, lat in latency.items()},
                {form: _macs(m, x) for form, m in forms.items()},
            )
        row.times_ms, row.macs = dict(cache[key][0]), dict(cache[key][1])
        if isinstance(module, GhostConv2d):
            row.chosen = "ghost"
        else:
            row.chosen = min(("decomposed", "dense"), key=lambda form: row.times_ms[form])
    return rows


def _apply_forms(model: nn.Module, choose_dense: Callable[[str], bool]) -> None:
    replacements = {
        name: _dense(module)
        for name, module in _unique_modules(model, (StructuredConv2d, StructuredLinear)).items()
        if choose_dense(name)
    }
    if replacements:
        replace_modules(model, replacements)


def _cheap_form_won(rows: list[LayerForms], chosen: str, configurations: Mapping[str, float]) -> bool | None:
    """Whether the returned model keeps a cheap form that beat its dense alternative (``None``: unknown)."""
    if chosen in ("all dense", "original"):
        return False
    structured = [r for r in rows if r.kind in ("StructuredConv2d", "StructuredLinear") and r.input_shape is not None]
    ghosts = [r for r in rows if r.kind == "GhostConv2d"]
    if structured:
        # As given, every structured layer is decomposed, and that beat the dense alternatives as a whole.
        if chosen == "as given" or any(r.chosen == "decomposed" and r.cheap_faster for r in structured):
            return True
    if ghosts:
        return True if "original" in configurations else None
    return False


def _summary(report: InferenceReport, n_folded_bn: int, n_perm: int) -> str:
    rows = report.layers
    structured = [r for r in rows if r.kind in ("StructuredConv2d", "StructuredLinear") and r.input_shape is not None]
    decomposed_faster = [r for r in structured if r.cheap_faster]
    chosen = report.chosen_configuration
    parts = [
        f"On {report.device}, input {_shape_text(report.input_shape)}: {report.latency_before_ms:.3f} ms as given → "
        f"{report.latency_after_ms:.3f} ms ({report.speedup:.2f}× faster; kept '{chosen}')."
    ]
    if structured:
        parts.append(
            f"Decomposed was faster than the dense fold in {len(decomposed_faster)} of {len(structured)} structured "
            f"layer(s)."
        )
    if n_folded_bn or n_perm:
        parts.append(f"Folded {n_folded_bn} BatchNorm(s) and {n_perm} Ghost output permutation(s).")
    if chosen == "as given":
        parts.append("No optimization was faster than the model as given (within noise); it is returned unchanged.")
    elif chosen == "all dense":
        parts.append("Folding every structured layer to dense beat the per-layer choice as a whole; returned that.")
    elif chosen == "original":
        parts.append("The original dense model (BatchNorm folded) was faster than the converted one; returned it.")
    elif "original" in report.configurations:
        parts.append("The converted model beat the original dense model (BatchNorm folded) as a whole.")
    if report.cheap_form_won is None:
        parts.append(
            "Ghost layers have no exact dense form; pass original= (the dense model they replaced) to compare."
        )
    elif not report.cheap_form_won:
        if decomposed_faster and chosen in ("all dense", "original"):
            parts.append(
                "No cheap form was faster anywhere on this device as a whole model: the per-layer wins did not add "
                "up against the dense alternative."
            )
        else:
            parts.append("No cheap form was faster anywhere on this device.")
    return " ".join(parts)


def optimize_for_inference(
    model: nn.Module,
    example_input: Tensor,
    device: torch.device | str | None = None,
    *,
    repeats: int = 7,
    min_time: float = 0.005,
    warmup: int = 1,
    fold_bn: bool = True,
    original: nn.Module | None = None,
) -> InferenceReport:
    """Choose the fastest form of every cheap layer by measurement, fold BatchNorm, and return a report.

    Works on a deep copy in eval mode on ``device`` (default: the model's). With forward hooks it
    records the input shape each cheap layer sees for ``example_input`` (its dtype and memory
    format too: pass a channels-last bfloat16 input to a channels-last bfloat16 model to optimize
    for that). Then:

    1. Ghost modules: an identity output permutation is dropped, others are folded into the
       following BatchNorm/activation/conv where exact (:func:`fold_ghost_permutations`).
    2. Every structured layer is timed decomposed and folded to dense (``to_dense()``) on a random
       input of its shape (layers of equal configuration share a measurement; forms interleaved,
       median of ``repeats``); the faster form is kept. Ghost modules are timed as they are.
    3. BatchNorm is folded into the layer before it where exact (:func:`fold_batchnorm`), unless
       ``fold_bn=False``.
    4. The whole model is timed, interleaved, as given, optimized, with every structured layer
       dense (if that differs) and, if you pass ``original`` (the dense model the cheap one was
       converted from; Ghost modules have no exact dense form), the original with BatchNorm
       folded. The fastest is returned, so the result is never slower than the others measured
       here beyond noise; the summary says which won and whether any cheap form was faster.

    The optimized model must match the model as given (relative difference 1e-4 in float32),
    else a ``RuntimeError`` names the difference. Its choices live in the modules' structure
    records: ``restructure`` + ``load_state_dict`` of ``report.model.state_dict()`` rebuild it in a
    fresh dense or converted model. Timings are noisy on shared machines: raise ``repeats`` and
    ``min_time`` for decisions that matter.

    Raises:
        ValueError: the model has no cheap layers, or ``example_input`` does not fit it.

    Example::

        >>> model = get_model("resnet56", 10); _ = convert_to_ghost(model)
        >>> report = optimize_for_inference(model, torch.randn(32, 3, 32, 32), repeats=5)
        >>> report.print(); report.latency_after_ms <= report.latency_before_ms
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise ValueError(
            f"optimize_for_inference: example_input must be a Tensor (e.g. torch.randn(1, 3, 32, 32)), "
            f"got {type(example_input).__name__}"
        )
    if repeats < 1:
        raise ValueError(f"optimize_for_inference: repeats must be >= 1, got {repeats}")
    if not _unique_modules(model, CHEAP_TYPES):
        raise ValueError(
            "optimize_for_inference: the model has no cheap layers (GhostConv2d, StructuredConv2d, "
            "StructuredLinear); convert it first with convert_to_ghost() or decompose_structured(), or load a "
            "converted checkpoint through restructure()"
        )
    model_device, dtype = _device_dtype(model)
    target = torch.device(device) if device is not None else model_device
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("optimize_for_inference: device='cuda' but CUDA is not available on this machine")
    given = copy.deepcopy(model).to(target).eval()
    x = example_input.to(target, dtype) if example_input.is_floating_point() else example_input.to(target)

    # 1. What each cheap layer sees, and the reference output.
    cheap = _unique_modules(given, CHEAP_TYPES)
    shapes, reference = _capture_shapes(given, x, cheap)
    tolerance = _tolerance(dtype)

    # 2. Ghost output permutations.
    base = copy.deepcopy(given)
    before_perm = {
        name: copy.deepcopy(m)
        for name, m in _unique_modules(base, (GhostConv2d,)).items()
        if m.output_index is not None
    }
    folds = fold_ghost_permutations(base, x)
    permuted = {f.source: before_perm[f.source] for f in folds if f.applied and f.source in before_perm}

    # 3. Per-layer forms.
    rows = _time_layers(base, shapes, permuted, target, repeats, min_time, warmup)
    by_name = {row.name: row for row in rows}
    for fold in folds:
        row = by_name.get(fold.source)
        if row is None:
            continue
        if fold.applied:
            _add_note(row, f"permutation folded into {fold.target}" if fold.kind == "permutation" else fold.detail)
        else:
            _add_note(row, f"permutation kept ({fold.detail})")
    dense_choice = {r.name for r in rows if r.chosen == "dense"}

    def build(choose_dense: Callable[[str], bool]) -> tuple[nn.Module, list[Fold]]:
        candidate = copy.deepcopy(base)
        _apply_forms(candidate, choose_dense)
        bn_folds = fold_batchnorm(candidate, x) if fold_bn else []
        return candidate.eval(), bn_folds

    optimized, bn_folds = build(lambda name: name in dense_choice)
    for fold in bn_folds:
        row = by_name.get(fold.source)
        if row is not None:
            _add_note(
                row, f"{fold.target} folded" if fold.applied else f"{fold.target} kept ({fold.detail.split(':')[0]})"
            )
    diff = relative_difference(_forward(optimized, x), reference)
    if not diff <= tolerance:
        raise RuntimeError(
            f"optimize_for_inference: the optimized model's outputs differ from the model's by {diff:.2e} "
            f"(relative; tolerance {tolerance:.0e}). This is a bug in lightning-cheapconv; please report it."
        )

    # 4. Whole-model candidates, timed against each other.
    configurations: dict[str, tuple[nn.Module, list[Fold]]] = {
        "as given": (given, []),
        "optimized": (optimized, [*folds, *bn_folds]),
    }
    structured_names = [r.name for r in rows if r.kind in ("StructuredConv2d", "StructuredLinear")]
    if structured_names and any(name not in dense_choice for name in structured_names):
        all_dense, dense_folds = build(lambda name: True)
        configurations["all dense"] = (all_dense, [*folds, *dense_folds])
    if original is not None:
        reference_model = copy.deepcopy(original).to(target).eval()
        _forward(reference_model, x, "optimize_for_inference (original)")
        configurations["original"] = (reference_model, fold_batchnorm(reference_model, x) if fold_bn else [])
    latency = time_interleaved(
        {name: (lambda m=m: m(x)) for name, (m, _) in configurations.items()}, repeats, min_time, warmup, target
    )
    medians = {name: lat.median_ms for name, lat in latency.items()}
    chosen = min(medians, key=medians.__getitem__)
    final, final_folds = configurations[chosen]
    for row in rows:
        if row.input_shape is None:
            continue
        if chosen == "all dense" and row.kind != "GhostConv2d":
            row.chosen = "dense"
        elif chosen == "as given":
            row.chosen = (
                "ghost+permutation"
                if row.name in permuted
                else row.chosen
                if row.kind == "GhostConv2d"
                else "decomposed"
            )
        elif chosen == "original":
            row.chosen = "original"
    if chosen == "as given":
        final_diff = 0.0
    elif chosen == "optimized":
        final_diff = diff
    elif chosen == "all dense":
        final_diff = relative_difference(_forward(final, x), reference)
    else:
        final_diff = math.nan  # other weights: not comparable
    macs = {name: count_complexity(m, example_input=x).macs for name, (m, _) in configurations.items()}
    report = InferenceReport(
        model=final,
        layers=rows,
        folds=final_folds,
        configurations=medians,
        chosen_configuration=chosen,
        latency_before_ms=medians["as given"],
        latency_after_ms=medians[chosen],
        macs_before=macs["as given"],
        macs_after=macs[chosen],
        max_rel_diff=final_diff,
        device=_device_text(target),
        input_shape=tuple(x.shape),
        repeats=repeats,
        spreads={name: lat.spread for name, lat in latency.items()},
        configuration_macs=macs,
    )
    report.cheap_form_won = _cheap_form_won(rows, chosen, medians)
    n_bn = sum(f.applied and f.kind == "batchnorm" for f in final_folds)
    n_perm = sum(f.applied and f.kind != "batchnorm" for f in final_folds)
    report.summary = _summary(report, n_bn, n_perm)
    return report


def _add_note(row: LayerForms, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


# ----------------------------------------------------------------------------------------------- export

ExportFormat = Literal["onnx", "torchscript", "exported_program"]


class ExportMismatchError(ValueError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance."""


def _run_exported(path: Path, fmt: str, x: Tensor) -> Any:
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location=x.device)(x)
    if fmt == "exported_program":
        return torch.export.load(str(path)).module()(x)
    import onnxruntime  # noqa: PLC0415 - optional dependency

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return [torch.from_numpy(o) for o in outputs]


def export_model(
    model: nn.Module,
    example_input: Tensor,
    path: str | Path,
    format: ExportFormat = "onnx",
    check: bool = True,
    rtol: float = 1e-4,
) -> Path:
    """Export a (converted or optimized) model in eval mode and check the file's outputs against PyTorch's.

    Formats: ``"torchscript"`` (:func:`torch.jit.trace`, loaded with :func:`torch.jit.load`),
    ``"exported_program"`` (:func:`torch.export.export`, saved with :func:`torch.export.save`) and
    ``"onnx"`` (:func:`torch.onnx.export` with the dynamo exporter; needs the ``export`` extra:
    ``pip install lightning-cheapconv[export]``, and checks through onnxruntime on CPU). With
    ``check`` the saved file is loaded, run on ``example_input`` and compared (relative
    difference, see :func:`relative_difference`, at most ``rtol``); a larger difference raises
    :class:`ExportMismatchError`.

    Example::

        >>> report = optimize_for_inference(model, torch.randn(1, 3, 32, 32))
        >>> export_model(report.model, torch.randn(1, 3, 32, 32), "model.onnx")
        PosixPath('model.onnx')
    """
    path = Path(path)
    if format not in ("onnx", "torchscript", "exported_program"):
        raise ValueError(
            f"export_model: format={format!r}; valid formats are 'onnx', 'torchscript', 'exported_program'"
        )
    model = model.eval()
    with torch.inference_mode():
        expected = model(example_input)
    if format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, (example_input,))
        traced.save(str(path))
    elif format == "exported_program":
        program = torch.export.export(model, (example_input,))
        torch.export.save(program, str(path))
    else:
        try:
            import onnx  # noqa: F401, PLC0415
            import onnxscript  # noqa: F401, PLC0415
        except ImportError as err:
            raise ImportError(
                "export_model(format='onnx') needs onnx and onnxscript (and onnxruntime to check): "
                "pip install 'lightning-cheapconv[export]'"
            ) from err
        program = torch.onnx.export(model, (example_input,), dynamo=True, verbose=False, report=False)
        program.save(str(path))
    if check:
        if format == "onnx":
            try:
                import onnxruntime  # noqa: F401, PLC0415
            except ImportError:
                return path
        with torch.inference_mode():
            got = _run_exported(path, format, example_input)
        diff = relative_difference(got, expected)
        if not diff <= rtol:
            raise ExportMismatchError(
                f"export_model: the {format} export of {type(model).__name__} differs from PyTorch by {diff:.2e} "
                f"(relative, tolerance {rtol:.0e}); the file is at {path}"
            )
    return path
