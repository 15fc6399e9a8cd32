"""Dense queries by receiver depth: one query at a time against candidate batches, per precision, side by side.

    OMP_NUM_THREADS=1 python benchmarks/query_depth.py --model random-gpt2:12x768x12 --task ioi --n 16
    OMP_NUM_THREADS=1 python benchmarks/query_depth.py --model random-gpt2:6x256x8 --layers 5,3,1 --formats fp32

A whole dense search at GPT-2 small's shape takes hours one query at a time, so this measures its parts: for a
sample of receivers (the query input of head 0 in the ``--layers`` given, default the top, middle and second
layer) every edge into it is queried at a threshold that keeps every edge (the dense case: each query's cone is
everything downstream of its receiver), with speculation off and on, in each precision; each configuration
starts from a fresh state and visits the receivers top down, as ACDC does. Forward-equivalents per query =
(seconds per decided query) / (one eager forward of the model on the clean batch), both measured in this
process. The whole-run figure weights each layer's measurement by the edges into that layer (layers between the
sampled ones take the nearer sample's figure): an extrapolation, labelled so. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.acdc import add_model_arguments, load_model_and_task, results_path

KEEP_ALL = -1.0  # every effect is at least this: nothing is removed (KL changes are never below -1)


def measure(model, task, fmt: str, speculation: str, layers: list[int], forward_s: float) -> list[dict]:
    import torch

    from pahq_fx.acdc.search import _search_receiver
    from pahq_fx.acdc.setup import build_runtime
    from pahq_fx.acdc.speculation import Predictor, candidate_memory, search_receiver
    from pahq_fx.formats import parse_format
    from pahq_fx.metrics import Metric

    runtime, edges = build_runtime(model, task, Metric.KL, parse_format(fmt), "per_row", False)
    predictor = Predictor("adaptive")
    names = {f"a{layer}.h0.q": layer for layer in layers}
    rows = [i for i, r in enumerate(edges.receivers) if r.name in names]
    results = []
    for row in rows:
        receiver = edges.receivers[row]
        effects: dict = {}
        before, evaluated = runtime.queries, runtime.evaluated
        start = time.perf_counter()
        if speculation == "off":
            _search_receiver(runtime, row, receiver, KEEP_ALL, False, effects)
        else:
            search_receiver(runtime, row, receiver, KEEP_ALL, False, effects, predictor, candidate_memory(torch.device("cpu")))
        seconds = time.perf_counter() - start
        queries = runtime.queries - before
        results.append(
            {
                "receiver": receiver.name,
                "layer": names[receiver.name],
                "senders": len(receiver.senders),
                "queries": queries,
                "evaluated": runtime.evaluated - evaluated,
                "seconds": seconds,
                "forward_equivalents": seconds / queries / forward_s,
            }
        )
        print(
            f"{fmt:5s} speculation {speculation:8s} {receiver.name:10s} {queries:4d} queries "
            f"{seconds / queries * 1e3:9.1f} ms/query {results[-1]['forward_equivalents']:.3f} fwd-equiv",
            file=sys.stderr,
        )
    return results


def whole_run(samples: list[dict], edges_per_layer: dict[int, int]) -> float:
    """Forward-equivalents per query over a whole dense run, each layer taking its nearest sample's figure."""
    total = weighted = 0.0
    for layer, count in edges_per_layer.items():
        nearest = min(samples, key=lambda s: (abs(s["layer"] - layer), s["layer"]))
        total += count
        weighted += count * nearest["forward_equivalents"]
    return weighted / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="random-gpt2:12x768x12", n=16)
    parser.set_defaults(task="ioi")
    parser.add_argument("--layers", help="comma-separated receiver layers (default: top, middle, second)")
    parser.add_argument("--formats", default="fp32,bf16")
    args = parser.parse_args()
    args.out = results_path(args, "query_depth")

    import torch

    from pahq_fx.acdc.edges import EdgeGraph
    from pahq_fx.acdc.run_info import eager_forward_seconds
    from pahq_fx.passes import split_heads, trace

    model, task = load_model_and_task(args)
    n_layers = model.config.num_hidden_layers
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [n_layers - 1, n_layers // 2, 1]
    forward_s = statistics.median(eager_forward_seconds(model, task.clean_input_ids, repeats=5))
    graph = EdgeGraph(split_heads(trace(model, task.clean_input_ids[:2], dynamic_shapes="batch")).meta["head_graph"])
    edges_per_layer: dict[int, int] = {}
    for r in graph.receivers:
        if r.layer is not None and r.layer >= 0:
            edges_per_layer[r.layer] = edges_per_layer.get(r.layer, 0) + len(r.senders)
    rows = []
    for fmt in args.formats.split(","):
        for speculation in ("off", "adaptive"):
            samples = measure(model, task, fmt, speculation, layers, forward_s)
            rows.append(
                {
                    "precision": fmt,
                    "speculation": speculation,
                    "samples": samples,
                    "whole_run_forward_equivalents_extrapolated": whole_run(samples, edges_per_layer),
                }
            )
    baseline = rows[0]["whole_run_forward_equivalents_extrapolated"]
    print(
        f"model {args.model}, task {args.task} {tuple(task.clean_input_ids.shape)}, {torch.get_num_threads()} thread(s); "
        f"one eager forward {forward_s * 1e3:.1f} ms"
    )
    header = " | ".join(f"a{layer}.h0.q" for layer in layers)
    print(f"| precision | speculation | {header} | whole dense run (extrapolated) | vs first row |")
    print("|" + " --- |" * (len(layers) + 4))
    for row in rows:
        cells = " | ".join(f"{s['forward_equivalents']:.3f}" for s in row["samples"])
        whole = row["whole_run_forward_equivalents_extrapolated"]
        print(f"| {row['precision']} | {row['speculation']} | {cells} | {whole:.3f} | {baseline / whole:.2f}x |")
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    Path(args.out).write_text(
        json.dumps(
            {
                "arguments": vars(args),
                "forward_s": forward_s,
                "environment": environment,
                "edges_per_layer": edges_per_layer,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
