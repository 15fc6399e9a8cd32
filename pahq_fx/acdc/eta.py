"""What is left of a search, for the progress bar: its bar and its ETA.

A receiver's cost is its queries times its depth (the steps its cone may run) plus :data:`QUERY_OVERHEAD`, in
units the run's own measured pace turns into seconds: the bar runs with ``smoothing=0``, so its ETA is the units
left times the seconds per unit measured so far. What is not known in advance is which receivers will still be live
(a pruned receiver makes no query); most of a sparse run's receivers are not. A receiver is surely live once its
node keeps an edge into a finished receiver, and a receiver of the step being searched that is not, is dead (every
edge out of its node is decided). For a lower one that is not known yet, the chance is measured: of the receivers
that were not known to be live when the search entered the step above theirs, the share that was.
"""

from __future__ import annotations

from .edges import EdgeGraph
from .runtime import PatchingRuntime

# What a query costs besides its cone (baseline bookkeeping, the final read and the metric, Python), in steps of a
# cone: with it, shallow receivers' seconds per unit match deep ones', so the pace measured early holds later. Four
# steps fitted a sparse and a dense search on the twelve-layer model best (benchmarks/resume_eta.py).
QUERY_OVERHEAD = 4


class Remaining:
    """The cost units of finished receivers and the expected units of the rest, from the decisions so far."""

    def __init__(self, runtime: PatchingRuntime, edges: EdgeGraph) -> None:
        self._runtime = runtime
        self._depth = [runtime.index.cone_steps(row) + QUERY_OVERHEAD for row in range(len(edges.receivers))]
        self._queries = [len(r.senders) + 1 for r in edges.receivers]  # its edges and the baseline
        self._keeps = [False] * len(edges.senders)  # the sender keeps an edge into a finished receiver
        rows = range(len(edges.receivers))
        self._next_rows = {  # search order runs from the output down: the rows of the step after each step
            runtime.index.row_step[row]: [r for r in rows if runtime.index.row_step[r] == runtime.index.row_step[row + 1]]
            for row in rows[:-1]
            if runtime.index.row_step[row + 1] != runtime.index.row_step[row]
        }
        self._step: int | None = None
        self._unknown: set[int] = set()  # rows of the next step not known to be live when the search entered this one
        self._unknown_seen = self._unknown_live = 0

    def _known_live(self, row: int) -> bool:
        return row == self._runtime.index.final_row or any(self._keeps[s] for s in self._runtime.index.feeding[row])

    def finish(self, row: int, searched: bool) -> float:
        """Record finished receiver ``row`` (``searched``: its edges were tested, not pruned); its cost units."""
        if row in self._unknown:
            self._unknown.discard(row)
            self._unknown_seen += 1
            self._unknown_live += searched
        step = self._runtime.index.row_step[row]
        if step != self._step:
            self._step = step
            self._unknown |= {r for r in self._next_rows.get(step, []) if not self._known_live(r)}
        if not searched:
            return 0.0
        for s in self._runtime.edge_state.kept_in[row]:
            self._keeps[s] = True
        return float(self._queries[row] * self._depth[row])

    def expected(self, rows: range) -> float:
        """The expected cost units of receivers ``rows`` (the ones left, in search order: from the output down)."""
        share = self._unknown_live / (self._unknown_seen + 1)
        first = self._runtime.index.row_step[rows[0]] if rows else None
        total = 0.0
        for row in rows:
            live = 1.0 if self._known_live(row) else 0.0 if self._runtime.index.row_step[row] == first else share
            total += live * self._queries[row] * self._depth[row]
        return total
