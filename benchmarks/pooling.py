"""The structured sum-pool's operator forms, timed per runtime: the evidence for ``pooling="auto"``.

Run ``python -m benchmarks.pooling`` (``--quick`` for fewer repetitions, ``--compile`` to add
``torch.compile``, which compiles every form and takes minutes). CPU, 2 threads. For each layer shape,
a 3x3 ``StructuredConv2d`` (padding 1, hidden kernel 2, hidden channels ``C`` and ``C/2``) is built in
every form of :data:`~lightning_cheapconv.nn.structured.POOLINGS` but ``"auto"``, next to its dense
conv (``to_dense()``), and each is

- exported with ``torch.onnx.export(..., dynamo=True)`` and run in ONNX Runtime (CPUExecutionProvider,
  ``intra_op_num_threads`` = the thread count, all graph optimizations): ``ort``;
- run in PyTorch eager under ``inference_mode``: ``eager``; with ``--compile`` also
  ``torch.compile`` (inductor, default options): ``compiled``.

All candidates of one shape are timed in one process, interleaved round-robin per runtime
(:func:`~lightning_cheapconv.deploy.time_interleaved`), so a noisy machine slows them alike; each number
is the median. ONNX Runtime's idle threads do not spin (``session.intra_op.allow_spinning=0``): the
spinning threads of one session would slow the next candidate. Speed-up is dense / form in the same
runtime (2.00x = half the time). The node column counts the exported ONNX graph's operators; the error
column is the ONNX Runtime output's largest difference from the eager dense conv, relative to that
output's largest magnitude. ``"cumsum"`` is the same graph as ``"avg_pool"`` when there is no channel
window (``c = C``), so it is listed only with a channel window.

Shapes: the 3x3 layers of ResNet-18 at 224² (batch 8) and of the CIFAR ResNets' three stages (batch 32).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from lightning_cheapconv.deploy import time_interleaved
from lightning_cheapconv.nn import StructuredConv2d

from .common import Section, command

FORMS = ("adds", "avg_pool", "cumsum")


@dataclass(frozen=True)
class Shape:
    channels: int
    size: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.channels}ch {self.size}² b{self.batch}"


SHAPES = (
    Shape(64, 56, 8),
    Shape(128, 28, 8),
    Shape(256, 14, 8),
    Shape(512, 7, 8),
    Shape(16, 32, 32),
    Shape(32, 16, 32),
    Shape(64, 8, 32),
)


def build_forms(shape: Shape, hidden_channels: int) -> dict[str, nn.Module]:
    """``dense`` (the structured layer's ``to_dense()``), then the structured layer in each pooling form."""
    layer = StructuredConv2d(
        shape.channels, shape.channels, 3, padding=1, hidden_channels=hidden_channels, hidden_kernel_size=2
    ).eval()
    forms: dict[str, nn.Module] = {"dense": layer.to_dense().eval()}
    for form in FORMS:
        if form == "cumsum" and layer.windows[0] == 1:
            continue  # no channel window: the same graph as avg_pool
        variant = StructuredConv2d(**{**layer.config(), "pooling": form}).eval()
        _copy_parameters(variant, layer)  # not load_state_dict: the structure records differ in pooling
        forms[form] = variant
    return forms


def _copy_parameters(target: nn.Module, source: nn.Module) -> None:
    with torch.no_grad():
        for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
            mine.copy_(theirs)


def ort_session(module: nn.Module, x: torch.Tensor, threads: int):
    """``(session, node counts)``: ``module`` exported with the dynamo exporter and loaded in ONNX Runtime."""
    import onnxruntime as ort

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads spin by default, stealing the cores from whatever is timed next (another session, or
    # torch): off, so interleaved candidates do not slow each other. It costs multi-node graphs a little.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, Counter(node.op_type for node in proto.graph.node)


def _nodes(counts: Counter) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def run(shapes: tuple[Shape, ...], threads: int, reps: int, warmup: int, compiled: bool) -> list[dict]:
    rows = []
    for shape in shapes:
        for hidden, label in ((shape.channels, "C"), (shape.channels // 2, "C/2")):
            torch.manual_seed(0)
            forms = build_forms(shape, hidden)
            x = torch.randn(shape.batch, shape.channels, shape.size, shape.size)
            feed = x.numpy()
            with torch.inference_mode():
                reference = forms["dense"](x)
            candidates, nodes, errors = {}, {}, {}
            for name, module in forms.items():
                session, nodes[name] = ort_session(module, x, threads)
                input_name = session.get_inputs()[0].name
                out = torch.from_numpy(session.run(None, {input_name: feed})[0])
                errors[name] = ((out - reference).abs().max() / reference.abs().max()).item()
                candidates[("ort", name)] = lambda s=session, n=input_name, f=feed: s.run(None, {n: f})
                candidates[("eager", name)] = lambda m=module, x=x: m(x)
                if compiled:
                    with torch.no_grad():
                        fast = torch.compile(module)
                        fast(x)
                    candidates[("compiled", name)] = lambda m=fast, x=x: m(x)
            keys = list(candidates)
            timings = {}
            for runtime in dict.fromkeys(r for r, _ in keys):  # interleaved within each runtime
                group = {f"{r}/{n}": candidates[(r, n)] for r, n in keys if r == runtime}
                timings.update(time_interleaved(group, repeats=reps, min_time=0.02, warmup=warmup))
            for runtime, name in keys:
                ms = timings[f"{runtime}/{name}"].median_ms
                rows.append(
                    {
                        "shape": shape.name,
                        "hidden": label,
                        "runtime": runtime,
                        "form": name,
                        "ms": ms,
                        "spread": timings[f"{runtime}/{name}"].spread,
                        "speedup": timings[f"{runtime}/dense"].median_ms / ms,
                        "nodes": _nodes(nodes[name]),
                        "error": errors[name],
                    }
                )
            print(
                f"{shape.name} c={label}: "
                + ", ".join(f"{r}/{n} {timings[f'{r}/{n}'].median_ms:.2f} ms" for r, n in keys)
            )
    return rows


def fastest(rows: list[dict]) -> dict[tuple[str, str, str], str]:
    """(shape, hidden, runtime) -> the fastest pooling form there (dense excluded)."""
    best: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["shape"], r["hidden"], r["runtime"])
        if r["form"] != "dense" and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    return {key: r["form"] for key, r in best.items()}


# What pooling="auto" runs in each runtime (StructuredConv2d.active_pooling): the rule this script checks.
AUTO = {"eager": "adds", "ort": "cumsum", "compiled": "adds"}


def _auto_form(runtime: str, hidden: str, channels_window: bool) -> str:
    form = AUTO[runtime]
    return "avg_pool" if form == "cumsum" and not channels_window else form


def markdown(rows: list[dict]) -> str:
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    lines = [
        "| shape | c | form | "
        + " | ".join(f"{rt} ms | {rt} speed-up" for rt in runtimes)
        + " | ONNX nodes | ORT error |",
        "|---|---|---|" + "---:|---:|" * len(runtimes) + "---|---:|",
    ]
    by_key: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["hidden"], r["form"]), {})[r["runtime"]] = r
    best = fastest(rows)
    for (shape, hidden, form), per in by_key.items():
        cells = []
        for rt in runtimes:
            r = per[rt]
            mark = "**" if best.get((shape, hidden, rt)) == form else ""
            cells.append(f"{r['ms']:.2f} | {mark}{r['speedup']:.2f}x{mark}")
        first = next(iter(per.values()))
        lines.append(
            f"| {shape} | {hidden} | {form} | " + " | ".join(cells) + f" | {first['nodes']} | {first['error']:.1e} |"
        )
    return "\n".join(lines)


def rule_check(rows: list[dict]) -> tuple[str, list[str]]:
    """Per runtime: on how many shapes ``auto``'s form is the fastest form, and how far from it where not."""
    ms = {(r["shape"], r["hidden"], r["runtime"], r["form"]): r["ms"] for r in rows}
    best = fastest(rows)
    lines, slower = [], []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        hits, total = 0, 0
        for (shape, hidden, rt), form in best.items():
            if rt != runtime:
                continue
            channel_window = (shape, hidden, rt, "cumsum") in ms
            auto = _auto_form(runtime, hidden, channel_window)
            total += 1
            hits += auto == form
            ratio = ms[(shape, hidden, rt, auto)] / ms[(shape, hidden, rt, form)]
            if ratio > 1.1:
                slower.append(f"{runtime}: {shape} c={hidden}: auto ({auto}) {ratio:.2f}x the time of {form}")
        spreads = sorted(r["spread"] for r in rows if r["runtime"] == runtime)
        lines.append(
            f"- {runtime}: auto runs `{AUTO[runtime]}`; the fastest form on {hits} of {total} shapes (noise: median "
            f"IQR/median of the samples {spreads[len(spreads) // 2]:.0%}, largest {spreads[-1]:.0%})"
        )
    return "\n".join(lines), slower


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes (a smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow: compiles every form)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and ONNX Runtime (default 2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    reps, warmup = (3, 1) if args.quick else (9, 2)
    shapes = SHAPES[1::3] if args.quick else SHAPES
    rows = run(shapes, args.threads, reps, warmup, args.compile)
    check, slower = rule_check(rows)
    body = (
        f"CPU, {args.threads} threads, float32, NCHW; 3x3 conv, padding 1, hidden kernel 2, hidden channels c = C "
        f"or C/2. Median of {reps} round-robin samples after {warmup} warm-up rounds, the forms of a shape "
        "interleaved per runtime in one process; ONNX Runtime without thread spinning. Speed-up: dense (the same "
        "layer's `to_dense()`) / form, in the same runtime; **bold**: the fastest pooling form there. ONNX nodes: "
        "the `torch.onnx.export(dynamo=True)` graph. ORT error: max |ORT output - eager dense output| / "
        "max |eager dense output|.\n\n"
        + markdown(rows)
        + '\n\nWhat `pooling="auto"` runs (`StructuredConv2d.active_pooling`): `adds` in eager and under '
        "`torch.compile`, `cumsum` (= `avg_pool` without a channel window) when traced, scripted or exported:\n\n"
        + check
        + "".join(f"\n- slower than the fastest form by more than 10%: {s}" for s in slower)
    )
    section = Section(
        "pooling", "2d. Structured sum-pool: operator forms per runtime", body, command(__spec__.name, argv)
    )
    section.save()
    return section


if __name__ == "__main__":
    main()
