"""Where one dense edge query's time goes, per format: ``torch.profiler`` over repeated queries into a layer-0 head.

    python benchmarks/profile_query.py --layers 12 --d-model 768 --heads 12 --batch 16 --seq 32

A randomly initialised GPT-2-shaped model with every edge kept (query_latency.py's dense case). Prints, per format,
the operators by self CPU time and the number of device kernels a query launches.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2LMHeadModel


def query(runtime, row: int, sender: int) -> None:
    """One edge query, undone: the runtime's state is the same after it."""
    runtime.try_remove(row, [sender])
    runtime.rollback()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--formats", default="fp32,fp8")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    import pahq_fx
    from pahq_fx.acdc import EdgeGraph, Metric
    from pahq_fx.acdc.runtime import PatchingRuntime
    from pahq_fx.ir import graph_meta
    from pahq_fx.passes.pipeline import build
    from pahq_fx.passes.precision import PrecisionConfig

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, vocab_size=1000, n_positions=max(64, args.seq)
    )
    model = GPT2LMHeadModel(config).eval().to(device)

    def ids():
        return torch.randint(0, 1000, (args.batch, args.seq)).to(device)

    task = pahq_fx.Task(ids(), ids())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for fmt in args.formats.split(","):
        graph = build(model, task.clean_input_ids, PrecisionConfig(fmt))
        edges = EdgeGraph(graph_meta.head_graph(graph))
        runtime = PatchingRuntime(graph, edges, task, Metric.KL, compile=False)
        row, embed = edges.receiver_index["a0.h0.q"], edges.sender_index["embed"]
        runtime.investigate(edges.receivers[row])

        query(runtime, row, embed)
        with profile(activities=activities) as prof:
            for _ in range(args.queries):
                query(runtime, row, embed)
            if device == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"\n## {fmt}: {args.queries} queries into a0.h0.q, {kernels / args.queries:.0f} device kernels per query")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
