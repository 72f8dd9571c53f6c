"""A rich table comparing two :class:`~lightning_cheapconv.complexity.Complexity` counts layer by layer."""

from __future__ import annotations

import io
import math

import rich
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .complexity import Complexity, LayerComplexity, _ratio, compression_ratios, format_count

__all__ = ["compression_report", "format_count", "abbreviate_left"]

_DASH = "—"
CONVENTION = "ratio = original / compressed (2.00× = half)"


_UNLIMITED = 10_000  # columns a log line may take


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


_COLUMNS = (
    "layer",
    "type",
    "params before",
    "params after",
    "MACs before",
    "MACs after",
    "adds after",
    "params ratio",
    "MACs ratio",
)
# Left out in this order when a terminal is too narrow for the layer names (the ratios and MACs after stay longest).
_DROP_ORDER = ("adds after", "params before", "MACs before", "params after", "params ratio", "MACs after")
_NAME_MIN = 16  # characters of a layer name kept before columns are left out
_ELLIPSIS = "…"


def abbreviate_left(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters from the left, marked by ``…`` (``…yer1.0.conv1``): the end of a
    qualified layer name is what tells layers apart.

    Example::

        >>> abbreviate_left("backbone.layer1.0.conv1", 13)
        '…yer1.0.conv1'
    """
    if len(text) <= width:
        return text
    return _ELLIPSIS + text[len(text) - width + 1 :] if width > 1 else _ELLIPSIS[:width]


def _cell_width(header: str, cells: list[str]) -> int:
    """The narrowest a column gets without wrapping a number: its longest header word or cell."""
    return max([len(word) for word in header.split()] + [len(cell) for cell in cells])


def _fit(rows: list[list[str]], width: int | None) -> tuple[list[str], int | None, int | None]:
    """The columns to show in ``width`` characters (``None``: all), and the widths of the layer and type columns
    (``None``: their full width). Layer names and types stay on one line: columns are left out (``_DROP_ORDER``)
    until a name gets ``_NAME_MIN`` characters or its full length, then names (and, on very narrow terminals,
    types) are abbreviated from the left."""
    columns = list(_COLUMNS)
    if width is None:
        return columns, None, None
    widths = {h: _cell_width(h, [row[i] for row in rows]) for i, h in enumerate(_COLUMNS)}
    names, types = widths["layer"], widths["type"]

    def room_for_names(kept: list[str]) -> int:  # box: 3 characters per column (padding, border) and 1
        return width - 1 - 3 * len(kept) - sum(widths[c] for c in kept if c != "layer")

    for column in (None, *_DROP_ORDER):
        if column is not None:
            columns.remove(column)
        if room_for_names(columns) >= min(names, _NAME_MIN):
            return columns, min(names, room_for_names(columns)), types
    room = room_for_names(columns) + types  # names and types share what is left
    name_width = max(min(names, _NAME_MIN), room - types) if room - types >= 8 else max(room // 2, 4)
    return columns, name_width, max(room - name_width, 4)


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

    Layer names and types stay on one line. On a terminal narrower than the table, columns are
    left out (adds, then the "before" counts; the caption names them) and long names are abbreviated
    from the left (``…yer1.0.conv1``); logs and pipes (a console that is no terminal) get the full
    table, however wide. The returned table is the one printed (the full one when not printed).

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

    rows: list[tuple[list[str], str | None]] = []  # cells, style
    left_out = 0
    if per_layer:
        old, new = before.by_name(), after.by_name()
        names = _merged_names([r.name for r in before.rows], [r.name for r in after.rows])
        if changed_only:
            names = [n for n in names if old.get(n) != new.get(n)]
        shown = names if max_rows is None else names[:max_rows]
        left_out = len(names) - len(shown)
        for name in shown:
            b, a = old.get(name), new.get(name)
            if b is not None and a is not None and b.type != a.type:
                kind = f"{b.type} → {a.type}"
            else:
                kind = (b or a).type  # type: ignore[union-attr]
            changed = b is None or a is None or b != a
            cells = [
                name or "(model)",
                kind,
                _count(b, "params"),
                _count(a, "params"),
                _count(b, "macs"),
                _count(a, "macs"),
                _count(a, "adds"),
                _row_ratio(b, a, "params"),
                _row_ratio(b, a, "macs"),
            ]
            rows.append((cells, None if changed else "dim"))
    total = [
        "total",
        "",
        format_count(before.params),
        format_count(after.params),
        format_count(before.macs),
        format_count(after.macs),
        format_count(after.adds),
        _format_ratio(ratios["params_ratio"]),
        _format_ratio(ratios["macs_ratio"]),
    ]

    console = console or rich.get_console() if print_table else console
    terminal_width = console.width if console is not None and console.is_terminal else None
    columns, name_width, type_width = _fit([cells for cells, _ in rows] + [total], terminal_width)
    dropped = [c for c in _COLUMNS if c not in columns]
    if dropped:
        caption += f". Left out for the terminal's width: {', '.join(dropped)}"
    table = Table(title=title, caption=caption + ".", caption_justify="left", show_footer=False)
    for header in columns:
        if header == "layer":
            table.add_column(header, no_wrap=True, width=name_width, overflow="ellipsis")
        elif header == "type":
            table.add_column(header, no_wrap=True, width=type_width, overflow="ellipsis")
        else:
            table.add_column(header, justify="right")
    keep = [_COLUMNS.index(c) for c in columns]

    def add(cells: list[str], style: str | None) -> None:
        if name_width is not None:
            cells = [abbreviate_left(cells[0], name_width), *cells[1:]]
        if type_width is not None:
            cells = [cells[0], abbreviate_left(cells[1], type_width), *cells[2:]]
        table.add_row(*(cells[i] for i in keep), style=style)

    if per_layer:
        for cells, style in rows:
            add(cells, style)
        if left_out:
            more = f"{_ELLIPSIS} {left_out} more layers"
            if name_width is not None and len(more) > name_width:
                more = f"{_ELLIPSIS} {left_out} more"
            table.add_row(more, *[""] * (len(columns) - 1), style="dim")
        table.add_section()
    add(total, "bold")
    if print_table:
        assert console is not None
        print_full_width(console, table)
    return table


def plain_text(table: Table) -> str:
    """``table`` as plain text at its full width, never wrapped or cut (for ``str()``, logs and files)."""
    width = Console(file=io.StringIO(), width=_UNLIMITED).measure(table).maximum
    buffer = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    buffer.print(table)
    return buffer.file.getvalue().rstrip()


def print_full_width(console: Console, table: Table) -> None:
    """On a terminal as it is (fitted to its width); elsewhere at the table's full width, never wrapped."""
    full = console.measure(table, options=console.options.update(width=_UNLIMITED)).maximum
    if console.is_terminal or full <= console.width:
        console.print(table)
        return
    console.print(Text(plain_text(table)), soft_wrap=True)
