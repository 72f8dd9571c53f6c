"""Per-layer form selection: :func:`optimize_for_inference` times the forms of every cheap layer on
the input it really sees, keeps the fastest, folds BatchNorm and Ghost permutations where exact,
and returns whichever whole model (as given, optimized, all dense, original) was fastest."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..complexity import count_complexity
from ..convert import replace_modules
from ..nn import GhostConv2d, StructuredConv2d, StructuredLinear
from ..nn.record import StructureRecordMixin
from ._utils import (
    _device_dtype,
    _forward,
    _like,
    _require_close,
    _shape_text,
    _tolerance,
    _unique_modules,
    relative_difference,
)
from .compiled import compile_for_inference
from .folding import Fold, fold_batchnorm, fold_ghost_permutations
from .report import InferenceReport, LayerForms
from .timing import _capture_shapes, _random_input, _Seen, time_interleaved

CHEAP_TYPES: tuple[type[nn.Module], ...] = (GhostConv2d, StructuredConv2d, StructuredLinear)
"""The layer types whose forms :func:`optimize_for_inference` chooses between."""


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
    if report.compiled:
        parts.append(
            "Whole models were timed compiled (torch.compile, inductor with freezing) and layers eager: run the "
            "returned model through compile_for_inference(model, example_input) to get that latency."
        )
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
    compile: bool = False,
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
       With ``compile=True`` each of these whole models is timed compiled by
       :func:`compile_for_inference` (``torch.compile``, inductor with freezing: BatchNorm folds,
       the sum-pool fuses with its neighbours); run the returned model through it too to get that
       latency. The per-layer times of step 2 stay eager. Compiling takes seconds to a minute per
       configuration, and on a CPU needs a C++ compiler.

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
        >>> x = torch.randn(32, 3, 32, 32)
        >>> runner = compile_for_inference(optimize_for_inference(model, x, compile=True).model, x)
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
    what = "optimize_for_inference: the optimized model's outputs differ from the model's"
    diff = _require_close(
        _forward(optimized, x), reference, tolerance, what, after=". This is a bug; please report it."
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
    runners = {name: _compiled(m, x, name) if compile else m for name, (m, _) in configurations.items()}
    latency = time_interleaved(
        {name: (lambda r=r: r(x)) for name, r in runners.items()}, repeats, min_time, warmup, target
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
        compiled=compile,
    )
    report.cheap_form_won = _cheap_form_won(rows, chosen, medians)
    n_bn = sum(f.applied and f.kind == "batchnorm" for f in final_folds)
    n_perm = sum(f.applied and f.kind != "batchnorm" for f in final_folds)
    report.summary = _summary(report, n_bn, n_perm)
    return report


def _compiled(model: nn.Module, x: Tensor, name: str) -> Callable[..., Any]:
    try:
        return compile_for_inference(model, x)
    except RuntimeError as err:
        raise RuntimeError(
            f"optimize_for_inference(compile=True), the {name!r} model: {err}. Run without compile=True to time the "
            f"eager models."
        ) from err


def _add_note(row: LayerForms, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
