"""What a resume costs, and how well the progress bar's ETA holds, on one search.

    OMP_NUM_THREADS=1 python benchmarks/resume_eta.py --model benchmarks/models/deep-induction --task induction \
        --half 16 --n 8 --threshold 0.05
    OMP_NUM_THREADS=1 python benchmarks/resume_eta.py --model random-gpt2:12x768x12 --task ioi --n 16 --threshold 0.05 \
        --eta-only

ETA: an uninterrupted search records, at every finished receiver, the seconds left that the progress bar shows
(``ReceiverDone.eta_s``, acdc/eta.py: predicted cones once the attribution pass has run) and, for comparison, two
earlier estimates: the receivers' depth and known liveness at the pace so far (``eta.Remaining``), and elapsed time
x work left / work done, a receiver's work being its edges times its depth, whether or not it is pruned. Errors are
taken after the first tenth of the search's time: of the predicted total (elapsed + ETA) against the actual total,
and of the predicted time left against the time that actually remained (which grows as the end nears). The search's
clock leaves out the attribution pass (reported apart): it runs once, and no estimate counts it.

Resume: a search with a checkpoint is interrupted after half of its receivers' time, then resumed twice from the same
files: once with its state file (load it, replay the decisions after it) and once without (every decision replayed,
as before state files). Both are timed against the setup alone, and the state writes of the interrupted run are
timed. All in one process; prints a table and writes JSON.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.acdc import add_model_arguments, load_model_and_task, measured_with, results_path


class Stop(Exception):
    """Raised from the callback to interrupt the search at a chosen receiver."""


def _errors(points: list[tuple[float, float]], end: float) -> dict[str, float]:
    """Largest and median relative errors of (elapsed, predicted seconds left) after the first tenth of ``end``."""
    late = [(t, left) for t, left in points if t >= 0.1 * end and end - t > 1e-9]
    total = [abs(t + left - end) / end for t, left in late]
    remaining = [abs(left - (end - t)) / (end - t) for t, left in late]
    return {
        "total_largest": max(total),
        "total_median": statistics.median(total),
        "remaining_largest": max(remaining),
        "remaining_median": statistics.median(remaining),
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model="benchmarks/models/deep-induction", n=8)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--shared", default="", help="what else ran on the machine meanwhile, recorded in the JSON")
    parser.add_argument(
        "--eta-only", action="store_true", help="the uninterrupted search alone (a large model's resumes take long)"
    )
    args = parser.parse_args()
    args.out = results_path(args, "resume_eta")

    from pahq_fx.acdc import search as search_module

    model, task = load_model_and_task(args)
    started = time.perf_counter()
    session = search_module.prepare(model, task, precision="fp32", allow_weak_task=True)
    setup_s = time.perf_counter() - started
    runtime, edges = session.runtime, session.edges
    from pahq_fx.acdc import eta as eta_module
    from pahq_fx.acdc.eta import Remaining

    attribution, attribution_s = eta_module.edge_attribution, [0.0]

    def timed_attribution(*a, **k):  # its time is the bar's own overhead: the clock below leaves it out
        began = time.perf_counter()
        try:
            return attribution(*a, **k)
        finally:
            attribution_s[0] += time.perf_counter() - began

    eta_module.edge_attribution = timed_attribution
    old_work = [len(r.senders) * runtime.index.cone_steps(row) for row, r in enumerate(edges.receivers)]
    depth, depth_units, counted = Remaining(runtime, edges), [0.0], [0]
    # (elapsed, the bar's ETA, the depth-and-liveness estimate's, the edges-times-depth one's)
    finished: list[tuple[float, float | None, float | None, float]] = []
    start = time.perf_counter()

    def record(done) -> None:
        elapsed = time.perf_counter() - start - attribution_s[0]
        depth_units[0] += depth.finish(done.index - 1, done.queries > counted[0])
        counted[0] = done.queries
        left = depth.expected(range(done.index, len(edges.receivers)))
        by_depth = left * elapsed / depth_units[0] if depth_units[0] > 0 else None
        share = sum(old_work[: done.index]) / sum(old_work)
        finished.append((elapsed, done.eta_s, by_depth, elapsed * (1 - share) / share))

    circuit = search_module.search(session, args.threshold, progress=False, callback=record)
    end = finished[-1][0]
    eta = _errors([(t, left) for t, left, _, _ in finished if left is not None], end)
    by_depth = _errors([(t, left) for t, _, left, _ in finished if left is not None], end)
    earlier = _errors([(t, old) for t, _, _, old in finished], end)
    half = next(i for i, (t, *_) in enumerate(finished) if t >= end / 2)
    searched_to_half = finished[half][0]
    result = {
        "arguments": vars(args),
        "measured_with": measured_with(),
        "receivers": len(edges.receivers),
        "edges_kept": len(circuit.edges),
        "setup_s": setup_s,
        "search_s": end,
        "attribution_s": attribution_s[0],
        "eta": eta,
        "eta_depth_and_liveness": by_depth,
        "eta_earlier_bar": earlier,
        "trajectory": [[round(x, 3) if x is not None else None for x in point] for point in finished],
    }
    print(f"model {args.model}, {len(edges.receivers)} receivers, threshold {args.threshold}, {len(circuit.edges)} edges kept")
    if not args.eta_only:
        result.update(_resumes(args, model, task, circuit, half, searched_to_half))
    print("| ETA after a tenth | total: largest, median | time left: largest, median |")
    print("| --- | --- | --- |")
    estimates = (("predicted cones (now)", eta), ("depth and liveness (before)", by_depth), ("edges x depth", earlier))
    for name, errors in estimates:
        print(
            f"| {name} | {errors['total_largest']:.0%}, {errors['total_median']:.0%} "
            f"| {errors['remaining_largest']:.0%}, {errors['remaining_median']:.0%} |"
        )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _resumes(args, model, task, circuit, half: int, searched_to_half: float) -> dict:
    """Interrupt a checkpointed search after receiver ``half``, resume it with and without its state file."""
    import pahq_fx
    from pahq_fx.acdc import search as search_module
    from pahq_fx.acdc.checkpoint import Checkpoint

    writes: list[float] = []
    loads: list[float] = []
    resumes: list[float] = []
    save_state, load_state, resume = Checkpoint.save_state, Checkpoint.load_state, search_module.resume

    def timed_save(self, *a):
        began = time.perf_counter()
        save_state(self, *a)
        writes.append(time.perf_counter() - began)

    def timed_load(self, *a):
        began = time.perf_counter()
        result = load_state(self, *a)
        loads.append(time.perf_counter() - began)
        return result

    def timed_resume(*a):
        began = time.perf_counter()
        result = resume(*a)
        resumes.append(time.perf_counter() - began)
        return result

    Checkpoint.save_state, Checkpoint.load_state, search_module.resume = timed_save, timed_load, timed_resume
    run = dict(threshold=args.threshold, precision="fp32", progress=False, allow_weak_task=True)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, backup = Path(folder) / "checkpoint.json", Path(folder) / "backup"
        state_file = checkpoint.with_name("checkpoint.state.safetensors")

        def stop_at_half(done) -> None:
            if done.index == half + 1:
                raise Stop

        with contextlib.suppress(Stop):
            pahq_fx.discover(model, task, checkpoint=checkpoint, callback=stop_at_half, **run)
        saved = json.loads(checkpoint.read_text())
        interrupted_writes = list(writes)  # the resumes write states of their own
        state_bytes = state_file.stat().st_size
        backup.mkdir()
        for path in (checkpoint, state_file):
            shutil.copy(path, backup / path.name)

        def resumed(with_state: bool) -> tuple[float, float]:
            for path in (checkpoint, state_file):
                shutil.copy(backup / path.name, path)
            if not with_state:
                state_file.unlink()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again = pahq_fx.discover(model, task, checkpoint=checkpoint, **run)
            assert [e.effect for e in again.edges] == [e.effect for e in circuit.edges], "a resume changed the circuit"
            return again.stats.setup_s - resumes[-1], resumes[-1]  # its setup; loading the state and replaying the rest

        setup_with, with_state = resumed(True)
        load_s = loads[-1]
        setup_without, without_state = resumed(False)
    print(
        "| setup s | resume: setup + state (load) s | x setup | resume replaying all: setup + replay s | x setup "
        "| state MB, writes, share of search |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {setup_with:.2f} + {with_state:.2f} ({load_s:.3f}) | {(setup_with + with_state) / setup_with:.2f} "
        f"| {setup_without:.2f} + {without_state:.2f} | {(setup_without + without_state) / setup_without:.2f} "
        f"| {state_bytes / 1e6:.1f}, {len(interrupted_writes)}, {sum(interrupted_writes) / searched_to_half:.1%} |"
    )
    return {
        "searched_to_half_s": searched_to_half,
        "interrupted_after_receivers": len(saved["done"]),
        "state_holds_receivers": saved["state"]["receivers"],
        "state_bytes": state_bytes,
        "state_writes": len(interrupted_writes),
        "state_write_s_median": statistics.median(interrupted_writes),
        "state_writes_share_of_search": sum(interrupted_writes) / searched_to_half,
        "resume_setup_s": [setup_with, setup_without],
        "resume_with_state_s": with_state,
        "state_load_s": load_s,
        "resume_replaying_everything_s": without_state,
        "resume_with_state_over_setup": (setup_with + with_state) / setup_with,
        "resume_replaying_everything_over_setup": (setup_without + without_state) / setup_without,
        "replay_everything_over_search_to_half": without_state / searched_to_half,
    }


if __name__ == "__main__":
    main()
