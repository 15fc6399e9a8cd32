"""Per-edge-query latency of the patching runtime by the receiver's layer, for fp32 / fp8 / bf16.

    python benchmarks/query_latency.py --layers 4 --d-model 256 --heads 8 --batch 8 --seq 16
    python benchmarks/query_latency.py --layers 12 --d-model 768 --heads 12 --compile   # GPT-2-small shape

A randomly initialised GPT-2-shaped model. A query for a receiver in layer L recomputes layers L..N-1 only
(start at layer), so latency grows as the receiver moves towards the input. With --compile the first query
per step pays the compilation, reported separately from the steady state. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent


def measure(args: argparse.Namespace, fmt: str, model, task) -> dict:
    from pahq_fx.acdc import EdgeGraph, Metric
    from pahq_fx.acdc.runtime import PatchingRuntime
    from pahq_fx.passes import lower_precision, split_heads, trace

    graph = lower_precision(split_heads(trace(model, task.clean_input_ids)), fmt)
    edges = EdgeGraph(graph.meta["head_graph"])
    runtime = PatchingRuntime(graph, edges, task, Metric.KL, compile=args.compile)
    removed = torch.zeros_like(runtime.upstream)
    starts = [runtime.structure.steps.index(s) for s in runtime.structure.steps if s.kind == "attention"]
    first_start = time.perf_counter()
    for start in starts:  # first query per start: compiles each step graph once
        runtime.evaluate(start, removed)
    compile_s = time.perf_counter() - first_start
    per_layer = {}
    for layer, start in enumerate(starts):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            runtime.evaluate(start, removed)
            times.append(time.perf_counter() - t)
        per_layer[layer] = statistics.median(times) * 1000
    final = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        runtime.evaluate(len(runtime.structure.steps), removed)
        final.append(time.perf_counter() - t)
    return {"format": fmt, "first_queries_s": compile_s, "compilations": runtime.compilations,
            "latency_ms_by_receiver_layer": per_layer, "resid_post_ms": statistics.median(final) * 1000}


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
    config = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=max(64, args.seq))
    model = GPT2LMHeadModel(config).eval().to(device)
    generator = torch.Generator().manual_seed(1)
    ids = lambda: torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)  # noqa: E731
    task = pahq_fx.Task(ids(), ids())
    results = [measure(args, fmt, model, task) for fmt in args.formats.split(",")]
    fp32 = next((r for r in results if r["format"] == "fp32"), results[0])
    print(f"device: {device}; GPT-2 shape: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
          f"batch {args.batch} x seq {args.seq}; compile={args.compile}; median of {args.repeats}")
    header = "| format | first queries (incl. compile) s | compilations | " + " | ".join(
        f"layer {l} ms" for l in range(args.layers)) + " | resid_post ms | layer 0 vs fp32 |"
    print(header)
    print("|" + " --- |" * (args.layers + 5))
    for r in results:
        cells = " | ".join(f"{r['latency_ms_by_receiver_layer'][l]:.2f}" for l in range(args.layers))
        ratio = r["latency_ms_by_receiver_layer"][0] / fp32["latency_ms_by_receiver_layer"][0]
        print(f"| {r['format']} | {r['first_queries_s']:.1f} | {r['compilations']} | {cells} | {r['resid_post_ms']:.2f} "
              f"| {ratio:.2f} |")
    Path(args.out).write_text(json.dumps({"arguments": vars(args), "device": device, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
