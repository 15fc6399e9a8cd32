"""The plan's predictions against what real runs measure, on random models of four shapes (one a 2-layer slice of
Llama-3.1-8B: d_model 4096, 32 heads, 8 key/value groups, d_mlp 14336, vocab 512 to fit this machine).

For every shape, from the configuration alone (pahq_fx.plan_from_config's arithmetic) against the runtime built as
``discover`` builds it:

* caches: ``state_bytes()`` right after setup; state with every step running and every edge kept;
* the trace and split's peak (estimated at twice the per-head copies), setup's peak, a dense first-layer query's
  peak (a key/value input of layer 0, every edge kept), all measured from the CPU allocator's events;
* time: the plan's calibrated seconds per query of each receiver measured here against the same receivers searched
  in full at threshold 0 (every edge kept: each query's cone is the dense one the plan assumes), and on the small
  shapes a whole ``discover`` at threshold 0 against the plan's extrapolated dense run.

    OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py [--shapes small|slice|all]

writes benchmarks/results/plan_accuracy.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PAHQ_FX_TRACE_CACHE", tempfile.mkdtemp())  # every shape traced cold, as a first run is

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pahq_fx
from pahq_fx.acdc import EdgeGraph, Metric
from pahq_fx.acdc import plan as planning
from pahq_fx.acdc.run_info import eager_forward_seconds
from pahq_fx.acdc.runtime import PatchingRuntime
from pahq_fx.acdc.search import prepare, search
from pahq_fx.acdc.setup import _trace_for
from pahq_fx.ir import graph_meta
from pahq_fx.passes.pipeline import lower_split
from pahq_fx.passes.precision import Format, PrecisionConfig

RESULTS = Path(__file__).resolve().parent / "results"


def shapes(which: str, slice_whole_run: bool = False) -> list[dict]:
    small = [
        {
            "name": "gpt2 4x256x8",
            "config": GPT2Config(n_layer=4, n_head=8, n_embd=256, vocab_size=512, n_positions=64),
            "batch": 8,
            "seq": 16,
            "whole_run": True,
        },
        {
            "name": "llama-gqa 4x256x8/2",
            "config": LlamaConfig(
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=2,
                hidden_size=256,
                intermediate_size=768,
                vocab_size=512,
                max_position_embeddings=64,
            ),
            "batch": 8,
            "seq": 16,
            "whole_run": True,
        },
        {
            "name": "neox-parallel 4x256x8",
            "config": GPTNeoXConfig(
                num_hidden_layers=4,
                num_attention_heads=8,
                hidden_size=256,
                intermediate_size=1024,
                vocab_size=512,
                max_position_embeddings=64,
                use_parallel_residual=True,
            ),
            "batch": 8,
            "seq": 16,
            "whole_run": True,
        },
    ]
    slice_ = [
        {
            "name": "llama-3.1-8b slice 2x4096x32/8",
            "config": LlamaConfig(
                num_hidden_layers=2,
                num_attention_heads=32,
                num_key_value_heads=8,
                hidden_size=4096,
                intermediate_size=14336,
                vocab_size=512,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            ),
            "batch": 4,
            "seq": 16,
            "whole_run": slice_whole_run,
            "profile_run": False,
        }
    ]
    return {"small": small, "slice": slice_, "all": small + slice_}[which]


def ratio(measured: float, predicted: float) -> float:
    return measured / predicted if predicted else float("nan")


def measure(shape: dict) -> dict:
    torch.manual_seed(0)
    config = shape["config"]
    model = AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch, seq = shape["batch"], shape["seq"]
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    corrupted = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    task = pahq_fx.Task(clean, corrupted)
    geometry = planning.geometry_from_config(config)
    predicted = planning.memory_plan(geometry, planning.Workload(batch, seq, batch))
    out: dict = {"shape": shape["name"], "batch": batch, "seq": seq, "predicted": predicted.to_json()}

    gc.collect()
    with torch.no_grad():
        graph, split_peak = planning.measured_peak(
            lambda: lower_split(_trace_for(model, clean), PrecisionConfig(Format.FP32, "per_row"))
        )
        edges = EdgeGraph(graph_meta.head_graph(graph))
        runtime, setup_peak = planning.measured_peak(lambda: PatchingRuntime(graph, edges, task, Metric.KL))
    exact = planning.geometry_from_runtime(runtime, model)
    rows = {
        "caches (state_bytes after setup)": (runtime.state_bytes(), predicted.cache_bytes),
        "split per-head copies": (exact.split_bytes, predicted.split_weights),
        "model weights": (exact.model_bytes, predicted.weights),
        "trace + split peak (estimate: 2x copies)": (split_peak, predicted.split_peak),
        "setup peak": (setup_peak, predicted.setup_peak),
    }
    # Every step running, every edge kept: the state the plan calls exact; then a dense first-layer key/value query.
    receivers = edges.receivers
    kv_row = max(i for i, r in enumerate(receivers) if r.layer == 0 and r.role is not None and r.role.value == "v")
    runtime.investigate(receivers[kv_row])
    rows["caches + state, every edge kept"] = (runtime.state_bytes(), predicted.cache_bytes + predicted.state_start)
    gc.collect()
    _, query_peak = planning.measured_peak(
        lambda: (runtime.try_remove(kv_row, [receivers[kv_row].senders[0]]), runtime.rollback())
    )
    rows["dense first-layer query peak"] = (query_peak, predicted.query)
    runtime.reset()

    # Time: the calibration's seconds per query against the same receivers searched in full at threshold 0.
    forward_s = statistics.median(eager_forward_seconds(model, clean, repeats=3))
    start = time.perf_counter()
    timing = planning.calibrate_runtime(runtime, forward_s, queries_per_role=2)
    calibration_s = time.perf_counter() - start
    calibrated = {}
    for m in timing.measured:
        calibrated[m["receiver"]] = statistics.median(m["seconds"])
    chosen = _receivers_to_run(edges)
    observed = []
    for row in sorted(chosen):
        receiver = receivers[row]
        runtime.investigate(receiver)
        times = []
        for s in receiver.senders:
            t0 = time.perf_counter()
            runtime.try_remove(row, [s])
            runtime.rollback()
            times.append(time.perf_counter() - t0)
        per_query = statistics.mean(times)
        observed.append(
            {
                "receiver": receiver.name,
                "queries": len(times),
                "seconds_per_query": per_query,
                "calibrated": calibrated.get(receiver.name),
            }
        )
    runtime.reset()
    out["time"] = {
        "forward_s": forward_s,
        "calibration_s": calibration_s,
        "receivers": observed,
        "plan_total_s": timing.total_s,
        "plan_forward_equivalents_per_query": timing.forward_equivalents_per_query,
    }
    if shape["whole_run"]:
        del runtime, graph
        gc.collect()
        # Timed without the profiler, then searched again under it for the peak (same decisions: threshold 0).
        session = prepare(model, task, precision="fp32", allow_weak_task=True)
        t0 = time.perf_counter()
        circuit = search(session, 0.0, progress=False)
        wall = time.perf_counter() - t0
        out["time"]["whole_run_s"] = wall
        out["time"]["whole_run_queries"] = circuit.stats.queries
        if shape.get("profile_run", True):
            session.runtime.reset()
            gc.collect()
            _, search_peak = planning.measured_peak(lambda: search(session, 0.0, progress=False))
            rows["search peak above the caches (state + a dense query)"] = (search_peak, predicted.state_start + predicted.query)
        rows["seconds, a whole dense run (threshold 0)"] = (wall, timing.total_s)
    out["rows"] = {k: {"measured": m, "predicted": p, "ratio": ratio(m, p)} for k, (m, p) in rows.items()}
    return out


def _receivers_to_run(edges: EdgeGraph) -> list[int]:
    """resid_post, the last MLP, the last layer's last query head and last value group, and layer 0's MLP, last value
    group and last query head: a few receivers per kind and layer."""
    chosen = []
    for layer in (edges.head_graph.n_layers - 1, 0):
        for want in ("mlp", "v", "q"):
            for i, r in enumerate(edges.receivers):
                if r.layer != layer:
                    continue
                if (want == "mlp" and r.role is None and r.kind.value == "mlp") or (r.role is not None and r.role.value == want):
                    chosen.append(i)
                    break
    chosen.append(0)  # resid_post
    return chosen


def table(results: list[dict]) -> str:
    lines = ["| shape | quantity | measured | predicted | measured / predicted |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for name, row in r["rows"].items():
            unit = (lambda v: f"{v:.2f} s") if name.startswith("seconds") else (lambda v: f"{v / 2**20:.2f} MiB")
            lines.append(
                f"| {r['shape']} ({r['batch']}x{r['seq']}) | {name} | {unit(row['measured'])} | "
                f"{unit(row['predicted'])} | {row['ratio']:.3f} |"
            )
    lines += [
        "",
        "| shape | receiver | queries | measured s/query | calibrated s/query | measured / calibrated |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for o in r["time"]["receivers"]:
            cal, got = o["calibrated"], o["seconds_per_query"]
            calibrated = "" if cal is None else f"{cal:.4g}"
            share = "" if cal is None else f"{got / cal:.3f}"
            lines.append(f"| {r['shape']} | {o['receiver']} | {o['queries']} | {got:.4g} | {calibrated} | {share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="all", choices=("small", "slice", "all"))
    parser.add_argument("--out", default=str(RESULTS / "plan_accuracy.json"))
    parser.add_argument(
        "--slice-whole-run",
        action="store_true",
        help="also search the slice in full at threshold 0 (about 20 minutes on one thread)",
    )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = []
    for shape in shapes(args.shapes, args.slice_whole_run):
        print(f"measuring {shape['name']}", file=sys.stderr, flush=True)
        results.append(measure(shape))
        gc.collect()
    print(table(results))
    out = Path(args.out)
    previous = json.loads(out.read_text())["results"] if out.exists() else []
    names = {r["shape"] for r in results}
    merged = [r for r in previous if r["shape"] not in names] + results
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "note": "CPU allocator events (torch.profiler profile_memory); configuration-only predictions",
    }
    out.write_text(json.dumps({"meta": meta, "results": merged}, indent=2, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
