"""Per-edge-query latency of the patching runtime by the receiver's layer, in forward-equivalents, per format.

    python benchmarks/query_latency.py --layers 6 --d-model 256 --heads 8 --batch 16 --seq 14 --repeats 5
    python benchmarks/query_latency.py --layers 12 --d-model 768 --heads 12 --compile   # GPT-2-small shape

A randomly initialised GPT-2-shaped model with every edge kept: the dense worst case, where a change to a head's
query input reaches every component above it. "sparse" is the same query once that head has lost every outgoing
edge but the one into resid_post (the common case in a sparse circuit). Latencies are medians; "fwd-eq" divides
by one eager forward of the original model on the same batch, measured in the same process. With --compile the
first queries pay the compilation, reported separately. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from acdc import measured_with  # shared by the benchmarks


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(args: argparse.Namespace, fmt: str, model, task) -> dict:
    from pahq_fx.acdc import EdgeGraph, Metric
    from pahq_fx.acdc.runtime import PatchingRuntime
    from pahq_fx.ir import graph_meta
    from pahq_fx.passes.pipeline import build
    from pahq_fx.passes.precision import PrecisionConfig

    graph = build(model, task.clean_input_ids, PrecisionConfig(fmt))
    edges = EdgeGraph(graph_meta.head_graph(graph))
    runtime = PatchingRuntime(graph, edges, task, Metric.KL, compile=args.compile)
    index, embed = edges.receiver_index, edges.sender_index["embed"]

    def query(row: int, sender: int) -> None:
        runtime.try_remove(row, [sender])
        runtime.rollback()

    first = time.perf_counter()
    final = index["resid_post"]
    runtime.investigate(edges.receivers[final])
    query(final, embed)
    dense, sparse = {}, {}
    for layer in reversed(range(args.layers)):
        row = index[f"a{layer}.h0.q"]
        runtime.investigate(edges.receivers[row])
        query(row, embed)
        dense[layer] = _median_ms(lambda row=row: query(row, embed), args.repeats)
    first_s = time.perf_counter() - first
    head = edges.sender_index[f"a{args.layers - 1}.h0"]
    for row in list(runtime.edge_state.kept_out[head]):
        if row != final:
            runtime.remove(row, [head])
    last = index[f"a{args.layers - 1}.h0.q"]
    sparse = _median_ms(lambda: query(last, embed), args.repeats)
    runtime.investigate(edges.receivers[final])
    resid_post = _median_ms(lambda: query(final, embed), args.repeats)
    return {
        "format": fmt,
        "first_queries_s": first_s,
        "compilations": runtime.compilations,
        "dense_ms_by_receiver_layer": dense,
        "sparse_last_layer_ms": sparse,
        "resid_post_ms": resid_post,
        "state_bytes": runtime.state_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default="fp32,fp8,bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "query_latency.json"))
    args = parser.parse_args()

    import pahq_fx

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, vocab_size=args.vocab, n_positions=max(64, args.seq)
    )
    model = GPT2LMHeadModel(config).eval().to(device)
    generator = torch.Generator().manual_seed(1)

    def ids():
        return torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)

    task = pahq_fx.Task(ids(), ids())
    from pahq_fx.acdc.run_info import eager_forward_seconds

    forward_ms = statistics.median(eager_forward_seconds(model, task.clean_input_ids, repeats=args.repeats)) * 1000
    results = [measure(args, fmt, model, task) for fmt in args.formats.split(",")]
    print(
        f"device: {device}; GPT-2 shape: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
        f"batch {args.batch} x seq {args.seq}; compile={args.compile}; median of {args.repeats}; "
        f"one eager forward {forward_ms:.2f} ms; every edge kept (dense) unless marked sparse"
    )
    header = (
        "| format | first queries (incl. compile) s | compilations | state MB | "
        + " | ".join(f"layer {l} ms (fwd-eq)" for l in range(args.layers))
        + " | sparse, last layer ms (fwd-eq) | resid_post ms (fwd-eq) |"
    )
    print(header)
    print("|" + " --- |" * (args.layers + 6))
    for r in results:
        cells = " | ".join(
            f"{r['dense_ms_by_receiver_layer'][l]:.2f} ({r['dense_ms_by_receiver_layer'][l] / forward_ms:.2f})"
            for l in range(args.layers)
        )
        print(
            f"| {r['format']} | {r['first_queries_s']:.1f} | {r['compilations']} | {r['state_bytes'] / 2**20:.1f} | {cells} "
            f"| {r['sparse_last_layer_ms']:.2f} ({r['sparse_last_layer_ms'] / forward_ms:.3f}) "
            f"| {r['resid_post_ms']:.2f} ({r['resid_post_ms'] / forward_ms:.3f}) |"
        )
    Path(args.out).write_text(
        json.dumps(
            {
                "arguments": vars(args),
                "environment": measured_with(),
                "device": device,
                "forward_ms": forward_ms,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
