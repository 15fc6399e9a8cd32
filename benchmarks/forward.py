"""One forward of the transformed per-head model against the Hugging Face model's own, and what setup costs.

    python benchmarks/forward.py --model gpt2-induction-8h --task induction --half 32 --n 48
    python benchmarks/forward.py --model random-gpt2:12x768x12 --task ioi --n 16     # GPT-2 small's shape

For each format, ``pahq_fx.transform(model, head=(last layer, 0), precision=fmt, compile=False)`` on the task's
clean batch: the seconds to trace, split and lower (setup, split into trace and split + lower), and the median
forward, as a ratio to the Hugging Face model's forward measured alternately in the same process (on CUDA where
there is one; ``--compile`` compiles both with ``torch.compile`` first).
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from acdc import add_model_arguments, load_model_and_task, measured_with, results_path  # shared by the benchmarks


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def measure(model, ids: torch.Tensor, fmt: str, repeats: int, compile: bool) -> dict:
    from pahq_fx import passes
    from pahq_fx.passes.pipeline import lower_split
    from pahq_fx.passes.precision import PrecisionConfig

    start = time.perf_counter()
    traced = passes.trace(model, ids)
    trace_s = time.perf_counter() - start
    graph = lower_split(traced, PrecisionConfig(fmt))
    split_s = time.perf_counter() - start - trace_s
    layers = len(graph.meta["head_graph"].layers)
    passes.set_head(graph, (layers - 1, 0))
    if compile:
        model, graph = torch.compile(model), torch.compile(graph)
    hf, ours = [], []
    for _ in range(2):
        model(input_ids=ids, use_cache=False)
        graph(ids)
    for _ in range(repeats):
        hf.append(_seconds(lambda: model(input_ids=ids, use_cache=False)))
        ours.append(_seconds(lambda: graph(ids)))
    hf_s, ours_s = statistics.median(hf), statistics.median(ours)
    return {
        "format": fmt,
        "trace_s": trace_s,
        "split_lower_s": split_s,
        "hf_forward_ms": hf_s * 1000,
        "forward_ms": ours_s * 1000,
        "ratio": ours_s / hf_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="gpt2-induction-8h", n=48)
    parser.add_argument("--formats", default="fp32,bf16,fp8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile both the HF model and ours")
    args = parser.parse_args()
    args.out = results_path(args, "forward")

    model, task = load_model_and_task(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ids = model.to(device), task.clean_input_ids.to(device)
    rows = [measure(model, ids, fmt, args.repeats, args.compile) for fmt in args.formats.split(",")]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU threads {torch.get_num_threads()}"
    print(f"model {args.model}, batch {tuple(ids.shape)}, {'compiled' if args.compile else 'eager'}, {where}")
    print("| format | trace s | split + lower s | HF forward ms | transformed forward ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['format']} | {r['trace_s']:.2f} | {r['split_lower_s']:.2f} | {r['hf_forward_ms']:.1f} "
            f"| {r['forward_ms']:.1f} | {r['ratio']:.2f} |"
        )
    Path(args.out).write_text(
        json.dumps({"arguments": vars(args), "environment": measured_with(), "results": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
