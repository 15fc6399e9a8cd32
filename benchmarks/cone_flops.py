"""What a query's cone costs in matrix-multiply FLOPs against what it costs in time, both as forward-equivalents.

    OMP_NUM_THREADS=1 python benchmarks/cone_flops.py --model benchmarks/models/deep-induction --task induction \
        --half 16 --n 8 --threshold 1e-6

A whole search at ``--threshold`` (FP32, one query at a time). Receivers alternate: the queries of one are timed, the
queries of the next are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplies and attention,
the work that does not shrink with better code), so both measures cover the whole run and neighbouring receivers.
Per layer of the receivers and for the run: forward-equivalents per query in seconds (seconds per query / one eager
forward) and in FLOPs (FLOPs per query / one forward's FLOPs), and their ratio: 1.0 would be a query's cone running
as efficiently as the forward runs the same layers. The FLOP figure is the floor for FP32 at the forward's
efficiency: a query that must recompute its cone cannot cost less. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.acdc import add_model_arguments, load_model_and_task, measured_with, results_path
from benchmarks.tables import cone_flops

LAYER = re.compile(r"^[a-z]+(\d+)")


def layer_of(receiver: str) -> str:
    match = LAYER.match(receiver)
    return match.group(1) if match else receiver


def search_alternating(model, task, threshold: float) -> tuple[dict[str, dict[str, float]], int]:
    """Per receiver layer: seconds and queries of the timed receivers, FLOPs and queries of the counted ones."""
    from torch.utils.flop_counter import FlopCounterMode

    import pahq_fx

    per_layer: dict[str, dict[str, float]] = {}
    state: dict = {"mode": None, "queries": 0, "start": time.perf_counter()}

    def done(info) -> None:
        queries = info.queries - state["queries"]
        entry = per_layer.setdefault(layer_of(info.receiver), dict.fromkeys(("seconds", "timed", "flops", "counted"), 0.0))
        if state["mode"] is not None:
            state["mode"].__exit__(None, None, None)
            entry["flops"] += state["mode"].get_total_flops()
            entry["counted"] += queries
            state["mode"] = None
        else:
            entry["seconds"] += time.perf_counter() - state["start"]
            entry["timed"] += queries
        if info.index % 2 == 1:  # the next receiver is counted
            state["mode"] = FlopCounterMode(display=False)
            state["mode"].__enter__()
        state["queries"], state["start"] = info.queries, time.perf_counter()

    circuit = pahq_fx.discover(
        model, task, threshold=threshold, precision="fp32", progress=False, callback=done, allow_weak_task=True
    )
    if state["mode"] is not None:
        state["mode"].__exit__(None, None, None)
    return per_layer, len(circuit.edges)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="random-gpt2:6x256x8", n=8)
    parser.add_argument("--threshold", type=float, default=1e-6)
    args = parser.parse_args()
    args.out = results_path(args, "cone_flops")

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pahq_fx.acdc.run_info import eager_forward_seconds

    model, task = load_model_and_task(args)
    forward_s = statistics.median(eager_forward_seconds(model, task.clean_input_ids, repeats=7))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(task.clean_input_ids)
    forward_flops = counter.get_total_flops()
    per_layer, edges = search_alternating(model, task, args.threshold)

    def row(name: str, d: dict[str, float]) -> dict:
        time_eq = d["seconds"] / d["timed"] / forward_s if d["timed"] else None
        flop_eq = d["flops"] / d["counted"] / forward_flops if d["counted"] else None
        ratio = time_eq / flop_eq if time_eq and flop_eq else None
        return {"layer": name, **d, "time_forward_equivalents": time_eq, "flop_forward_equivalents": flop_eq, "ratio": ratio}

    layers = sorted(per_layer, key=lambda k: (k.isdigit(), -int(k) if k.isdigit() else 0))
    rows = [row(k, per_layer[k]) for k in layers]
    total = {key: sum(d[key] for d in per_layer.values()) for key in ("seconds", "timed", "flops", "counted")}
    rows.append(row("whole run", total))
    Path(args.out).write_text(
        json.dumps(
            {
                "arguments": vars(args),
                "environment": measured_with(),
                "threads": torch.get_num_threads(),
                "forward_s": forward_s,
                "forward_flops": forward_flops,
                "edges_kept": edges,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"model {args.model}, task {args.task} {tuple(task.clean_input_ids.shape)}")
    print(cone_flops([args.out], f"OMP_NUM_THREADS={torch.get_num_threads()}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
