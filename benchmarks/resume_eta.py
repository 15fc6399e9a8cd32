"""What a resume costs, and how well the progress bar's ETA holds, on one search.

    OMP_NUM_THREADS=1 python benchmarks/resume_eta.py --model benchmarks/models/deep-induction --task induction \
        --half 16 --n 8 --threshold 0.05

A search with a checkpoint is interrupted after half of its estimated work, then resumed: the resume's setup and its
replay of the checkpointed decisions are timed against the setup and the search time they stand in for. The ETA is
what the progress bar shows (elapsed time x remaining work / work done, the work weights of ``search._work``) at
every finished receiver of an uninterrupted run, against the time that actually remained; the table gives its
largest error after the first tenth of the run. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import contextlib

from benchmarks.acdc import add_model_arguments, load_model_and_task, results_path


class Stop(Exception):
    """Raised from the callback to interrupt the search at a chosen receiver."""


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="benchmarks/models/deep-induction", n=8)
    parser.add_argument("--threshold", type=float, default=0.05)
    args = parser.parse_args()
    args.out = results_path(args, "resume_eta")

    import pahq_fx
    from pahq_fx.acdc import search as search_module

    model, task = load_model_and_task(args)
    session = search_module.prepare(model, task, precision="fp32", allow_weak_task=True)
    work = search_module._work(session.runtime, session.edges)
    total = sum(work)
    finished: list[tuple[float, float]] = []  # (seconds since the search began, share of the work done)
    start = time.perf_counter()

    def record(done) -> None:
        finished.append((time.perf_counter() - start, sum(work[: done.index]) / total))

    search_module.search(session, args.threshold, progress=False, callback=record)
    end = finished[-1][0]
    errors = [
        abs(elapsed * (1 - share) / share - (end - elapsed)) / max(end - elapsed, 1e-9)
        for elapsed, share in finished
        if 0.1 <= share < 0.999
    ]
    half = next(i for i, (_, share) in enumerate(finished) if share >= 0.5)
    searched_to_half = finished[half][0]

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "checkpoint.json"

        def stop_at_half(done) -> None:
            if done.index == half + 1:
                raise Stop

        with contextlib.suppress(Stop):
            pahq_fx.discover(
                model,
                task,
                threshold=args.threshold,
                precision="fp32",
                progress=False,
                allow_weak_task=True,
                checkpoint=checkpoint,
                callback=stop_at_half,
            )
        resumed_at = []
        began = time.perf_counter()
        circuit = pahq_fx.discover(
            model,
            task,
            threshold=args.threshold,
            precision="fp32",
            progress=False,
            allow_weak_task=True,
            checkpoint=checkpoint,
            callback=lambda d: resumed_at.append(time.perf_counter() - began),
        )
    setup = circuit.stats.setup_s  # the resumed run's setup and replay, before its first receiver
    result = {
        "arguments": vars(args),
        "receivers": len(work),
        "setup_s": session.setup_s,
        "search_s": end,
        "searched_to_half_s": searched_to_half,
        "resume_setup_and_replay_s": setup,
        "replay_s": setup - session.setup_s,
        "eta_largest_error_after_a_tenth": max(errors, default=0.0),
        "eta_median_error_after_a_tenth": sorted(errors)[len(errors) // 2] if errors else 0.0,
    }
    print(f"model {args.model}, {len(work)} receivers, threshold {args.threshold}")
    print(
        "| setup s | search s | search to half s | resume: setup + replay s | replay / search to half "
        "| ETA error after a tenth: largest, median |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {session.setup_s:.2f} | {end:.2f} | {searched_to_half:.2f} | {setup:.2f} "
        f"| {(setup - session.setup_s) / searched_to_half:.2f} | {result['eta_largest_error_after_a_tenth']:.0%}, "
        f"{result['eta_median_error_after_a_tenth']:.0%} |"
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
