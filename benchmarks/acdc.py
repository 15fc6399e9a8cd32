"""End-to-end ACDC: the defaults, fp32, fp8, bf16 and a naive baseline, side by side, each in a fresh process.

    python benchmarks/acdc.py --model gpt2-induction --task induction --threshold 0.05 --repeats 2
    python benchmarks/acdc.py --model gpt2-induction-8h --task induction --half 32 --n 48 --threshold 0.01
    python benchmarks/acdc.py --model random-gpt2:6x256x8 --task ioi --n 16 --threshold 0 --configs fp32,naive

``--model``: a shipped model, a local checkpoint directory, or ``random-gpt2:LAYERSxD_MODELxHEADS`` (a randomly
initialised GPT-2, seed 0, with the shipped word tokenizer). "auto" is ``discover``'s defaults (precision and
compile chosen for the device). The naive baseline is the simple reference implementation of the tests
(tests/acdc_reference.py): a full forward per edge query, receiver inputs rebuilt sender by sender, no caching,
no compile. Forward-equivalents per query = (search seconds / queries) / (one eager forward of the original model
on the clean batch), both measured in the same process (docs/runtime.md). Configurations run interleaved
(round-robin over repeats); the table shows medians and ratios from this one run. Peak memory is the resident set
size of each configuration's own process. Writes JSON next to the table.

``--peer auto-circuit`` adds auto-circuit's ACDC on the same weights and task (GPT-2 models), run in its own
environment by benchmarks/peer_autocircuit.py (build it with benchmarks/peer/setup.sh); its forward-equivalents
use one eager forward timed in its own process, and its queries are every edge (it does not prune nodes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("auto", "auto-spec", "fp32", "fp32-spec", "fp8", "bf16", "bf16-spec", "naive")
SPECULATIVE = "-spec"  # a config's suffix: candidate batches (speculation="adaptive") instead of one query at a time
PEER = "auto-circuit"


def load_model(spec: str):
    """(model, tokenizer) for a shipped name, a checkpoint directory, or random-gpt2:LxDxH."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pahq_fx import zoo
    from pahq_fx.tasks import build_tokenizer

    if not spec.startswith("random-gpt2:"):
        return zoo.load(spec)
    layers, d_model, heads = (int(x) for x in spec.split(":", 1)[1].split("x"))
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_embd=d_model,
        n_head=heads,
        vocab_size=len(tokenizer),
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval(), tokenizer


def measured_with() -> dict:
    """What a result was measured with, recorded in every JSON here (benchmarks/tables.py prints it under the table):
    versions, the machine, and the trace cache setting, which changes the setup's time."""
    import platform

    import torch
    import torchao
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), cpu
        )
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "PAHQ_FX_TRACE_CACHE": os.environ.get("PAHQ_FX_TRACE_CACHE"),
    }
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def add_model_arguments(parser: argparse.ArgumentParser, model: str, n: int) -> None:
    """The arguments every benchmark here shares: the model, its task, and where the JSON goes."""
    parser.add_argument("--model", default=model)
    parser.add_argument("--task", default="induction")
    parser.add_argument("--half", type=int, default=0, help="induction: length of the repeated half")
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/BENCHMARK_MODEL.json)")


def results_path(args: argparse.Namespace, benchmark: str) -> str:
    name = Path(args.model).name if Path(args.model).is_dir() else args.model.replace(":", "_")
    return args.out or str(ROOT / "benchmarks" / "results" / f"{benchmark}_{name}.json")


def load_model_and_task(args: argparse.Namespace):
    """(model, task) of ``add_model_arguments``'s arguments, seeded."""
    import torch

    from pahq_fx.tasks import make_task

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    options = {"half": args.half} if args.half else {}
    return model, make_task(args.task, tokenizer, n=args.n, seed=0, **options)


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process; prints and returns its measurements."""
    import torch

    import pahq_fx
    from pahq_fx.acdc.run_info import eager_forward_seconds, peak_memory_mb

    model, task = load_model_and_task(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    task = pahq_fx.Task(
        *(
            t.to(device) if t is not None else None
            for t in (task.clean_input_ids, task.corrupted_input_ids, task.metric_mask, task.correct_ids, task.incorrect_ids)
        ),
        name=task.name,
    )
    if args.one == PEER:
        result = run_peer(args, model, task)
        wall = result["wall_s"]
    elif args.one == "naive":
        sys.path.insert(0, str(ROOT))
        from tests.acdc_reference import ReferenceACDC

        forward_s = statistics.median(eager_forward_seconds(model, task.clean_input_ids))
        start = time.perf_counter()
        reference = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask)
        setup = time.perf_counter() - start
        counted = {"n": 0}
        kl = reference.kl

        def counting_kl(removed):
            if counted["n"] == args.naive_queries:  # a sample's end (0: the whole run)
                raise _Enough
            counted["n"] += 1
            return kl(removed)

        reference.kl = counting_kl
        if args.naive_queries:  # a sample: the reference's query costs the same whatever is removed
            with contextlib.suppress(_Enough):
                reference.run(args.threshold)
            edges = None
        else:
            edges, _ = reference.run(args.threshold)
        wall = time.perf_counter() - start
        result = {
            "edges": None if edges is None else sorted(map(list, edges)),
            "extrapolated": edges is None,
            "queries": counted["n"],
            "compilations": 0,
            "setup_s": setup,
            "compile_s": 0.0,
            "forward_s": forward_s,
            "state_bytes": 0,
            "precision": "fp32",
            "execution": "eager",
        }
        result["forward_equivalents"] = (wall - setup) / counted["n"] / forward_s
    else:
        compile = {"auto": "auto", "on": True, "off": False}[args.compile]
        precision = args.one.removesuffix(SPECULATIVE)
        # allow_weak_task: speed is measured on random models too, whose tasks the task check would stop.
        circuit = pahq_fx.discover(
            model,
            task,
            threshold=args.threshold,
            precision=precision,
            progress=False,
            compile="auto" if precision == "auto" else compile,
            allow_weak_task=True,
            speculation="adaptive" if args.one.endswith(SPECULATIVE) else "off",
        )
        s = circuit.stats
        wall = s.wall_s
        result = {
            "edges": sorted([e.sender, e.receiver] for e in circuit.edges),
            "queries": s.queries,
            "compilations": s.compilations,
            "setup_s": s.setup_s,
            "compile_s": s.compile_s,
            "forward_s": s.forward_s,
            "forward_equivalents": s.forward_equivalents,
            "state_bytes": s.state_bytes,
            "precision": circuit.precision,
            "execution": s.execution,
            "evaluated": s.evaluated,
            "hit_rate": s.hit_rate,
            "candidates_per_batch": s.candidates_per_batch,
            "near_threshold": s.near_threshold,
        }
    search = wall - result["setup_s"]
    # before the evaluation below, which is not part of the run; the peer's is its own process's
    peak = result.pop("peak_memory_mb_peer", None) or peak_memory_mb(device)
    from pahq_fx.acdc.evaluation import evaluate_circuit

    edges = result["edges"]
    circuit_kl = None if edges is None else evaluate_circuit({tuple(e) for e in edges}, model, task).circuit
    result.update(
        config=args.one,
        device=str(device),
        wall_s=wall,
        search_s=search,
        circuit_kl=circuit_kl,
        queries_per_second=result["queries"] / search,
        peak_memory_mb=peak,
    )
    print(json.dumps(result))
    return result


class _Enough(Exception):
    """Ends the naive reference's run once its sample of queries is timed."""


def _extrapolate_naive(medians: list[dict]) -> None:
    """A sampled naive run's time per query times the queries of fp32's run (the same search, the same queries)."""
    naive = next((r for r in medians if r["config"] == "naive" and r.get("extrapolated")), None)
    if naive is None:
        return
    reference = next((r for r in medians if r["config"] == "fp32"), None) or next(r for r in medians if r is not naive)
    per_query = naive["search_s"] / naive["queries"]
    naive.update(
        queries_measured=naive["queries"],
        queries=reference["queries"],
        search_s=per_query * reference["queries"],
        wall_s=naive["setup_s"] + per_query * reference["queries"],
        queries_per_second=1 / per_query,
    )


def run_peer(args: argparse.Namespace, model, task) -> dict:
    """auto-circuit's ACDC on the same weights and task, in its own environment (benchmarks/peer_autocircuit.py)."""
    import tempfile

    import pahq_fx
    from pahq_fx import zoo
    from pahq_fx.acdc import EdgeGraph

    if type(model).__name__ != "GPT2LMHeadModel":
        sys.exit(f"the auto-circuit peer runs GPT-2 models here, not {type(model).__name__}")
    python = Path(os.environ.get("PEER_PYTHON", ROOT / "benchmarks" / "peer" / ".venv" / "bin" / "python"))
    if not python.exists():
        sys.exit(f"no peer environment at {python}: run benchmarks/peer/setup.sh (or set PEER_PYTHON)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shipped = zoo.available()
        checkpoint = shipped[args.model].path if args.model in shipped else Path(args.model)
        if not checkpoint.is_dir():
            checkpoint = folder / "model"
            model.save_pretrained(checkpoint)
        task.save(folder / "task.safetensors")
        graph = EdgeGraph(pahq_fx.transform(model, precision="fp32", compile=False).head_graph)
        (folder / "order.json").write_text(json.dumps([[e.sender, e.receiver] for e in graph.edges()]))
        command = [
            str(python),
            str(ROOT / "benchmarks" / "peer_autocircuit.py"),
            "--checkpoint",
            str(checkpoint),
            "--task",
            str(folder / "task.safetensors"),
            "--threshold",
            str(args.threshold),
            "--edge-order",
            str(folder / "order.json"),
            "--out",
            str(folder / "peer.json"),
        ]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"auto-circuit failed:\n{done.stderr[-3000:]}")
        peer = json.loads((folder / "peer.json").read_text())
    return {
        "edges": peer["edges"],
        "queries": peer["queries"],
        "compilations": 0,
        "setup_s": peer["setup_s"],
        "compile_s": 0.0,
        "forward_s": peer["forward_s"],
        "state_bytes": 0,
        "precision": "fp32",
        "execution": "eager",
        "wall_s": peer["wall_s"],
        "peak_memory_mb_peer": peer["peak_memory_mb"],
        "forward_equivalents": peer["search_s"] / peer["queries"] / peer["forward_s"],
    }


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def table(rows: list[dict]) -> str:
    by = {r["config"]: r for r in rows}
    naive = by.get("naive")
    edge_sets = {name: {tuple(e) for e in r["edges"]} for name, r in by.items() if r["edges"] is not None}
    head = (
        "| config | precision | execution | wall s | setup s | search s | compile s | queries | evaluated "
        "| per batch | hit rate | fwd-equiv / query | peak MB | state MB | edges | circuit KL | Jaccard vs fp32 "
        "| Jaccard vs naive | wall speed-up vs naive |"
    )
    lines = [head, "|" + " --- |" * 19]
    for name in (*CONFIGS, PEER):
        if name not in by:
            continue
        r = by[name]
        if name not in edge_sets:  # a sampled naive run: its time extrapolated, its circuit not found
            vs_fp32 = vs_naive = "-"
        else:
            vs_fp32 = f"{_jaccard(edge_sets[name], edge_sets['fp32']):.3f}" if "fp32" in edge_sets else "-"
            vs_naive = f"{_jaccard(edge_sets[name], edge_sets['naive']):.3f}" if "naive" in edge_sets else "-"
        speedup = f"{naive['wall_s'] / r['wall_s']:.1f}x" if naive else "-"
        lines.append(
            f"| {name} | {r['precision']} | {r['execution'].split(' (')[0]} | {r['wall_s']:.2f} | {r['setup_s']:.2f} "
            f"| {r['search_s']:.2f} | {r['compile_s']:.1f} | {r['queries']} | {r.get('evaluated') or '-'} "
            f"| {_number(r.get('candidates_per_batch'), '.1f')} | {_number(r.get('hit_rate'), '.0%')} "
            f"| {r['forward_equivalents']:.3f} "
            f"| {r['peak_memory_mb']:.0f} | {r['state_bytes'] / 2**20:.1f} | {len(edge_sets.get(name, ())) or '-'} "
            f"| {_number(r['circuit_kl'], '.4f')} "
            f"| {vs_fp32} | {vs_naive} "
            f"| {speedup} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="gpt2-induction", n=16)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="for the explicit-precision configs ('auto' always uses discover's defaults)",
    )
    parser.add_argument("--peer", choices=(PEER,), help="add auto-circuit's ACDC (needs benchmarks/peer/setup.sh)")
    parser.add_argument(
        "--naive-queries",
        type=int,
        default=0,
        help="time this many of the naive reference's queries and extrapolate its run to fp32's queries "
        "(where a whole naive run would take hours)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = results_path(args, "acdc")
    if args.one:
        run_one(args)
        return
    configs = args.configs.split(",") + ([args.peer] if args.peer else [])
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            command = [
                sys.executable,
                __file__,
                "--one",
                config,
                "--model",
                args.model,
                "--task",
                args.task,
                "--threshold",
                str(args.threshold),
                "--n",
                str(args.n),
                "--half",
                str(args.half),
                "--compile",
                args.compile,
                "--naive-queries",
                str(args.naive_queries),
            ]
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            runs[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {config}: {runs[config][-1]['wall_s']:.2f}s", file=sys.stderr)
    medians = []
    for results in runs.values():
        best = dict(results[0])
        for key in (
            "wall_s",
            "setup_s",
            "search_s",
            "compile_s",
            "forward_s",
            "forward_equivalents",
            "queries_per_second",
            "peak_memory_mb",
        ):
            best[key] = statistics.median(r[key] for r in results)
        medians.append(best)
    _extrapolate_naive(medians)
    print(
        f"device: {medians[0]['device']}; model {args.model}, task {args.task}, threshold {args.threshold}, "
        f"n={args.n}, repeats={args.repeats}, compile={args.compile}; one eager forward "
        f"{statistics.median(r['forward_s'] for r in medians) * 1000:.2f} ms"
    )
    print(table(medians))
    Path(args.out).write_text(
        json.dumps(
            {
                "arguments": {k: v for k, v in vars(args).items() if k != "one"},
                "environment": measured_with(),
                "results": medians,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
