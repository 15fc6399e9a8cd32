"""The same ACDC run with this checkout and with an earlier revision of pahq_fx, side by side.

    python benchmarks/versus_revision.py --revision a5bc024 --model llama-ioi --task ioi --n 32 --threshold 0.05

The revision is extracted with ``git archive`` into a temporary folder; both run the same model (a shipped name, a
checkpoint directory, or random-gpt2:LxDxH, saved once so both load the same weights) on the same task (generated
once by this checkout and saved with ``Task.save``), eagerly, each configuration in a fresh process, interleaved
over repeats. Forward-equivalents are measured in each process (docs/runtime.md). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = r"""
import inspect, json, resource, statistics, sys, time, torch
import pahq_fx
from pahq_fx import zoo
model, _ = zoo.load(sys.argv[1])
task = pahq_fx.Task.load(sys.argv[2])
times = []
with torch.no_grad():
    for _ in range(6):
        start = time.perf_counter(); model(input_ids=task.clean_input_ids, use_cache=False)
        times.append(time.perf_counter() - start)
forward = statistics.median(times[1:])
# Speed is measured on random models too, whose tasks the task check (newer revisions) would stop.
weak = {"allow_weak_task": True} if "allow_weak_task" in inspect.signature(pahq_fx.discover).parameters else {}
circuit = pahq_fx.discover(model, task, threshold=float(sys.argv[3]), precision=sys.argv[4], progress=False,
                           compile=False, **weak)
s = circuit.stats
search = s.wall_s - s.setup_s
print(json.dumps({"wall_s": s.wall_s, "setup_s": s.setup_s, "search_s": search, "queries": s.queries,
                  "forward_s": forward, "forward_equivalents": search / s.queries / forward,
                  "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "edges": sorted([e.sender, e.receiver] for e in circuit.edges)}))
"""


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, Path]:
    """(old source tree, model directory, task file)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.acdc import load_model
    from pahq_fx.tasks import make_task
    from pahq_fx.zoo import available

    old = workdir / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    model, tokenizer = load_model(args.model)
    shipped = available()
    if args.model in shipped:
        model_dir = shipped[args.model].path
    elif Path(args.model).is_dir():
        model_dir = Path(args.model).resolve()  # the runs start in their own trees
    else:
        model_dir = workdir / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    options = {"half": args.half} if args.half else {}
    task_file = workdir / "task.safetensors"
    make_task(args.task, tokenizer, n=args.n, seed=0, **options).save(task_file)
    return old, model_dir, task_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True, help="git revision to compare with, e.g. a5bc024")
    parser.add_argument("--model", default="llama-ioi")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--half", type=int, default=0, help="induction: length of the repeated half")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--precisions", default="fp32,bf16,fp8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "versus_revision.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old, model_dir, task_file = prepare(args, Path(tmp))
        trees = {args.revision: old, "this checkout": ROOT}
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeats):
            for precision in args.precisions.split(","):
                for name, tree in trees.items():
                    done = subprocess.run(
                        [sys.executable, "-c", RUN, str(model_dir), str(task_file), str(args.threshold), precision],
                        check=False,
                        capture_output=True,
                        text=True,
                        cwd=tree,
                        env=dict(os.environ, PYTHONPATH=str(tree)),
                    )
                    if done.returncode != 0:
                        sys.exit(f"{name} {precision} failed:\n{done.stderr[-3000:]}")
                    runs.setdefault((name, precision), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(
                        f"repeat {repeat + 1}/{args.repeats} {name} {precision}: {runs[(name, precision)][-1]['wall_s']:.2f}s",
                        file=sys.stderr,
                    )
    medians = {}
    for key, results in runs.items():
        best = dict(results[0])
        for field in ("wall_s", "setup_s", "search_s", "forward_s", "forward_equivalents", "peak_memory_mb"):
            best[field] = statistics.median(r[field] for r in results)
        medians[key] = best
    print(f"model {args.model}, task {args.task}, n={args.n}, threshold {args.threshold}, eager, median of {args.repeats}")
    print(
        "| precision | revision | wall s | setup s | search s | queries | fwd-equiv / query | peak MB | edges "
        "| search speed-up | wall speed-up | same circuit |"
    )
    print("|" + " --- |" * 12)
    for precision in args.precisions.split(","):
        before = medians[(args.revision, precision)]
        for name in trees:
            r = medians[(name, precision)]
            print(
                f"| {precision} | {name} | {r['wall_s']:.2f} | {r['setup_s']:.2f} | {r['search_s']:.3f} | {r['queries']} "
                f"| {r['forward_equivalents']:.3f} | {r['peak_memory_mb']:.0f} | {len(r['edges'])} "
                f"| {before['search_s'] / r['search_s']:.1f}x | {before['wall_s'] / r['wall_s']:.2f}x "
                f"| {'yes' if r['edges'] == before['edges'] else 'no'} |"
            )
    Path(args.out).write_text(
        json.dumps(
            {"arguments": vars(args), "results": [dict(r, revision=n, precision=p) for (n, p), r in medians.items()]}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
