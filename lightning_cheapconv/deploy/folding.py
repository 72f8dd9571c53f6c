"""Exact folds, in place: BatchNorm into the layer before it (:func:`fold_batchnorm`, Ghost modules
included, half precision too) and Ghost modules' output permutations into their own weights or the
layers after them (:func:`fold_ghost_permutations`).

Both find their pairs in an fx trace of the model that keeps cheap modules whole, check every fold
on the example input, and report each fold applied or refused as a :class:`Fold`.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils._pytree import tree_leaves

from ..convert import replace_modules
from ..nn import (
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
from ..nn.fused import FoldedBatchNorm, FusedConv2d, FusedGhostConv2d
from ..nn.record import StructureRecordMixin, conv_config
from ._utils import _device_dtype, _first_inputs, _forward, _like, _tolerance, _unique_modules, relative_difference

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


_HALF = (torch.float16, torch.bfloat16)
HALF_ERROR_FACTOR = 4.0
"""A half-precision fold is accepted when its error against a float64 reference is at most this many times the
unfolded half-precision pair's own error against that reference (or below the tolerance)."""


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


_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _foldable_bn(bn: nn.Module) -> str | None:
    if type(bn) not in _PLAIN_NORMS:
        return f"{type(bn).__name__} is not a plain BatchNorm (BatchNorm1d/2d/3d, SyncBatchNorm)"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm keeps no running statistics (it normalizes with batch statistics)"
    return None


def _fused_weights(conv: nn.Module, bn: nn.Module, transpose: bool = False) -> tuple[Tensor, Tensor]:
    """The folded weight and bias in float64 (:func:`torch.nn.utils.fusion.fuse_conv_bn_weights`, any dimension;
    ``transpose``: the output channels are the weight's dim 1)."""
    return fuse_conv_bn_weights(
        conv.weight.detach().double(),
        None if conv.bias is None else conv.bias.detach().double(),
        bn.running_mean.double(),
        bn.running_var.double(),
        bn.eps,
        None if bn.weight is None else bn.weight.detach().double(),
        None if bn.bias is None else bn.bias.detach().double(),
        transpose=transpose,
    )


def _fuse_plain_nd(conv: nn.Module, bn: nn.Module) -> tuple[nn.Module | None, str]:
    """A plain ``nn.Conv1d``/``nn.Conv3d``/``nn.ConvTranspose{d}d`` with a bias takes the BatchNorm into its own
    weight and bias (same type: a fresh model's layer has that bias too, so the state dict still restructures).
    Without a bias the fold would add one, which only :class:`FusedConv2d` records (a ``FusedConv1d``/``3d`` or
    transposed form does not exist)."""
    kind = type(conv).__name__
    if conv.bias is None:
        return None, (
            f"{kind} without bias: the folded bias needs a fused {kind} with a structure record (FusedConv2d exists "
            "for Conv2d only), so that the state dict restructures into a fresh model"
        )
    weight, bias = _fused_weights(conv, bn, transpose=isinstance(conv, _TRANSPOSED_CONVS))
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused, "exact"


def _fuse_plain(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    weight, bias = _fused_weights(conv, bn)
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
    """Alpha scaled per output channel, bias added (``StructuredConv1d/2d/3d``: the weight's dim 0 is the output)."""
    scale, shift = _bn_scale_shift(bn)
    config = {**conv.config(), "bias": True}
    fused = type(conv)(**config, device=conv.weight.device, dtype=conv.weight.dtype)
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach().double() * scale.view(-1, *[1] * (conv.weight.dim() - 1)))
        fused.bias.copy_(bias)
    return _like(fused, conv)


def _fuse_ghost(ghost: GhostConv2d, bn: nn.Module) -> tuple[nn.Module | None, str]:
    """Fold a BatchNorm after a conv-only Ghost module (or a :class:`FusedGhostConv2d`) exactly, else say why not.

    ``y = a·out + b`` per channel. The primary conv takes the intrinsic channels' scale (``z' = a·z``),
    each ghost's depthwise kernel the ratio of its scale to its intrinsic's and its bias the ghost's
    shift, so ``cheap(z')`` is the normalized ghost, zero padding included. The intrinsic channels'
    shift goes into the primary conv's bias where the depthwise conv cannot see it wrongly (a 1x1
    depthwise conv, which reads no padding, or a zero shift): the result is a plain ``GhostConv2d``.
    Otherwise it becomes the ``intrinsic_bias`` of a :class:`FusedGhostConv2d`, added after the depthwise
    conv has read the intrinsic maps.
    """
    if ghost.norm_name is not None or ghost.act_name is not None:
        return None, "the Ghost module applies its own norm/activation between its convs"
    kind = type(ghost).__name__
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
    bias0 = getattr(ghost, "intrinsic_bias", None)
    bias0 = bias0.detach().double() if bias0 is not None else torch.zeros_like(a_int)
    carried = a_int * bias0 + b_int  # the intrinsic maps' shift after the fold
    # A shift is zero when the BatchNorm's bias cancels its mean term (up to float rounding of that cancellation).
    size = torch.zeros(m * ratio, dtype=torch.float64, device=device)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(shift)
    size[index] = beta.abs() + (beta - shift).abs()
    into_primary = ghost.dw_size == 1 or not bool((carried.abs() > 1e-6 * (size[:m] + (a_int * bias0).abs())).any())
    primary, cheap = ghost.primary, ghost.cheap
    factory = {"device": primary.weight.device, "dtype": primary.weight.dtype}
    if into_primary:
        config = {**ghost.config(), "bias": True, "norm_layer": None, "act_layer": None}
        fused: GhostConv2d = (GhostConv2d if isinstance(ghost, FusedGhostConv2d) else type(ghost))(**config, **factory)
        shift_int = carried
        detail = "exact: scale into both convs, shift into their biases"
    elif not isinstance(ghost, GhostConv2d):
        return None, (
            f"the intrinsic maps' shift must be added after the depthwise conv, which needs a fused {kind} "
            "(FusedGhostConv2d exists in 2-d only)"
        )
    else:
        config = {k: v for k, v in ghost.config().items() if k not in ("bias", "norm_layer", "act_layer")}
        fused = FusedGhostConv2d(**config, **factory)
        shift_int = torch.zeros_like(carried)
        detail = (
            "exact: scale into both convs, the ghosts' shift into the depthwise bias, the intrinsic maps' shift "
            "added after the depthwise conv (FusedGhostConv2d)"
        )
    fused.set_output_index(ghost.output_index)
    ratio_g = a_ghost / a_int[parent]
    ones = [1] * (primary.weight.dim() - 1)  # per-channel scales over (in/groups, *kernel)
    with torch.no_grad():
        w = primary.weight.detach().double()
        fused.primary.weight.copy_(w * a_int.view(-1, *ones))
        b0 = primary.bias.detach().double() if primary.bias is not None else torch.zeros_like(a_int)
        fused.primary.bias.copy_(b0 * a_int + shift_int)
        wc = cheap.weight.detach().double()
        fused.cheap.weight.copy_(wc * ratio_g.view(-1, *ones))
        c0 = cheap.bias.detach().double() if cheap.bias is not None else torch.zeros_like(a_ghost)
        taps = wc.flatten(1).sum(dim=1)  # what a shift of the intrinsic map adds to the ghost away from borders
        fused.cheap.bias.copy_(a_ghost * c0 + b_ghost - ratio_g * shift_int[parent] * taps)
        if isinstance(fused, FusedGhostConv2d):
            fused.intrinsic_bias.copy_(carried)
    return _like(fused, primary), detail


def _fuse(conv: nn.Module, bn: nn.Module) -> tuple[nn.Module | None, str]:
    reason = _foldable_bn(bn)
    if reason is not None:
        return None, reason
    out_channels = getattr(conv, "out_channels", None)
    if out_channels != bn.num_features:
        return None, f"{out_channels} conv channels but {bn.num_features} BatchNorm features"
    if type(conv) in (nn.Conv2d, FusedConv2d):
        return _fuse_plain(conv, bn), "exact"
    if type(conv) in (nn.Conv1d, nn.Conv3d, *_TRANSPOSED_CONVS):
        return _fuse_plain_nd(conv, bn)
    if type(conv) in (StructuredConv1d, StructuredConv2d, StructuredConv3d):
        return _fuse_structured(conv, bn), "exact"
    if type(conv) in (GhostConv1d, GhostConv2d, GhostConv3d, FusedGhostConv2d):
        return _fuse_ghost(conv, bn)
    if type(conv) in _STRUCTURED_TRANSPOSED:
        return None, (
            f"{type(conv).__name__}: the box filter mixes hidden channels into every output channel, so a per-channel "
            "scale has no place in alpha"
        )
    if type(conv) in _GHOST_TRANSPOSED:
        return None, f"{type(conv).__name__}: a fold needs a fused form (as FusedGhostConv2d), which it has not"
    return None, f"{type(conv).__name__} is not a layer BatchNorm folds into"


_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_STRUCTURED_TRANSPOSED = (StructuredConvTranspose1d, StructuredConvTranspose2d, StructuredConvTranspose3d)
_GHOST_TRANSPOSED = (GhostConvTranspose1d, GhostConvTranspose2d, GhostConvTranspose3d)
# The layers a BatchNorm after them is paired with: folded where exact, else reported as refused with the reason.
_FOLDABLE_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    *_TRANSPOSED_CONVS,
    FusedConv2d,
    StructuredConv1d,
    StructuredConv2d,
    StructuredConv3d,
    *_STRUCTURED_TRANSPOSED,
    GhostConv1d,
    GhostConv2d,
    GhostConv3d,
    FusedGhostConv2d,
    *_GHOST_TRANSPOSED,
)


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


def _verify_fold(pair: nn.Module, fused: nn.Module, x: Tensor, dtype: torch.dtype, tolerance: float) -> Fold:
    """Check a fold on ``x`` (one sample of the layer's input); the returned ``Fold`` has empty names.

    In float32/float64 the folded layer must match the conv+BatchNorm pair within ``tolerance``. In
    float16/bfloat16 the folded weights are rounded to the model's dtype, which alone differs from
    the pair by about the dtype's epsilon: both the pair and the folded layer run in that dtype and
    are compared with the pair in float64 (the same half-precision weights, exactly), and the fold is
    accepted when its error is at most :data:`HALF_ERROR_FACTOR` times the pair's own (or below
    ``tolerance``): it is then as exact as the unfolded model is in that precision.
    """
    with torch.inference_mode():
        if dtype not in _HALF:
            diff = relative_difference(fused(x), pair(x))
            if diff < tolerance:
                return Fold("batchnorm", "", "", True, "", diff)
            return Fold("batchnorm", "", "", False, f"not exact (relative difference {diff:.2e})", diff)
        expected = copy.deepcopy(pair).double()(x.double())
        own = relative_difference(pair(x), expected)
        diff = relative_difference(fused(x), expected)
    name = str(dtype).removeprefix("torch.")
    versus = f"{diff:.2e} vs {own:.2e} for the unfolded {name} pair, against float64"
    if diff < tolerance or diff <= HALF_ERROR_FACTOR * own:
        return Fold("batchnorm", "", "", True, f"; within the {name} rounding of the unfolded pair ({versus})", diff)
    return Fold("batchnorm", "", "", False, f"not exact in {name} ({versus})", diff)


def fold_batchnorm(model: nn.Module, example_input: Tensor, tolerance: float = 1e-5) -> list[Fold]:
    """Fold every BatchNorm (1d, 2d, 3d) into the layer just before it, where that is exact, in place (eval mode).

    A BatchNorm folds when its only input is the output of a plain ``nn.Conv2d`` (the pair becomes
    a :class:`FusedConv2d`, through :func:`torch.nn.utils.fusion.fuse_conv_bn_weights`), a
    :class:`~lightning_cheapconv.nn.StructuredConv2d` (alpha scaled per output channel, bias
    added) or a conv-only :class:`~lightning_cheapconv.nn.GhostConv2d` (scale into both convs; the
    shift into their biases where the depthwise conv cannot see it wrongly, else the Ghost module
    becomes a :class:`~lightning_cheapconv.nn.FusedGhostConv2d` that adds the intrinsic maps' shift
    after its depthwise conv: exact at zero-padded borders), and nothing else uses that output. In 1-d and 3-d
    (BatchNorm1d/3d) the same holds for ``StructuredConv1d/3d`` and for ``GhostConv1d/3d`` where the shift goes
    into the biases; a plain ``nn.Conv1d``/``nn.Conv3d``/``nn.ConvTranspose{d}d`` folds into its own weight and bias
    when it has a bias. Every other pair of a conv type and a BatchNorm is reported as refused, with the reason
    naming the type (a bias-less 1-d/3-d or transposed conv, whose new bias no structure record would keep; the
    structured and Ghost transposed convs; a Ghost module needing a fused form outside 2-d).
    Pairs come from an fx trace of the model (cheap modules kept whole) or, when the model cannot
    be traced, from consecutive children of ``nn.Sequential`` containers. The folded weights are
    computed in float64 and stored in the model's dtype. Each fold is checked on the input its
    layer sees for ``example_input`` (first sample) and applied only if the relative output
    difference is below ``tolerance``; in float16/bfloat16, where rounding the folded weights alone
    differs by about the dtype's epsilon, it is applied if its error against the pair computed in
    float64 is at most :data:`HALF_ERROR_FACTOR` times the unfolded pair's own (the ``Fold`` detail
    gives both). The BatchNorm's place is taken by a :class:`FoldedBatchNorm`, so the state dict
    restructures into a fresh model.

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
    convs = {conv: model.get_submodule(conv) for conv, _ in pairs}
    inputs, _ = _first_inputs(model, x, convs, lambda t: t[:1].detach().clone())  # one sample per layer
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
        pair = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).eval()
        check = _verify_fold(pair, fused.eval(), sample, dtype, tolerance)
        if not check.applied:
            folds.append(Fold("batchnorm", conv_name, bn_name, False, check.detail, check.max_rel_diff))
            continue
        folds.append(Fold("batchnorm", conv_name, bn_name, True, detail + check.detail, check.max_rel_diff))
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
    elif type(module) in (GhostConv2d, FusedGhostConv2d):
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


def _absorb_own_permutation(ghost: GhostConv2d, index: Tensor) -> GhostConv2d | None:
    """A copy of ``ghost`` without output permutation whose convs' channels are reordered instead, or ``None``.

    Possible when the permutation only reorders the intrinsic maps together with their ghosts: the first
    ``intrinsic_channels`` outputs are the intrinsic maps in some order ``σ`` and the rest are ghosts, the
    ``j``-th of them a ghost of intrinsic ``σ[j // (ratio - 1)]``. Then ``cat(primary[σ], cheap[τ])`` is
    the output, with no gather.
    """
    if ghost.norm_name is not None:
        return None
    m, per = ghost.intrinsic_channels, ghost.ratio - 1
    index = index.cpu()
    order, ghosts = index[:m], index[m:] - m
    if not torch.equal(order.sort().values, torch.arange(m)) or bool((ghosts < 0).any()):
        return None
    if not torch.equal(ghosts // per, order[torch.arange(len(ghosts)) // per]):
        return None
    spare = [g for g in range(m * per) if g not in set(ghosts.tolist())]  # dropped ghosts: fill the unused slots
    spare_of = {i: [g for g in spare if g // per == i] for i in range(m)}
    tail = [spare_of[int(order[j // per])].pop() for j in range(len(ghosts), m * per)]
    cheap_order = torch.cat([ghosts, torch.tensor(tail, dtype=ghosts.dtype)])
    new = copy.deepcopy(ghost)
    new.set_output_index(None)
    with torch.no_grad():
        for conv, rows in ((new.primary, order), (new.cheap, cheap_order)):
            for tensor in (conv.weight, conv.bias):
                if tensor is not None:
                    tensor.copy_(tensor[rows.to(tensor.device)].clone())
        if isinstance(new, FusedGhostConv2d):
            new.intrinsic_bias.copy_(new.intrinsic_bias[order.to(new.intrinsic_bias.device)].clone())
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
    An identity permutation is dropped. A permutation that only reorders the intrinsic maps together
    with their ghosts (intrinsic maps first) moves into the module's own primary and depthwise
    weights. Otherwise, when the permutation covers the first
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
        absorbed = _absorb_own_permutation(ghost, index)
        if absorbed is not None:
            undo.setdefault(name, ghost)
            replace_modules(model, {name: absorbed})
            folds.append(Fold("permutation", name, name, True, "exact: into its own primary and depthwise weights"))
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
