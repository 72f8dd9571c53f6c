"""A rich table comparing two :class:`~lightning_cheapconv.complexity.Complexity` counts layer by layer."""

from __future__ import annotations

import math

import rich
from rich.console import Console
from rich.table import Table

from .complexity import Complexity, LayerComplexity, _ratio, compression_ratios, format_count

__all__ = ["compression_report", "format_count"]

_DASH = "—"
CONVENTION = "ratio = original / compressed (2.00× = half)"


_LOG_WIDTH = 150


def _format_ratio(ratio: float) -> str:
    if math.isnan(ratio):
        return _DASH
    return "∞" if math.isinf(ratio) else f"{ratio:.2f}×"


def _row_ratio(before: LayerComplexity | None, after: LayerComplexity | None, attr: str) -> str:
    if before is None or after is None:
        return _DASH
    return _format_ratio(_ratio(getattr(before, attr), getattr(after, attr)))


def _count(row: LayerComplexity | None, attr: str) -> str:
    return _DASH if row is None else format_count(getattr(row, attr))


def _merged_names(before: list[str], after: list[str]) -> list[str]:
    """Names of both sides: ``before``'s order, with each name only ``after`` has placed after the row
    that precedes it in ``after``, or after the layer it replaced (``conv1`` for ``conv1.0``)."""
    merged = list(before)
    present = set(merged)
    position = -1
    for name in after:
        if name in present:
            position = merged.index(name)
        else:
            parts = name.split(".")
            for depth in range(len(parts) - 1, 0, -1):
                anchor = ".".join(parts[:depth])
                if anchor in present:
                    position = max(position, merged.index(anchor))
                    break
            position += 1
            merged.insert(position, name)
            present.add(name)
    return merged


def _shape(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else "×".join(str(d) for d in shape)


def compression_report(
    before: Complexity,
    after: Complexity,
    title: str = "Compression report",
    console: Console | None = None,
    per_layer: bool = True,
    max_rows: int | None = None,
    print_table: bool = True,
    changed_only: bool = False,
) -> Table:
    """Build (and by default print) a table of parameters, MACs and ratios per layer and in total.

    Rows are matched by layer name; a layer whose type changed shows ``Conv2d → GhostConv2d``,
    and a layer present on one side only shows ``—`` on the other. The ratio columns are
    original / compressed (2.00× = half), as the caption says. ``max_rows`` keeps the first
    layers only (a final row says how many were left out); ``per_layer=False`` shows the total
    alone; ``changed_only=True`` lists only the layers that differ (the totals still cover all).
    Prints through ``console`` (default :func:`rich.get_console`) if ``print_table``.

    Example::

        >>> before = count_complexity(model, (1, 3, 32, 32))
        >>> after = count_complexity(ghost_model, (1, 3, 32, 32))
        >>> table = compression_report(before, after, title="Ghost-ResNet-56, s=2")
    """
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"compression_report: max_rows must be >= 0 or None, got {max_rows}")
    caption = (
        f"{CONVENTION}. MACs = FLOPs / 2 from FlopCounterMode (bias and BatchNorm not counted); "
        f"sum-pool additions of structured layers are counted apart (adds). Input {_shape(before.input_shape)}"
    )
    if before.input_shape != after.input_shape:
        caption += f" before, {_shape(after.input_shape)} after"
    ratios = compression_ratios(before, after)
    if before.adds or after.adds:
        caption += f"; (MACs + adds) ratio {_format_ratio(ratios['ops_ratio'])}"
    table = Table(title=title, caption=caption + ".", caption_justify="left", show_footer=False)
    table.add_column("layer", overflow="fold")
    table.add_column("type", overflow="fold")
    for header in ("params before", "params after", "MACs before", "MACs after", "adds after"):
        table.add_column(header, justify="right")
    table.add_column("params ratio", justify="right")
    table.add_column("MACs ratio", justify="right")

    if per_layer:
        old, new = before.by_name(), after.by_name()
        names = _merged_names([r.name for r in before.rows], [r.name for r in after.rows])
        if changed_only:
            names = [n for n in names if old.get(n) != new.get(n)]
        shown = names if max_rows is None else names[:max_rows]
        for name in shown:
            b, a = old.get(name), new.get(name)
            if b is not None and a is not None and b.type != a.type:
                kind = f"{b.type} → {a.type}"
            else:
                kind = (b or a).type  # type: ignore[union-attr]
            changed = b is None or a is None or b != a
            table.add_row(
                name or "(model)",
                kind,
                _count(b, "params"),
                _count(a, "params"),
                _count(b, "macs"),
                _count(a, "macs"),
                _count(a, "adds"),
                _row_ratio(b, a, "params"),
                _row_ratio(b, a, "macs"),
                style=None if changed else "dim",
            )
        if len(shown) < len(names):
            table.add_row(f"… {len(names) - len(shown)} more layers", *[""] * 8, style="dim")
        table.add_section()

    table.add_row(
        "total",
        "",
        format_count(before.params),
        format_count(after.params),
        format_count(before.macs),
        format_count(after.macs),
        format_count(after.adds),
        _format_ratio(ratios["params_ratio"]),
        _format_ratio(ratios["macs_ratio"]),
        style="bold",
    )
    if print_table:
        console = console or rich.get_console()
        if not console.is_terminal and console.width < _LOG_WIDTH:
            # Logs and pipes get rich's 80 columns, which wraps qualified layer names into unreadable cells.
            console = Console(file=console.file, width=_LOG_WIDTH)
        console.print(table)
    return table
