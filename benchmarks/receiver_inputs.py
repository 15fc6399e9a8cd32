"""Receiver inputs stored or recomputed: the runtime's bytes, circuits and speed in each storage format.

    python benchmarks/receiver_inputs.py                       # the twelve-layer benchmark model, as below
    python benchmarks/receiver_inputs.py --model random-gpt2:6x256x8 --dense-storages fp32

For each threshold (``--sparse`` in every storage format, ``--dense`` in ``--dense-storages``) and each storage
format, a search with receiver inputs stored, then one with them recomputed, in this one process (heads in FP32,
one query at a time): the runtime's ``state_bytes()`` after setup, the largest after any receiver and at the end,
forward-equivalents per query, and the recomputed circuit's edge Jaccard with the stored one and its largest effect
difference (relative to the largest effect). Writes benchmarks/results/receiver_inputs.json and prints its table
(benchmarks/tables.py's, as docs/performance.md shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import tables
from acdc import load_model, measured_with

DEEP = str(ROOT / "benchmarks" / "models" / "deep-induction")
MODES = ("stored", "recomputed")


def run(model, task, threshold: float, storage: str, mode: str) -> tuple[dict, object]:
    from pahq_fx.acdc.search import prepare, search

    session = prepare(model, task, precision="fp32", storage=storage, receiver_inputs=mode, allow_weak_task=True, compile=False)
    setup_bytes = session.runtime.state_bytes()
    largest = [setup_bytes]

    def record(done) -> None:
        largest[0] = max(largest[0], session.runtime.state_bytes())

    circuit = search(session, threshold, progress=False, callback=record)
    row = {
        "threshold": threshold,
        "storage": storage,
        "receiver_inputs": mode,
        "edges": len(circuit.edges),
        "total_edges": circuit.total_edges,
        "queries": circuit.stats.queries,
        "setup_state_bytes": setup_bytes,
        "largest_state_bytes": largest[0],
        "end_state_bytes": circuit.stats.state_bytes,
        "search_s": circuit.stats.wall_s,  # setup and search
        "forward_equivalents": circuit.stats.forward_equivalents,
    }
    return row, circuit


def compare(row: dict, circuit, reference) -> None:
    from pahq_fx.acdc.roc import jaccard

    effects = {(e.sender, e.receiver): e.effect for e in (*circuit.edges, *circuit.removed)}
    expected = {(e.sender, e.receiver): e.effect for e in (*reference.edges, *reference.removed)}
    largest = max(abs(v) for v in expected.values())
    common = set(effects) & set(expected)
    row["jaccard_vs_stored"] = jaccard(circuit.edge_set(), reference.edge_set())
    row["max_effect_difference"] = max(abs(effects[k] - expected[k]) for k in common) / largest


def main() -> None:
    import torch

    from pahq_fx.tasks import make_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEEP)
    parser.add_argument("--task", default="induction")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--half", type=int, default=16)
    parser.add_argument("--sparse", type=float, default=0.05)
    parser.add_argument("--dense", type=float, default=1e-4)
    parser.add_argument("--dense-storages", default="fp32")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "receiver_inputs.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    task = make_task(args.task, tokenizer, n=args.n, seed=0, half=args.half)
    plan = [(args.sparse, s) for s in ("fp32", "bf16", "fp8")]
    plan += [(args.dense, s) for s in args.dense_storages.split(",") if s]
    rows = []
    for threshold, storage in plan:
        reference = None
        for mode in MODES:
            row, circuit = run(model, task, threshold, storage, mode)
            if reference is None:
                reference = circuit
            else:
                compare(row, circuit, reference)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    Path(args.out).write_text(
        json.dumps({"arguments": vars(args), "environment": measured_with(), "results": rows}, indent=2) + "\n"
    )
    print(tables.receiver_inputs([args.out], "OMP_NUM_THREADS=1"))


if __name__ == "__main__":
    main()
