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
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def randomize_bn(model: nn.Module) -> nn.Module:
    """Seeded non-trivial BatchNorm statistics and affine parameters (folding has work to do; timing does not
    depend on them); the model in eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


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
