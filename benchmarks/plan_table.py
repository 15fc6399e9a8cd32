"""The plan of an ACDC run for the four MIB models at N = 1500 tokens (100 prompts x 15 tokens, one metric row per
prompt), on one 80 GB GPU and on this machine's CPU, from their published sizes alone (no hub access, no weights).

    python benchmarks/plan_table.py [--calibrate]

prints a markdown table (docs/runtime.md, "A plan before the run") and writes benchmarks/results/plan_table.json.
``--calibrate`` also times GPT-2 small's shape (random weights) on this CPU at N = 1500, a few layers sampled, the
others interpolated: the extrapolated time of a whole dense run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pahq_fx.acdc import plan as planning

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30
BATCH, SEQ = 100, 15
# One H100 80GB as this project's device machines lend it: about 78 GiB of GPU memory free to a process.
GPU_BYTES = 78 * GiB

MODELS = {
    "GPT-2 small": GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "Qwen2.5-0.5B": Qwen2Config(
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_size=896,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "Gemma-2-2B": Gemma2Config(
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_size=2304,
        intermediate_size=9216,
        vocab_size=256000,
        tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": LlamaConfig(
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=4096,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def _g(n: float) -> str:
    return f"{n / GiB:.1f}"


def row(name: str, plan: planning.Plan, where: str) -> dict:
    m = plan.memory
    bf16, fp8 = plan.projections["bf16"], plan.projections["fp8"]
    return {
        "model": name,
        "where": where,
        "max_memory_gib": plan.max_memory / GiB,
        "edges": plan.edges,
        "receivers": plan.receivers,
        "queries_upper_bound": plan.queries,
        "weights_gib": m.weights / GiB,
        "split_copies_gib": m.split_weights / GiB,
        "caches_gib": m.cache_bytes / GiB,
        "state_start_gib": m.state_start / GiB,
        "state_bound_gib": m.state_bound / GiB,
        "query_gib": m.query / GiB,
        "setup_peak_gib": m.setup_peak / GiB,
        "peak_dense_gib": m.peak / GiB,
        "peak_bound_gib": m.peak_bound / GiB,
        "fits_dense": plan.fits_dense,
        "fits_any_threshold": plan.fits,
        "largest_batch_any_threshold": plan.largest_batch if not plan.fits else BATCH,
        "largest_batch_dense": planning._largest_batch(
            plan.geometry, plan.workload, "fp32", plan.max_memory, "dense", plan.memory.candidates
        )
        if not plan.fits_dense
        else BATCH,
        "bf16_peak_dense_gib": bf16.peak / GiB,
        "bf16_peak_bound_gib": bf16.peak_bound / GiB,
        "fp8_peak_dense_gib": fp8.peak / GiB,
        "fp8_peak_bound_gib": fp8.peak_bound / GiB,
        # receiver inputs recomputed (benchmarks/receiver_inputs.py measures the mode): the peak bound per storage
        "recomputed_peak_bound_gib": {
            s: plan.projections[planning.choice_label(s, planning.RECOMPUTED)].peak_bound / GiB for s in planning.STORAGE
        },
        "recomputed_fits_any_threshold": [
            s
            for s in planning.STORAGE
            if plan.projections[planning.choice_label(s, planning.RECOMPUTED)].peak_bound <= plan.max_memory
        ],
        "plan": plan.to_json(),
    }


def table(rows: list[dict]) -> str:
    lines = [
        (
            f"| model | where | edges | queries (bound) | weights + copies | caches | dense query | peak, dense | peak bound "
            f"| fits in FP32 (dense / any threshold) | prompts of {SEQ} that fit (dense / any) | peak, dense / bound, with "
            "bf16 storage | with fp8 storage | bound, receiver inputs recomputed: fp32 / bf16 / fp8 |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        fits = f"{'yes' if r['fits_dense'] else 'no'} / {'yes' if r['fits_any_threshold'] else 'no'}"
        lines.append(
            f"| {r['model']} | {r['where']} ({r['max_memory_gib']:.0f} GiB) | {r['edges']:,} | {r['queries_upper_bound']:,} "
            f"| {r['weights_gib'] + r['split_copies_gib']:.1f} GiB | {r['caches_gib']:.1f} GiB | {r['query_gib']:.1f} GiB "
            f"| {r['peak_dense_gib']:.1f} GiB | {r['peak_bound_gib']:.1f} GiB | {fits} "
            f"| {r['largest_batch_dense']} / {r['largest_batch_any_threshold']} "
            f"| {r['bf16_peak_dense_gib']:.1f} / {r['bf16_peak_bound_gib']:.1f} GiB "
            f"| {r['fp8_peak_dense_gib']:.1f} / {r['fp8_peak_bound_gib']:.1f} GiB "
            f"| {' / '.join(f'{v:.1f}' for v in r['recomputed_peak_bound_gib'].values())} GiB |"
        )
    return "\n".join(lines)


def calibrate_gpt2_small(cpu_bytes: int) -> dict:
    """GPT-2 small's shape with random weights on this CPU at N = 1500: the calibrated plan (layers 0, 6, 11)."""
    import torch
    from transformers import GPT2LMHeadModel

    import pahq_fx

    torch.manual_seed(0)
    model = GPT2LMHeadModel(MODELS["GPT-2 small"]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    task = pahq_fx.Task(
        torch.randint(0, 50257, (BATCH, SEQ), generator=gen), torch.randint(0, 50257, (BATCH, SEQ), generator=gen)
    )
    plan = planning.plan(model, task, precision="fp32", max_memory=cpu_bytes, queries_per_role=1, layers=[0, 6, 11], check=False)
    t = plan.timing
    return {
        "plan": plan.to_json(),
        "describe": plan.describe(),
        "total_s": t.total_s,
        "forward_s": t.forward_s,
        "forward_equivalents_per_query": t.forward_equivalents_per_query,
        "queries": t.queries,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calibrate", action="store_true", help="time GPT-2 small's shape on this CPU (minutes)")
    args = parser.parse_args()
    cpu_bytes, cpu_source = planning.free_memory("cpu")
    rows = []
    for name, config in MODELS.items():
        for where, limit, device in (("one 80 GB GPU", GPU_BYTES, "cuda"), ("this CPU", cpu_bytes, "cpu")):
            plan = planning.plan_from_config(config, BATCH, SEQ, max_memory=limit, name=name, device=device)
            rows.append(row(name, plan, where))
    print(
        f"N = {BATCH} x {SEQ} = {BATCH * SEQ} tokens, one metric row per prompt; CPU: {cpu_bytes / GiB:.1f} GiB ({cpu_source})\n"
    )
    print(table(rows))
    result = {
        "batch": BATCH,
        "seq": SEQ,
        "gpu_bytes": GPU_BYTES,
        "cpu_bytes": cpu_bytes,
        "cpu_source": cpu_source,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    path = RESULTS / "plan_table.json"
    if not args.calibrate and path.exists():  # a run without --calibrate keeps the last calibration
        previous = json.loads(path.read_text()).get("gpt2_small_cpu_calibration")
        if previous is not None:
            result["gpt2_small_cpu_calibration"] = previous
    if args.calibrate:
        print("\ncalibrating GPT-2 small's shape on this CPU (random weights, layers 0, 6, 11)", file=sys.stderr)
        result["gpt2_small_cpu_calibration"] = calibration = calibrate_gpt2_small(cpu_bytes)
        print()
        print(calibration["describe"])
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
