"""MIB's CPR and CMD on the shipped models: the ranking of exact edge scores against ACDC's circuits, side by side.

    OMP_NUM_THREADS=1 PAHQ_FX_TRACE_CACHE=off python benchmarks/mib_curves.py

For each shipped model with its task (seed 0, the prompts of the other benchmarks: 32, and 48 of 64 tokens for
``gpt2-induction-8h``), in this one process, FP32 (one thread with ``OMP_NUM_THREADS=1``; the JSON records the count):

- exact edge scores (``pahq_fx.edge_scores``) -> MIB's signed and absolute curves (``pahq_fx.mib_evaluate``) ->
  CPR (signed) and CMD (absolute);
- an ACDC sweep (``pahq_fx.sweep``) -> the step curve of its circuits (``Sweep.mib``) -> CPR and CMD, and the same
  from every other threshold alone (8 of the default 15, log-spaced over the same range): a step curve is only as
  fine as the sweep, and the two say how much ACDC's figures owe to the number of thresholds.

The sweep's thresholds follow one rule, read off each model's own effects: ``--thresholds`` values log-spaced from
the change of the metric when every edge is patched, ``m(empty) - m(full)`` (a removal rarely moves the metric
further, so ACDC keeps next to nothing there), down to ``--floor`` (1e-9, under the FP32 round-off of the metric,
where ACDC keeps most edges: on these trained models most edges change the metric by round-off only). The largest
exact edge score would be too low a top: in ``gpt2-induction`` no single edge moves the metric by a thousandth
of what patching every edge does (its paths are redundant), and ACDC keeps a tenth of the graph at that threshold.
Timings: exact scores are ``edge_scores``' wall time plus ``mib_evaluate``'s (each traces and builds its caches);
ACDC is the whole sweep (one setup, a search and an FP32 evaluation per threshold). Writes JSON next to the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import tables
from benchmarks.acdc import load_model, measured_with

# (model, task, prompts, induction's repeated half): the cases of benchmarks/acdc.py's tables.
CASES = (
    ("llama-ioi", "ioi", 32, 0),
    ("gpt2-induction", "induction", 32, 0),
    ("gpt2-induction-8h", "induction", 48, 32),
    ("gpt2-greater-than", "greater_than", 32, 0),
)


def thresholds(top: float, floor: float, count: int) -> list[float]:
    """``count`` thresholds log-spaced from ``floor`` up to ``top`` (the rule in this module's docstring)."""
    if top <= floor:
        sys.exit(f"patching every edge moves the metric by {top:g}, not above the floor {floor:g}: no range to sweep")
    step = (math.log(top) - math.log(floor)) / (count - 1)
    return [math.exp(math.log(floor) + i * step) for i in range(count)]


def run_case(model_name: str, task_name: str, n: int, half: int, args: argparse.Namespace) -> dict:
    import torch

    import pahq_fx
    from pahq_fx.acdc.mib import acdc_curve
    from pahq_fx.tasks import make_task

    torch.manual_seed(0)
    model, tokenizer = load_model(model_name)
    task = make_task(task_name, tokenizer, n=n, seed=0, **({"half": half} if half else {}))
    scores = pahq_fx.edge_scores(model, task, metric=args.metric, progress=False)
    begin = time.perf_counter()
    exact, _ = pahq_fx.mib_evaluate(model, task, scores, progress=False)
    curve_s = time.perf_counter() - begin
    largest = max(e.score for e in scores.scores)
    values = thresholds(exact.empty_circuit - exact.full_model, args.floor, args.thresholds)
    begin = time.perf_counter()
    swept = pahq_fx.sweep(model, task, values, metric=args.metric, precision="fp32", compile=False, progress=False)
    sweep_s = time.perf_counter() - begin
    every_other = acdc_curve([(len(p.circuit.edges), p.faithfulness) for p in swept.points[::2]], exact.total_edges)
    return {
        "model": model_name,
        "task": task_name,
        "n": n,
        "half": half,
        "task_shape": list(task.clean_input_ids.shape),
        "total_edges": exact.total_edges,
        "largest_score": largest,
        "exact": {**exact.to_json(), "scores_s": scores.stats.wall_s, "scores_stats": asdict(scores.stats), "curve_s": curve_s},
        "acdc": {**swept.to_json(), "thresholds": values, "sweep_s": sweep_s, "every_other": every_other.to_json()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(c[0] for c in CASES), help="a comma-separated subset of the cases")
    parser.add_argument("--metric", default="kl", help="the metric of the scores, the sweep and the curves")
    parser.add_argument("--thresholds", type=int, default=15, help="how many thresholds the sweep takes")
    parser.add_argument("--floor", type=float, default=1e-9, help="the sweep's smallest threshold")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mib_curves.json"))
    args = parser.parse_args()
    if args.thresholds < 3:
        sys.exit("--thresholds: at least 3")
    wanted = args.models.split(",")
    unknown = sorted(set(wanted) - {c[0] for c in CASES})
    if unknown:
        sys.exit(f"unknown models {unknown}; the cases are {', '.join(c[0] for c in CASES)}")

    import torch

    results = []
    for case in CASES:
        if case[0] in wanted:
            results.append(run_case(*case, args))
            r = results[-1]
            print(f"{case[0]}: exact CPR {r['exact']['cpr']:.4f}, ACDC CPR {r['acdc']['mib']['cpr']:.4f}", file=sys.stderr)
    arguments = {k: v for k, v in vars(args).items() if k != "out"}
    Path(args.out).write_text(
        json.dumps(
            {"arguments": arguments, "threads": torch.get_num_threads(), "environment": measured_with(), "results": results},
            indent=2,
        )
        + "\n"
    )
    print(tables.mib_curves([args.out], ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
