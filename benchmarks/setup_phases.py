"""Where a first discovery's setup goes: each phase of ``discover``'s setup, timed in fresh processes.

    python benchmarks/setup_phases.py --model gpt2-induction-8h --task induction --half 32 --n 48 --threshold 0.01

The trace cache is off (every trace cold), as on a first run. Each repeat is a fresh process that runs
``pahq_fx.discover`` with the defaults once, with timers wrapped around the functions the setup calls: the trace at
a fixed shape (``make_fx``), and where the trace falls back to ``torch.export`` the modules export needs (its first
call imports them; timed on their own here), the export itself and ``ExportedProgram.module()``; the rest of the
trace (the causal-mask check, the batch generalisation and its check against the model), the three passes, and the
patching runtime (its clean and corrupted runs). The search is ``discover``'s own wall time minus its setup. Prints the
medians as a table, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from acdc import add_model_arguments, load_model_and_task, measured_with, results_path  # shared by the benchmarks

PHASES = (
    "fixed-shape trace",
    "export imports",
    "export",
    "program.module()",
    "rest of the trace",
    "fuse_activations",
    "split_heads",
    "lower_precision",
    "runtime (clean and corrupted runs)",
    "setup (discover's)",
    "search (discover's)",
)


def _timed(owner: object, name: str, phase: str, seconds: dict[str, float]) -> None:
    """Replace ``owner.name`` by a wrapper that adds its calls' seconds to ``seconds[phase]``."""
    function = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def run_one(args: argparse.Namespace) -> dict[str, float]:
    """One discovery in this process; the seconds of each phase."""
    import torch

    import pahq_fx
    from pahq_fx.acdc import setup
    from pahq_fx.passes import pipeline

    trace_module = importlib.import_module("pahq_fx.passes.trace")  # the name pahq_fx.passes.trace is the function

    model, task = load_model_and_task(args)
    seconds: dict[str, float] = {}
    export = torch.export.export

    def importing_export(*export_args, **export_kwargs):
        start = time.perf_counter()
        import torch.export._trace  # noqa: F401 - what export's first call imports

        seconds["export imports"] = seconds.get("export imports", 0.0) + time.perf_counter() - start
        return export(*export_args, **export_kwargs)

    torch.export.export = importing_export
    _timed(torch.export, "export", "export", seconds)  # the imports are outside this timer: they run first, inside
    _timed(torch.export.ExportedProgram, "module", "program.module()", seconds)
    _timed(trace_module, "_fixed_shape_graph", "fixed-shape trace", seconds)
    _timed(setup, "trace", "trace", seconds)
    for name in ("fuse_activations", "split_heads", "lower_precision"):
        _timed(pipeline, name, name, seconds)
    _timed(setup, "PatchingRuntime", "runtime (clean and corrupted runs)", seconds)
    circuit = pahq_fx.discover(model, task, threshold=args.threshold, progress=False, allow_weak_task=True)
    if "export" in seconds:
        seconds["export"] -= seconds.get("export imports", 0.0)
    traced = seconds.pop("trace")
    seconds["rest of the trace"] = traced - sum(seconds.get(p, 0.0) for p in PHASES[:4])
    seconds["setup (discover's)"] = circuit.stats.setup_s
    seconds["search (discover's)"] = circuit.stats.wall_s - circuit.stats.setup_s
    seconds["forward"] = circuit.stats.forward_s
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="gpt2-induction-8h", n=48)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = results_path(args, "setup_phases")
    if args.one:
        print(json.dumps(run_one(args)))
        return
    environment = {**os.environ, "PAHQ_FX_TRACE_CACHE": "off"}
    command = [
        sys.executable,
        __file__,
        "--one",
        "--model",
        args.model,
        "--task",
        args.task,
        "--half",
        str(args.half),
        "--n",
        str(args.n),
        "--threshold",
        str(args.threshold),
    ]
    runs = []
    for repeat in range(args.repeats):
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            sys.exit(f"repeat {repeat + 1} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {phase: statistics.median(r.get(phase, 0.0) for r in runs) for phase in (*PHASES, "forward")}
    setup_s = medians["setup (discover's)"]
    print(
        f"model {args.model}, task {args.task}, n={args.n}, threshold {args.threshold}; trace cache off; medians of "
        f"{args.repeats} fresh processes; one eager forward {medians['forward'] * 1000:.1f} ms"
    )
    print("| phase | seconds | share of setup |\n| --- | --- | --- |")
    for phase in PHASES:
        share = f"{medians[phase] / setup_s:.0%}" if phase != "search (discover's)" else "-"
        print(f"| {phase} | {medians[phase]:.3f} | {share} |")
    measured = {**measured_with(), "PAHQ_FX_TRACE_CACHE": "off"}  # what every run here sets
    Path(args.out).write_text(
        json.dumps(
            {
                "arguments": {k: v for k, v in vars(args).items() if k != "one"},
                "environment": measured,
                "medians": medians,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
