"""State storage: the runtime's bytes, circuits and speed with its caches and sender outputs in fp32, bf16 and fp8.

    python benchmarks/storage.py                      # the shipped models and the twelve-layer benchmark model
    python benchmarks/storage.py --cases llama-ioi    # one case

For each case (a model, a task and a threshold) and each storage format, in this one process: the runtime's
``state_bytes()`` right after setup (the caches) and at the end of the search, the circuit's edge Jaccard with the
FP32-storage circuit, the largest difference of a tested edge's effect from FP32's (relative to the largest
effect), and forward-equivalents per query; then a sweep over ``--sweep`` thresholds in each format, scored by
ROC AUC against the FP32 sweep's circuit at the lowest threshold (FP32's own sweep scored the same way). Heads run
in FP32 everywhere (precision="fp32"): only the storage differs. Writes benchmarks/results/storage.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from acdc import load_model, measured_with

DEEP = str(ROOT / "benchmarks" / "models" / "deep-induction")
# (name, model, task, task options, threshold): the README's cases and the deep model's sparse run (benchmarks/acdc.py)
CASES = {
    "llama-ioi": ("llama-ioi", "ioi", {"n": 32}, 0.05),
    "gpt2-induction": ("gpt2-induction", "induction", {"n": 16}, 0.05),
    "gpt2-induction-8h": ("gpt2-induction-8h", "induction", {"n": 48, "half": 32}, 0.01),
    "gpt2-greater-than": ("gpt2-greater-than", "greater_than", {"n": 32}, 0.05),
    "deep-induction": (DEEP, "induction", {"n": 8, "half": 16}, 0.05),
}
STORAGES = ("fp32", "bf16", "fp8")


def run_case(name: str, sweep_factors: list[float]) -> list[dict]:
    import torch

    from pahq_fx.acdc.roc import jaccard, roc_auc, roc_point
    from pahq_fx.acdc.search import prepare, search
    from pahq_fx.acdc.sweep import sweep
    from pahq_fx.tasks import make_task

    model_name, task_name, options, threshold = CASES[name]
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name)
    task = make_task(task_name, tokenizer, seed=0, **options)
    rows, reference = [], None
    thresholds = [threshold * f for f in sweep_factors]
    fp32_lowest = None
    for storage in STORAGES:
        session = prepare(model, task, precision="fp32", storage=storage, allow_weak_task=True, compile=False)
        setup_bytes = session.runtime.state_bytes()
        circuit = search(session, threshold, progress=False)
        effects = {(e.sender, e.receiver): e.effect for e in (*circuit.edges, *circuit.removed)}
        if reference is None:
            reference = (circuit, effects)
        common = set(effects) & set(reference[1])
        largest = max(abs(v) for v in reference[1].values())
        result = sweep(model, task, thresholds, precision="fp32", storage=storage, progress=False, allow_weak_task=True)
        circuits = [point.circuit for point in result.points]
        if fp32_lowest is None:
            fp32_lowest = circuits[0].edge_set()
        auc = roc_auc([roc_point(c.edge_set(), fp32_lowest, c.total_edges) for c in circuits])
        rows.append(
            {
                "case": name,
                "storage": storage,
                "threshold": threshold,
                "edges": len(circuit.edges),
                "total_edges": circuit.total_edges,
                "jaccard_vs_fp32": jaccard(circuit.edge_set(), reference[0].edge_set()),
                "max_effect_difference": max(abs(effects[k] - reference[1][k]) for k in common) / largest,
                "untested_or_extra": len(set(effects) ^ set(reference[1])),
                "setup_state_bytes": setup_bytes,
                "end_state_bytes": circuit.stats.state_bytes,
                "forward_equivalents": circuit.stats.forward_equivalents,
                "sweep_thresholds": thresholds,
                "sweep_auc": auc,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    base = {r["case"]: r for r in rows if r["storage"] == "fp32"}
    lines = [
        "| case (threshold) | storage | edges kept | Jaccard vs fp32 | largest effect difference | bytes after setup (x fewer) "
        "| bytes at the end (x fewer) | forward-equivalents per query | sweep ROC AUC (vs fp32's) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b = base[r["case"]]
        lines.append(
            f"| {r['case']} ({r['threshold']:g}) | {r['storage']} | {r['edges']}/{r['total_edges']} | "
            f"{r['jaccard_vs_fp32']:.3f} | {r['max_effect_difference']:.1e} | "
            f"{r['setup_state_bytes'] / 2**20:.1f} MiB ({b['setup_state_bytes'] / r['setup_state_bytes']:.2f}) | "
            f"{r['end_state_bytes'] / 2**20:.1f} MiB ({b['end_state_bytes'] / r['end_state_bytes']:.2f}) | "
            f"{r['forward_equivalents']:.3f} | {r['sweep_auc']:.4f} ({r['sweep_auc'] - b['sweep_auc']:+.4f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sweep", default="0.25,0.5,1,2,4", help="sweep thresholds as multiples of the case's threshold")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "storage.json"))
    args = parser.parse_args()
    names = [c for c in args.cases.split(",") if c]
    if "deep-induction" in names and not Path(DEEP).is_dir():
        sys.exit(f"{DEEP} is missing: build it with python benchmarks/train_deep.py (about 15 minutes)")
    factors = [float(f) for f in args.sweep.split(",")]
    rows = [row for name in names for row in run_case(name, factors)]
    print(table(rows))
    worst = max(abs(r["sweep_auc"] - next(b for b in rows if b["case"] == r["case"])["sweep_auc"]) for r in rows)
    print(f"largest AUC difference from fp32: {worst:.4f}; median forward-equivalents by storage: ", end="")
    print({s: round(statistics.median(r["forward_equivalents"] for r in rows if r["storage"] == s), 3) for s in STORAGES})
    Path(args.out).write_text(
        json.dumps({"arguments": vars(args), "environment": measured_with(), "results": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
