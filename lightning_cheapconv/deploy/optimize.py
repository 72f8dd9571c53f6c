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

from ..complexity import count_complexity, format_count
from ..convert import CHEAP_TYPES, GHOST_TYPES, STRUCTURED_TYPES, replace_modules
from ..nn import GhostConv2d, StructuredConv2d
from ..nn.record import StructureRecordMixin
from ..nn.structured import _StructuredConvNd
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
from .onnx_runtime import onnx_providers, onnx_runner, require_onnxruntime
from .report import InferenceReport, LayerForms
from .timing import Latency, _capture_shapes, _random_input, _Seen, time_interleaved

# CHEAP_TYPES (imported from convert, re-exported by deploy): the layers whose forms are chosen between.


def _ghost_names(modules: Mapping[str, nn.Module]) -> set[str]:
    """The Ghost layers among ``modules`` (by name): they have one form and no exact dense form."""
    return {name for name, module in modules.items() if isinstance(module, GHOST_TYPES)}


RUNTIMES: tuple[str, ...] = ("pytorch", "onnxruntime")
"""Where :func:`optimize_for_inference` measures: PyTorch (eager, or compiled with ``compile=True``) or ONNX Runtime."""
NOISY_SPREAD = 0.2
"""A whole-model timing whose interquartile range exceeds this fraction of its median makes the summary warn that the
choice may not repeat (:attr:`Latency.spread`)."""


def pooling_forms() -> tuple[str, ...]:
    """The concrete sum-pool forms a :class:`StructuredConv2d` can run (``POOLINGS`` of
    :mod:`lightning_cheapconv.nn.structured` without ``"auto"``); empty where the module has one form only.

    Example::

        >>> pooling_forms()
        ('adds', 'avg_pool', 'cumsum')
    """
    from ..nn import structured  # noqa: PLC0415 - read at call time: the set of forms lives there

    if not hasattr(StructuredConv2d, "set_pooling"):
        return ()
    return tuple(p for p in getattr(structured, "POOLINGS", ()) if p != "auto")


def layer_forms(module: nn.Module) -> dict[str, nn.Module]:
    """The forms of one cheap layer that :func:`optimize_for_inference` times, by name.

    A :class:`StructuredConv2d`: ``"decomposed/<pooling>"`` for each of :func:`pooling_forms` (a copy with that
    sum-pool form; plain ``"decomposed"`` where there is one form only; ``StructuredConv1d``/``StructuredConv3d``
    likewise, with the forms their class offers) and ``"dense"`` (``to_dense()``); a :class:`StructuredLinear` or a
    structured transposed conv: ``"decomposed"`` and ``"dense"``; a Ghost module of any kind: ``"ghost"`` (as it is).

    Example::

        >>> list(layer_forms(StructuredConv2d(16, 16, 3, padding=1)))
        ['decomposed/adds', 'decomposed/avg_pool', 'decomposed/cumsum', 'dense']
    """
    if isinstance(module, GHOST_TYPES):
        return {"ghost": module}
    forms: dict[str, nn.Module] = {}
    offered = getattr(module, "poolings", ())
    poolings = tuple(p for p in pooling_forms() if p in offered) if isinstance(module, _StructuredConvNd) else ()
    for pooling in poolings:
        form = copy.deepcopy(module)
        form.set_pooling(pooling)
        forms[f"decomposed/{pooling}"] = form
    if not poolings:
        forms["decomposed"] = module
    forms["dense"] = _dense(module)
    return forms


def _as_given_form(module: nn.Module, runtime: str) -> str:
    """The form name of a structured layer as it is: its pooling where it has one; in PyTorch the form its
    ``"auto"`` runs (in ONNX Runtime that is decided at export, so ``"decomposed/auto"`` is all that is known)."""
    pooling = getattr(module, "pooling", None)
    if not isinstance(module, _StructuredConvNd) or pooling is None:
        return "decomposed"
    if runtime == "pytorch" and hasattr(module, "active_pooling"):
        pooling = module.active_pooling()
    return f"decomposed/{pooling}"


def _form_key(module: nn.Module, seen: _Seen, device: torch.device) -> tuple:
    record = module.structure_record() if isinstance(module, StructureRecordMixin) else {}
    return (type(module).__name__, repr(sorted(record.items())), seen, str(device))


def _dense(module: nn.Module) -> nn.Module:
    return _like(module.to_dense(), module).train(False)


def _macs(module: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    return counter.get_total_flops() // 2


def _time(
    models: Mapping[str, nn.Module],
    x: Tensor,
    runtime: str,
    compile: bool,
    repeats: int,
    min_time: float,
    warmup: int,
    device: torch.device,
    what: str,
) -> tuple[dict[str, Latency], dict[str, bytes]]:
    """Time ``models`` on ``x`` against each other in ``runtime`` (interleaved, :func:`time_interleaved`); the ONNX
    graphs timed (``runtime="onnxruntime"``) by name."""
    graphs: dict[str, bytes] = {}
    if runtime == "onnxruntime":
        runners: dict[str, Callable[[], Any]] = {}
        for name, m in models.items():
            try:
                runners[name] = onnx_runner(m, x, device)
            except RuntimeError as err:
                raise RuntimeError(f"optimize_for_inference(runtime='onnxruntime'), {what} {name!r}: {err}") from err
            graphs[name] = runners[name].graph  # type: ignore[attr-defined]
    elif compile:
        compiled = {name: _compiled(m, x, name) for name, m in models.items()}
        runners = {name: (lambda r=r: r(x)) for name, r in compiled.items()}
    else:
        runners = {name: (lambda m=m: m(x)) for name, m in models.items()}
    return time_interleaved(runners, repeats, min_time, warmup, device), graphs


def _time_layers(
    model: nn.Module,
    shapes: Mapping[str, _Seen],
    permuted: Mapping[str, nn.Module],
    device: torch.device,
    repeats: int,
    min_time: float,
    warmup: int,
    runtime: str = "pytorch",
) -> list[LayerForms]:
    """Time the forms of every cheap layer (:func:`layer_forms`; eager PyTorch or ONNX Runtime); layers of equal
    configuration and input share one measurement."""
    cache: dict[tuple, tuple[dict[str, float], dict[str, int]]] = {}
    rows: list[LayerForms] = []
    for name, module in _unique_modules(model, CHEAP_TYPES).items():
        seen = shapes.get(name)
        row = LayerForms(name, type(module).__name__, None if seen is None else seen.shape)
        rows.append(row)
        if seen is None:
            row.chosen = "ghost" if isinstance(module, GHOST_TYPES) else _as_given_form(module, runtime)
            row.note = "not called by the example input; kept as is"
            continue
        key = (_form_key(module, seen, device), _form_key(permuted[name], seen, device) if name in permuted else None)
        if key not in cache:
            forms = layer_forms(module)
            if name in permuted:
                forms["ghost+permutation"] = permuted[name]
            x = _random_input(seen, device)
            latency, _ = _time(forms, x, runtime, False, repeats, min_time, warmup, device, f"layer {name!r}, form")
            cache[key] = (
                {form: lat.median_ms for form, lat in latency.items()},
                {form: _macs(m, x) for form, m in forms.items()},
            )
        row.times_ms, row.macs = dict(cache[key][0]), dict(cache[key][1])
        if isinstance(module, GHOST_TYPES):
            row.chosen = "ghost"
        else:
            row.chosen = min(row.times_ms, key=row.times_ms.__getitem__)
    return rows


def _apply_forms(model: nn.Module, choose: Callable[[str], str | None]) -> None:
    """Put every structured layer in the form ``choose(name)`` names (``"dense"``, ``"decomposed/<pooling>"``;
    ``None`` or ``"decomposed"``: as it is)."""
    replacements = {}
    for name, module in _unique_modules(model, STRUCTURED_TYPES).items():
        form = choose(name)
        if form == "dense":
            replacements[name] = _dense(module)
        elif form is not None and form.startswith("decomposed/"):
            module.set_pooling(form.removeprefix("decomposed/"))
    if replacements:
        replace_modules(model, replacements)


def _cheap_form_won(
    rows: list[LayerForms], chosen: str, configurations: Mapping[str, float], ghosts_named: set[str]
) -> bool | None:
    """Whether the returned model keeps a cheap form that beat its dense alternative (``None``: unknown);
    ``ghosts_named``: the Ghost layers' names (every other row is structured)."""
    if chosen in ("all dense", "original"):
        return False
    structured = [r for r in rows if r.name not in ghosts_named and r.input_shape is not None]
    ghosts = [r for r in rows if r.name in ghosts_named]
    if structured:
        # As given, every structured layer is decomposed, and that beat the dense alternatives as a whole.
        if chosen == "as given" or any(r.chosen.startswith("decomposed") and r.cheap_faster for r in structured):
            return True
    if ghosts:
        return True if "original" in configurations else None
    return False


def _summary(report: InferenceReport, n_folded_bn: int, n_perm: int, ghosts_named: set[str]) -> str:
    rows = report.layers
    structured = [r for r in rows if r.name not in ghosts_named and r.input_shape is not None]
    decomposed_faster = [r for r in structured if r.cheap_faster]
    chosen = report.chosen_configuration
    parts = [
        f"On {report.device} in {report.runtime_label}, input {_shape_text(report.input_shape)}: "
        f"{report.latency_before_ms:.3f} ms as given → "
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
    if report.macs_after > report.macs_before:
        parts.append(
            f"The returned model computes {format_count(report.macs_after)} MACs for this input against "
            f"{format_count(report.macs_before)} as given ({report.macs_after / report.macs_before:.2f}×): the "
            "layers kept dense were faster that way."
        )
    if n_folded_bn or n_perm:
        parts.append(f"Folded {n_folded_bn} BatchNorm(s) and {n_perm} Ghost output permutation(s).")
    if chosen == "as given":
        parts.append("No optimization was faster than the model as given (within noise); it is returned unchanged.")
    elif chosen == "all dense":
        parts.append("Folding every structured layer to dense beat the per-layer choice as a whole; returned that.")
    elif chosen == "original":
        parts.append("The original dense model (BatchNorm folded) was faster than the converted one; returned it.")
    if chosen != "original" and "original" in report.configurations:
        original = report.configurations["original"]
        parts.append(
            f"The converted model beat the original dense model (BatchNorm folded, {original:.3f} ms) as a whole: "
            f"{original / report.latency_after_ms:.2f}× faster."
        )
    noisy = {name: spread for name, spread in report.spreads.items() if spread > NOISY_SPREAD}
    if noisy:
        worst = max(noisy, key=noisy.__getitem__)
        parts.append(
            f"The whole-model timings were noisy (IQR {noisy[worst]:.0%} of the median for '{worst}'; above "
            f"{NOISY_SPREAD:.0%} for {len(noisy)} of {len(report.spreads)}): the choice may differ on a rerun; time on "
            "an idle machine or raise repeats=."
        )
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
    runtime: str = "pytorch",
) -> InferenceReport:
    """Choose the fastest form of every cheap layer by measurement, fold BatchNorm, and return a report.

    Works on a deep copy in eval mode on ``device`` (default: the model's). With forward hooks it
    records the input shape each cheap layer sees for ``example_input`` (its dtype and memory
    format too: pass a channels-last bfloat16 input to a channels-last bfloat16 model to optimize
    for that). Then:

    1. Ghost modules: an identity output permutation is dropped, others are folded into the
       following BatchNorm/activation/conv where exact (:func:`fold_ghost_permutations`).
    2. Every structured layer is timed in each of its forms (:func:`layer_forms`: decomposed, with each
       sum-pool form where it has several, and folded to dense with ``to_dense()``) on a random
       input of its shape (layers of equal configuration share a measurement; forms interleaved,
       median of ``repeats``); the fastest form is kept (a sum-pool form is set on the layer, so it is
       in its structure record). Ghost modules are timed as they are.
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

    ``runtime="onnxruntime"`` measures steps 2 and 4 in ONNX Runtime instead: every per-layer form and
    every whole-model candidate is exported with ``torch.onnx.export(dynamo=True)`` (in memory, static
    shapes), its outputs checked against eager, and timed in an ``InferenceSession`` (all graph
    optimizations, ``torch.get_num_threads()`` intra-op threads; the CUDA provider for a CUDA ``device``
    where ``onnxruntime-gpu`` has it, else CPU). The returned model then runs at least as fast in ONNX
    Runtime as every other candidate (``original`` with BatchNorm folded included); export it with
    ``export_model(report.model, x, "model.onnx")``, or write ``report.onnx_model``, the graph that was timed.
    Needs ``pip install 'lightning-cheapconv[export]'``; not with ``compile=True``.

    The optimized model must match the model as given (relative difference 1e-4 in float32),
    else a ``RuntimeError`` names the difference. Its choices live in the modules' structure
    records: ``restructure`` + ``load_state_dict`` of ``report.model.state_dict()`` rebuild it in a
    fresh dense or converted model. Timings are noisy on shared machines: raise ``repeats`` and
    ``min_time`` for decisions that matter.

    Raises:
        ValueError: the model has no cheap layers, ``example_input`` does not fit it, ``runtime`` is not one of
            :data:`RUNTIMES`, or ``compile=True`` with ``runtime="onnxruntime"``.
        ImportError: ``runtime="onnxruntime"`` without onnx, onnxscript or onnxruntime installed.

    Example::

        >>> model = get_model("resnet56", 10); _ = convert_to_ghost(model)
        >>> report = optimize_for_inference(model, torch.randn(32, 3, 32, 32), repeats=5)
        >>> report.print(); report.latency_after_ms <= report.latency_before_ms
        >>> x = torch.randn(32, 3, 32, 32)
        >>> runner = compile_for_inference(optimize_for_inference(model, x, compile=True).model, x)
        >>> report = optimize_for_inference(model, x, runtime="onnxruntime", original=get_model("resnet56", 10))
        >>> Path("resnet56.onnx").write_bytes(report.onnx_model)     # what was timed in ONNX Runtime
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
    if runtime not in RUNTIMES:
        raise ValueError(
            f"optimize_for_inference: runtime={runtime!r}; valid runtimes are {', '.join(map(repr, RUNTIMES))}"
        )
    if runtime == "onnxruntime":
        if compile:
            raise ValueError(
                "optimize_for_inference: compile=True times torch.compile and runtime='onnxruntime' times ONNX "
                "Runtime; pass one of them"
            )
        require_onnxruntime("optimize_for_inference(runtime='onnxruntime')")
        if example_input.dtype == torch.bfloat16:
            raise ValueError(
                "optimize_for_inference(runtime='onnxruntime'): example_input is bfloat16, which the ONNX Runtime "
                "Python API cannot take (numpy has no bfloat16); use float32 or float16"
            )
    if not _unique_modules(model, CHEAP_TYPES):
        raise ValueError(
            "optimize_for_inference: the model has no cheap layers (Ghost or structured, of any conv type, or "
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
    ghosts_named = _ghost_names(cheap)
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
    rows = _time_layers(base, shapes, permuted, target, repeats, min_time, warmup, runtime)
    by_name = {row.name: row for row in rows}
    for fold in folds:
        row = by_name.get(fold.source)
        if row is None:
            continue
        if fold.applied:
            _add_note(row, f"permutation folded into {fold.target}" if fold.kind == "permutation" else fold.detail)
        else:
            _add_note(row, f"permutation kept ({fold.detail})")
    choice = {r.name: r.chosen for r in rows if r.input_shape is not None}
    dense_choice = {name for name, form in choice.items() if form == "dense"}

    def build(choose: Callable[[str], str | None]) -> tuple[nn.Module, list[Fold]]:
        candidate = copy.deepcopy(base)
        _apply_forms(candidate, choose)
        bn_folds = fold_batchnorm(candidate, x) if fold_bn else []
        return candidate.eval(), bn_folds

    optimized, bn_folds = build(choice.get)
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
    structured_names = [r.name for r in rows if r.name not in ghosts_named]
    if structured_names and any(name not in dense_choice for name in structured_names):
        all_dense, dense_folds = build(lambda name: "dense")
        configurations["all dense"] = (all_dense, [*folds, *dense_folds])
    if original is not None:
        reference_model = copy.deepcopy(original).to(target).eval()
        _forward(reference_model, x, "optimize_for_inference (original)")
        configurations["original"] = (reference_model, fold_batchnorm(reference_model, x) if fold_bn else [])
    latency, graphs = _time(
        {name: m for name, (m, _) in configurations.items()},
        x,
        runtime,
        compile,
        repeats,
        min_time,
        warmup,
        target,
        "the whole model",
    )
    medians = {name: lat.median_ms for name, lat in latency.items()}
    chosen = min(medians, key=medians.__getitem__)
    final, final_folds = configurations[chosen]
    for row in rows:
        if row.input_shape is None:
            continue
        if chosen == "all dense" and row.name not in ghosts_named:
            row.chosen = "dense"
        elif chosen == "as given":
            if row.note:
                _add_note(row, "not applied: the model as given was returned")
            row.chosen = (
                "ghost+permutation"
                if row.name in permuted
                else row.chosen
                if row.name in ghosts_named
                else _as_given_form(given.get_submodule(row.name), runtime)
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
        runtime=runtime,
        runtime_detail=_runtime_detail(runtime, target),
        onnx_model=graphs.get(chosen),
    )
    report.cheap_form_won = _cheap_form_won(rows, chosen, medians, ghosts_named)
    n_bn = sum(f.applied and f.kind == "batchnorm" for f in final_folds)
    n_perm = sum(f.applied and f.kind != "batchnorm" for f in final_folds)
    report.summary = _summary(report, n_bn, n_perm, ghosts_named)
    return report


def _compiled(model: nn.Module, x: Tensor, name: str) -> Callable[..., Any]:
    try:
        return compile_for_inference(model, x)
    except RuntimeError as err:
        raise RuntimeError(
            f"optimize_for_inference(compile=True), the {name!r} model: {err}. Run without compile=True to time the "
            f"eager models."
        ) from err


def _runtime_detail(runtime: str, device: torch.device) -> str:
    if runtime != "onnxruntime":
        return ""
    provider = onnx_providers(device)[0]
    provider = provider[0] if isinstance(provider, tuple) else provider
    return f"{provider}, {torch.get_num_threads()} intra-op threads"


def _add_note(row: LayerForms, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
