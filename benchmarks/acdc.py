"""End-to-end ACDC: fp32, fp8, bf16 and a naive baseline, side by side, each in a fresh process.

    python benchmarks/acdc.py --model gpt2-induction --task induction --threshold 0.05 --repeats 2

The naive baseline is the simple reference implementation of the tests (tests/acdc_reference.py): a full
forward pass per edge query, receiver inputs rebuilt sender by sender, no caching, no compile. Configurations
run interleaved (round-robin over repeats); the table shows medians and ratios from this one run. Peak memory
is the resident set size of each configuration's own process. Writes JSON next to the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("fp32", "fp8", "bf16", "naive")


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process; prints and returns its measurements."""
    import torch

    import pahq_fx
    from pahq_fx import zoo
    from pahq_fx.tasks import make_task

    torch.manual_seed(0)
    model, tokenizer = zoo.load(args.model)
    task = make_task(args.task, tokenizer, n=args.n, seed=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    task = pahq_fx.Task(*(t.to(device) if t is not None else None for t in (task.clean_input_ids, task.corrupted_input_ids,
                          task.metric_mask, task.correct_ids, task.incorrect_ids)), name=task.name)
    start = time.perf_counter()
    if args.one == "naive":
        sys.path.insert(0, str(ROOT))
        from tests.acdc_reference import ReferenceACDC

        reference = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask)
        setup = time.perf_counter() - start
        counted = {"n": 0}
        kl = reference.kl

        def counting_kl(removed):
            counted["n"] += 1
            return kl(removed)

        reference.kl = counting_kl
        edges, _ = reference.run(args.threshold)
        result = {"edges": sorted(map(list, edges)), "queries": counted["n"], "compilations": 0, "setup_s": setup}
    else:
        circuit = pahq_fx.discover(model, task, threshold=args.threshold, precision=args.one, progress=False,
                                   compile=not args.no_compile)
        result = {"edges": sorted([e.sender, e.receiver] for e in circuit.edges), "queries": circuit.stats.queries,
                  "compilations": circuit.stats.compilations, "setup_s": circuit.stats.setup_s}
    wall = time.perf_counter() - start
    from pahq_fx.acdc import Circuit, CircuitEdge, RunStats

    as_circuit = Circuit(tuple(CircuitEdge(s, r, 0.0) for s, r in result["edges"]), args.threshold, "kl", args.one,
                         False, {}, {}, RunStats(wall, result["queries"], 0, 0, 0), 0)  # only for evaluate()
    faithfulness = as_circuit.evaluate(model, task)
    peak = (torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    search = wall - result["setup_s"]
    result.update(config=args.one, device=device, wall_s=wall, search_s=search, queries_per_second=result["queries"] / search,
                  peak_memory_mb=peak, circuit_kl=faithfulness.circuit)
    print(json.dumps(result))
    return result


def table(rows: list[dict]) -> str:
    by = {r["config"]: r for r in rows}
    fp32 = by.get("fp32", rows[0])
    naive = by.get("naive")
    fp32_edges = {tuple(e) for e in fp32["edges"]}
    head = ("| config | wall s | setup s | search s | queries | queries/s | peak MB | compilations | edges "
            "| Jaccard vs fp32 | circuit KL | wall / fp32 | search speed-up vs naive | wall speed-up vs naive |")
    lines = [head, "|" + " --- |" * 14]
    for name in CONFIGS:
        if name not in by:
            continue
        r = by[name]
        edges = {tuple(e) for e in r["edges"]}
        jaccard = len(edges & fp32_edges) / len(edges | fp32_edges) if edges | fp32_edges else 1.0
        vs_naive = (f"{naive['search_s'] / r['search_s']:.1f}x | {naive['wall_s'] / r['wall_s']:.1f}x" if naive
                    else "- | -")
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {r['setup_s']:.2f} | {r['search_s']:.2f} | {r['queries']} "
            f"| {r['queries_per_second']:.1f} | {r['peak_memory_mb']:.0f} | {r['compilations']} | {len(edges)} "
            f"| {jaccard:.3f} | {r['circuit_kl']:.4f} | {r['wall_s'] / fp32['wall_s']:.2f} | {vs_naive} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-induction")
    parser.add_argument("--task", default="induction")
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "acdc.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    configs = args.configs.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            command = [sys.executable, __file__, "--one", config, "--model", args.model, "--task", args.task,
                       "--threshold", str(args.threshold), "--n", str(args.n)] + (["--no-compile"] if args.no_compile else [])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {config}: {runs[config][-1]['wall_s']:.2f}s", file=sys.stderr)
    medians = []
    for config, results in runs.items():
        best = dict(results[0])
        for key in ("wall_s", "setup_s", "search_s", "queries_per_second", "peak_memory_mb"):
            best[key] = statistics.median(r[key] for r in results)
        medians.append(best)
    print(f"device: {medians[0]['device']}; model {args.model}, task {args.task}, threshold {args.threshold}, "
          f"n={args.n}, repeats={args.repeats}, compile={not args.no_compile}")
    print(table(medians))
    Path(args.out).write_text(json.dumps({"arguments": {k: v for k, v in vars(args).items() if k != "one"},
                                          "results": medians, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
