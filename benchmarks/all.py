"""Regenerate every table of BENCHMARKS.md: ``python -m benchmarks.all`` (or ``make bench``).

Each benchmark writes its section to ``benchmarks/results/NAME.md`` (with the exact command and
the machine); this script runs them in order and assembles BENCHMARKS.md, listing at the top
every target that a table shows as missed. ``--only counts accuracy`` reruns some sections;
``--assemble`` only rebuilds BENCHMARKS.md from the saved sections; ``--quick`` passes ``--quick``
to each (smoke runs, not for publishing).
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

from .common import RESULTS, machine

# Section name -> (module, arguments), in the order of BENCHMARKS.md.
RUNS = {
    "counts": ("counts", []),
    "runtimes": ("runtimes", ["--runtimes", "onnxruntime", "eager"]),
    "ops": ("ops", []),
    "ops_channels_last": ("ops", ["--channels-last"]),
    "latency_compiled": ("latency", ["--compile", "--repeats", "15"]),
    "pooling": ("pooling", []),
    "folding": ("folding", []),
    "accuracy": ("accuracy", []),
    "budgets": ("budgets", []),
    "overhead": ("overhead", []),
    "memory": ("memory", []),
    "budget": ("budget", []),
    "latency_budget": ("latency_budget", []),
    "sensitivity": ("sensitivity", []),
}
OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = """\
# Benchmarks

Regenerate everything with `make bench` (`python -m benchmarks.all`); each section names the
command and the machine that produced it. Ratios are original / compressed (2.0x = half) or
original time / new time (above 1.0x = faster), measured in one process. Timings come from a
shared machine: treat differences under about 10-20% as noise (each table says how it was timed).
The latency scripts add CUDA tables (fp32, and bf16 channels_last) when run where a GPU is visible;
the tables below say which devices they cover.
"""


def assemble() -> str:
    sections = [RESULTS / f"{name}.md" for name in RUNS if (RESULTS / f"{name}.md").exists()]
    texts = [path.read_text() for path in sections]
    missed = [m for text in texts for m in re.findall(r"<!-- missed: (.*?) -->", text)]
    bodies = [re.sub(r"<!-- missed: .*? -->\n", "", text) for text in texts]
    summary = "## Targets missed\n\n" + (
        "\n".join(f"- {m}" for m in missed) if missed else "None of the measured targets was missed."
    )
    document = "\n".join([HEADER, summary + "\n", *bodies])
    OUTPUT.write_text(document)
    return document


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--assemble", action="store_true", help="only rebuild BENCHMARKS.md from saved sections")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not args.assemble:
        print(f"machine: {machine()}")
        for name in args.only:
            module, arguments = RUNS[name]
            importlib.import_module(f"benchmarks.{module}").main(arguments + (["--quick"] if args.quick else []))
    assemble()
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
