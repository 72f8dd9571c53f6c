"""Shared by the benchmark scripts: machine description, result sections, and where they are written."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model, threads, GPU (if any) and library versions, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    libs = ", ".join(f"{name} {version(name)}" for name in ("torch", "torchvision", "pytorch-lightning"))
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}; {gpu}; "
        f"Python {platform.python_version()}, {libs}"
    )


def command(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces a benchmark module's run with ``argv`` (``None``: this process's)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def measured_on(name: str) -> str:
    """The machine line of the saved section ``name``: where results re-rendered from saved data were measured."""
    text = (RESULTS / f"{name}.md").read_text()
    match = re.search(r"^`[^`\n]*` on (.+)$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{RESULTS / f'{name}.md'} has no machine line")
    return match.group(1)


@dataclass
class Section:
    """One table of BENCHMARKS.md: its text, the command and machine that produced it, and missed targets."""

    name: str
    title: str
    body: str
    command: str
    missed: list[str] = field(default_factory=list)
    machine: str = field(default_factory=machine)

    def markdown(self) -> str:
        return f"## {self.title}\n\n`{self.command}` on {self.machine}\n\n{self.body.strip()}\n"

    def save(self) -> Path:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}.md"
        missed = "".join(f"<!-- missed: {m} -->\n" for m in self.missed)
        path.write_text(missed + self.markdown())
        print(self.markdown())
        return path


def percent(ours: float, reference: float) -> str:
    return f"{100 * (ours - reference) / reference:+.1f}%"
