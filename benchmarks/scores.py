"""Exact edge scores (each edge alone patched from the full model) on the incremental runtime, against a naive full
forward per edge.

    OMP_NUM_THREADS=1 python benchmarks/scores.py                      # every receiver: ~32k edges at GPT-2 small's shape
    OMP_NUM_THREADS=1 python benchmarks/scores.py --receivers 40       # a sample of receivers, extrapolated

Forward-equivalents per edge = (scoring seconds per edge) / (one eager forward of the model on the clean batch),
both timed in this process. With ``--receivers N`` only N receivers, evenly spaced in ACDC's visiting order (the
final read always among them), are scored, and the whole run is extrapolated layer by layer: each layer's edges
take the seconds per edge measured on that layer's sampled receivers (the nearest sampled layer's where it has
none); the JSON labels those figures as extrapolated. The naive figure is a full forward of the reference
implementation (tests/acdc_reference.py) per edge, timed on ``--naive-edges`` edges spread over the graph and
extrapolated to every edge. Both configurations of batching (the edges into a receiver batched where the memory
budget allows, and one query at a time) run on the same sample.
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

from benchmarks.acdc import add_model_arguments, load_model_and_task, measured_with, results_path


def layer_of(receiver) -> int:
    """The layer a receiver's queries start at (the final read: one past the last layer)."""
    return receiver.layer if receiver.layer is not None else 10**6


def sample_rows(n_receivers: int, wanted: int | None) -> list[int]:
    if wanted is None or wanted >= n_receivers:
        return list(range(n_receivers))
    step = n_receivers / wanted
    return sorted({0, *(int(i * step) for i in range(wanted))})


def extrapolate(edges, seconds: dict[int, float], rows: list[int]) -> float:
    """Seconds for every edge, each layer at its sampled receivers' seconds per edge (the nearest sampled layer's)."""
    per_layer: dict[int, list[float]] = {}
    for row in rows:
        per_layer.setdefault(layer_of(edges.receivers[row]), []).append(seconds[row])
    counts: dict[int, int] = {}
    for row in rows:
        counts[layer_of(edges.receivers[row])] = counts.get(layer_of(edges.receivers[row]), 0) + len(edges.receivers[row].senders)
    rate = {layer: sum(per_layer[layer]) / counts[layer] for layer in per_layer}
    total = 0.0
    for r in edges.receivers:
        layer = min(rate, key=lambda sampled: (abs(sampled - layer_of(r)), sampled))
        total += rate[layer] * len(r.senders)
    return total


def score_sample(session, rows: list[int], batch: bool) -> tuple[dict[int, float], int]:
    """Seconds per sampled receiver, and the passes run."""
    from pahq_fx.acdc.scores import exact_scores

    run = exact_scores(session.runtime, session.edges, progress=False, batch=batch, receivers=rows)
    return run.seconds, run.passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="random-gpt2:12x768x12", n=16)
    parser.set_defaults(task="ioi")
    parser.add_argument("--receivers", type=int, help="score this many receivers, evenly spaced, and extrapolate")
    parser.add_argument("--naive-edges", type=int, default=12, help="edges timed with a full forward each")
    parser.add_argument("--configs", default="batched,single", help="batched and/or single (one query at a time)")
    args = parser.parse_args()
    args.out = results_path(args, "scores")

    import torch

    from pahq_fx.acdc.run_info import eager_forward_seconds
    from pahq_fx.acdc.search import prepare
    from tests.acdc_reference import ReferenceACDC

    model, task = load_model_and_task(args)
    start = time.perf_counter()
    session = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True)
    setup_s = time.perf_counter() - start
    edges = session.edges
    total_edges = sum(len(r.senders) for r in edges.receivers)
    rows = sample_rows(len(edges.receivers), args.receivers)
    sampled_edges = sum(len(edges.receivers[row].senders) for row in rows)
    forward_before = eager_forward_seconds(model, task.clean_input_ids, repeats=5)
    configs = {}
    for config in args.configs.split(","):
        seconds, passes = score_sample(session, rows, batch=config == "batched")
        measured = sum(seconds.values())
        whole = measured if len(rows) == len(edges.receivers) else extrapolate(edges, seconds, rows)
        configs[config] = {"sampled_seconds": measured, "passes": passes, "whole_run_seconds": whole}
        print(f"{config}: {len(rows)} receivers, {sampled_edges} edges in {measured:.1f} s ({passes} passes)", file=sys.stderr)
    reference = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask)
    every = [(edges.senders[s].name, r.name) for r in edges.receivers for s in r.senders]
    picked = [every[int(i * len(every) / args.naive_edges)] for i in range(args.naive_edges)]
    begin = time.perf_counter()
    for edge in picked:
        reference.kl({edge})
    naive_per_edge = (time.perf_counter() - begin) / len(picked)
    forward_s = statistics.median(forward_before + eager_forward_seconds(model, task.clean_input_ids, repeats=5))
    extrapolated = len(rows) != len(edges.receivers)
    for figures in configs.values():
        figures["forward_equivalents_per_edge"] = figures["whole_run_seconds"] / total_edges / forward_s
        figures["extrapolated"] = extrapolated
        figures["speed_up_vs_naive"] = naive_per_edge * total_edges / figures["whole_run_seconds"]
    result = {
        "arguments": vars(args),
        "task_shape": list(task.clean_input_ids.shape),
        "threads": torch.get_num_threads(),
        "forward_s": forward_s,
        "setup_s": setup_s,
        "total_edges": total_edges,
        "receivers": len(edges.receivers),
        "sampled_receivers": len(rows),
        "sampled_edges": sampled_edges,
        "configs": configs,
        "naive": {
            "edges_timed": len(picked),
            "seconds_per_edge": naive_per_edge,
            "forward_equivalents_per_edge": naive_per_edge / forward_s,
            "whole_run_seconds_extrapolated": naive_per_edge * total_edges,
        },
        "measured_with": measured_with(),
    }
    label = " (extrapolated from the sample)" if extrapolated else ""
    print(
        f"model {args.model}, task {args.task} {tuple(task.clean_input_ids.shape)}, {torch.get_num_threads()} thread(s); "
        f"one eager forward {forward_s * 1e3:.1f} ms; {total_edges} edges, setup {setup_s:.1f} s"
    )
    print("| config | fwd-equiv / edge | whole run s | speed-up vs naive |")
    print("| --- | --- | --- | --- |")
    for name, f in configs.items():
        cells = [f"{f['forward_equivalents_per_edge']:.3f}", f"{f['whole_run_seconds']:.0f}", f"{f['speed_up_vs_naive']:.1f}x"]
        print(f"| {name}{label} | " + " | ".join(cells) + " |")
    naive = result["naive"]
    print(
        f"| naive, full forward per edge (timed on {len(picked)} edges, extrapolated) | "
        f"{naive['forward_equivalents_per_edge']:.3f} | {naive['whole_run_seconds_extrapolated']:.0f} | 1.0x |"
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
