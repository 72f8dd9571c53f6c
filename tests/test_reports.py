"""Output a person can read: the compression report at 80 columns and in logs, the conversion progress bar, and the
FLOPs in Lightning's model summary."""

from __future__ import annotations

import io
import itertools
from types import ModuleType

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_cheapconv.convert as convert
from lightning_cheapconv import ImageClassifier, count_complexity, decompose_structured
from lightning_cheapconv.convert import convert_to_ghost
from lightning_cheapconv.report import abbreviate_left, compression_report

pytestmark = pytest.mark.usefixtures("one_thread")


class Deep(nn.Module):
    """Long qualified names (``backbone.stages.0.blocks.1.conv``), as a LightningModule around a timm model has."""

    def __init__(self) -> None:
        super().__init__()
        stages = [nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(3)])]
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ModuleDict({"blocks": stages[0]}))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone[1]["blocks"](self.backbone[0](x)))


@pytest.fixture(scope="module")
def counts():
    model = Deep()
    before = count_complexity(model, (1, 3, 8, 8))
    decompose_structured(model, channel_ratio=0.5)
    return before, count_complexity(model, (1, 3, 8, 8))


NAMES = ["backbone.1.blocks.0.0", "backbone.1.blocks.1.0", "backbone.1.blocks.2.0"]


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("│")]


@pytest.mark.parametrize("width", [80, 60, 40])
def test_a_narrow_terminal_keeps_names_and_types_on_one_line(counts, width: int) -> None:
    console = Console(width=width, record=True, force_terminal=True, file=io.StringIO())
    compression_report(*counts, console=console, changed_only=True)
    text = console.export_text()
    rows = _rows(text)
    assert len(rows) == len(NAMES) + 1  # one line per layer, and the total
    assert all(len(line) <= width for line in text.splitlines())
    names = [line.split("│")[1].strip() for line in rows[:-1]]
    for shown, name in zip(names, NAMES, strict=True):
        assert shown == name or (shown.startswith("…") and name.endswith(shown[1:]))  # abbreviated from the left
    assert "Left out for the terminal's width: " in " ".join(text.split())
    if width == 80:
        assert names == NAMES and all("Conv2d → StructuredConv2d" in line for line in rows[:-1])


@pytest.mark.parametrize("console", ["file", "record"])
def test_logs_and_pipes_get_the_full_table(counts, console: str) -> None:
    buffer = io.StringIO()
    out = Console(file=buffer, width=80) if console == "file" else Console(width=80, record=True, file=buffer)
    assert not out.is_terminal
    compression_report(*counts, console=out, changed_only=True)
    text = buffer.getvalue() if console == "file" else out.export_text()
    rows = _rows(text)
    assert len(rows) == len(NAMES) + 1 and max(len(line) for line in rows) > 80  # wider than the console: no wrap
    for row, name in zip(rows, NAMES, strict=False):
        assert f"│ {name} " in row and "Conv2d → StructuredConv2d" in row
    assert all(h in text for h in ("params before", "MACs before", "adds after")) and "Left out" not in text


def test_a_wide_terminal_gets_every_column_and_more_rows_get_counted(counts) -> None:
    console = Console(width=200, record=True, force_terminal=True, file=io.StringIO())
    compression_report(*counts, console=console, changed_only=True, max_rows=1)
    text = console.export_text()
    assert "params before" in text and "Left out" not in text and "2 more layers" in text
    narrow = Console(width=40, record=True, force_terminal=True, file=io.StringIO())
    compression_report(*counts, console=narrow, changed_only=True, max_rows=1)
    assert "… 2 more" in narrow.export_text()


def test_abbreviate_left() -> None:
    assert abbreviate_left("backbone.layer1.0.conv1", 13) == "…yer1.0.conv1"
    assert abbreviate_left("fc", 13) == "fc"
    assert abbreviate_left("conv", 1) == "…"


# -- progress --------------------------------------------------------------------------------------------------------
def _model() -> nn.Sequential:
    return nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(5)])


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """A terminal on stderr, and a clock that moves 0.4 s each time the conversion reads it."""
    buffer = io.StringIO()
    monkeypatch.setattr(convert, "_progress_console", lambda: Console(file=buffer, force_terminal=True, width=100))
    ticks = itertools.count()
    monkeypatch.setattr(convert, "_clock", lambda: 0.4 * next(ticks))
    return buffer


def test_a_slow_conversion_shows_the_layer_it_converts(screen: io.StringIO) -> None:
    convert_to_ghost(_model())
    shown = screen.getvalue()
    assert "convert_to_ghost: 3" in shown and "convert_to_ghost: 1" not in shown  # after a second: from layer 3
    decompose_structured(_model())
    assert "decompose_structured: 3" in screen.getvalue()


def test_no_progress_bar_when_fast_off_inside_a_trainer_or_in_a_log(
    screen: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert_to_ghost(_model(), progress=False)
    attached = _model()
    attached._trainer = object()  # a LightningModule inside fit: Lightning's progress bar owns the screen
    convert_to_ghost(attached)
    assert screen.getvalue() == ""
    attached = _model()
    attached._trainer = object()
    convert_to_ghost(attached, progress=True)
    assert "convert_to_ghost: 3" in screen.getvalue()
    monkeypatch.setattr(convert, "_progress_console", lambda: Console(file=io.StringIO()))  # a log: no terminal
    convert_to_ghost(_model(), progress=True)
    monkeypatch.setattr(convert, "_clock", lambda: 0.0)
    monkeypatch.setattr(convert, "_progress_console", lambda: Console(file=screen, force_terminal=True))
    before = screen.getvalue()
    convert_to_ghost(_model())  # under a second
    assert screen.getvalue() == before


def test_progress_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="progress='yes' is not a bool"):
        convert_to_ghost(_model(), progress="yes")


# -- Lightning's model summary ---------------------------------------------------------------------------------------
def test_model_summary_counts_flops(pl_ns: ModuleType, tmp_path) -> None:
    seen: list[int] = []

    class Summary(pl_ns.callbacks.ModelSummary):
        @staticmethod
        def summarize(*args, total_flops: int = 0, **kwargs) -> None:
            seen.append(total_flops)

    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model = ImageClassifier(backbone, num_classes=2, scheduler="none", input_size=8)
    assert model.example_input_array.shape == (1, 3, 8, 8)
    data = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])), batch_size=2)
    trainer = pl_ns.Trainer(
        max_steps=1, callbacks=[Summary()], logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    trainer.fit(model, data)
    assert seen == [2 * (4 * 3 * 9 * 64 + 4 * 2)]  # FLOPs = 2 MACs: the conv at 8x8, the linear
    assert ImageClassifier("resnet20").example_input_array.shape == (1, 3, 32, 32)
    assert ImageClassifier("resnet18", input_size=(64, 48), in_channels=1).example_input_array.shape == (1, 1, 64, 48)
    assert getattr(ImageClassifier(backbone), "example_input_array", None) is None
    with pytest.raises(ValueError, match=r"input_size=\(0, 8\) is out of range"):
        ImageClassifier(backbone, input_size=(0, 8))
