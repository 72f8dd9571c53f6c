"""What :func:`~lightning_cheapconv.deploy.optimize_for_inference` measured and chose:
:class:`InferenceReport`, with one :class:`LayerForms` per cheap layer, as a rich table or a dict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import rich
from rich.console import Console
from rich.table import Table
from torch import nn

from ..complexity import format_count
from ..report import print_full_width
from ._utils import _shape_text
from .folding import Fold

_DASH = "—"
_ORT_NOTE = (
    "Every layer form and whole model was exported with torch.onnx.export(dynamo=True) and timed in an ONNX Runtime "
    "session (all graph optimizations). "
)


@dataclass
class LayerForms:
    """One cheap layer: the forms timed (median ms each) and their MACs, and the form kept.

    Forms (see :func:`~lightning_cheapconv.deploy.optimize.layer_forms`): ``"decomposed"`` (a structured layer
    as converted; ``"decomposed/<pooling>"`` with that sum-pool form where the layer has several),
    ``"dense"`` (folded with ``to_dense()``), ``"ghost"`` (a Ghost module as deployed) and
    ``"ghost+permutation"`` (the Ghost module before its output permutation was folded away).

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
    model as given, ``latency_after_ms`` the returned model; with ``compiled`` these whole-model
    latencies were measured under ``torch.compile`` (the per-layer times are eager). ``runtime`` says
    where everything was measured: ``"pytorch"`` or ``"onnxruntime"`` (then ``runtime_detail`` names the
    execution provider and threads, and ``onnx_model`` is the serialized ONNX graph of the returned
    model that was timed: ``Path("model.onnx").write_bytes(report.onnx_model)``).

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
    compiled: bool = False
    runtime: str = "pytorch"
    runtime_detail: str = ""
    onnx_model: bytes | None = field(default=None, repr=False)

    @property
    def runtime_label(self) -> str:
        """Where the latencies were measured, in words (e.g. ``"ONNX Runtime (CPUExecutionProvider, 2 intra-op
        threads)"``, ``"PyTorch eager"``)."""
        if self.runtime == "onnxruntime":
            return f"ONNX Runtime ({self.runtime_detail})" if self.runtime_detail else "ONNX Runtime"
        return "PyTorch (whole models compiled)" if self.compiled else "PyTorch eager"

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
        forms = list(dict.fromkeys(f for r in self.layers for f in r.times_ms))  # in the order they were timed
        caption = (
            f"Median of {self.repeats} interleaved samples per form, on {self.device} in {self.runtime_label}, input "
            f"{_shape_text(self.input_shape)}; layers of equal configuration and input share one measurement. "
            f"{'Whole models timed under torch.compile (inductor, freezing), layers eager. ' if self.compiled else ''}"
            f"{_ORT_NOTE if self.runtime == 'onnxruntime' else ''}"
            f"MACs = FLOPs / 2 from FlopCounterMode for the whole input batch (bias, BatchNorm and the structured "
            f"sum-pool's additions not counted); MACs ratio = dense / kept (2.00× = half; — for Ghost modules, which "
            f"have no dense form). Whole model: "
            f"{self.latency_before_ms:.3f} ms as given → {self.latency_after_ms:.3f} ms "
            f"({self.chosen_configuration}), {self.speedup:.2f}× faster; outputs differ by "
            f"{self.max_rel_diff:.1e} (relative)."
        )
        table = Table(
            title=f"Inference forms on {self.device}, measured in {self.runtime_label}",
            caption=caption,
            caption_justify="left",
        )
        table.add_column("layer", overflow="fold")
        table.add_column("type")
        table.add_column("input", justify="right")
        for form in forms:
            table.add_column(f"{form} ms", justify="right")
        table.add_column("kept")
        table.add_column(f"MACs, batch {self.input_shape[0]}" if self.input_shape else "MACs", justify="right")
        table.add_column("MACs ratio", justify="right")
        table.add_column("note", overflow="fold")
        if per_layer:
            for row in self.layers:
                cells = []
                for form in forms:
                    ms = row.times_ms.get(form)
                    text = _DASH if ms is None else f"{ms:.3f}"
                    cells.append(f"[bold]{text}[/bold]" if form == row.chosen and ms is not None else text)
                # every decomposed/<pooling> form has the MACs of the others ("decomposed/auto" was not timed itself)
                kind = (row.chosen or "").split("/")[0]
                macs = row.macs.get(row.chosen, next((m for f, m in row.macs.items() if f.split("/")[0] == kind), None))
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
        print_full_width(console, self.table(per_layer=per_layer))
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
            "compiled": self.compiled,
            "runtime": self.runtime,
            "runtime_detail": self.runtime_detail,
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
