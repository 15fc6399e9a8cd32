"""What is left of a search, for the progress bar: its bar and its ETA, in seconds (:class:`Eta`).

Two estimates. On a long run, the cones the receivers left will have, predicted from an attribution pass, priced by
costs fitted to the receivers finished (:mod:`~pahq_fx.acdc.cone_estimate`): a query's cost is its cone, and the
first tenth of a search, near the output, does not foretell the cones of the deep receivers that come last. Before
that pass, and on runs too short for it to pay, :class:`Remaining`:

A receiver's cost is its queries times its depth (the steps its cone may run) plus :data:`QUERY_OVERHEAD`, in units
the run's own measured pace (seconds per unit so far) turns into seconds. What is not known in advance is which
receivers will still be live (a pruned receiver makes no query); most of a sparse run's receivers are not. A receiver
is surely live once its node keeps an edge into a finished receiver, and a receiver of the step being searched that
is not, is dead (every edge out of its node is decided). For a lower one that is not known yet, the chance is
measured: of the receivers that were not known to be live when the search entered the step above theirs, the share
that was.
"""

from __future__ import annotations

import time
import warnings
import weakref

import torch

from .attribution import MEMORY_SHARE, STEPS, attribution_bytes, edge_attribution
from .cone_estimate import ConeEstimate
from .edges import EdgeGraph
from .runtime import PatchingRuntime

# What a query costs besides its cone (baseline bookkeeping, the final read and the metric, Python), in steps of a
# cone: with it, shallow receivers' seconds per unit match deep ones', so the pace measured early holds later. Four
# steps fitted a sparse and a dense search on the twelve-layer model best (benchmarks/resume_eta.py).
QUERY_OVERHEAD = 4
# The attribution pass runs once the search is predicted to take this many times what the pass costs, estimated as
# this many forwards per point of its path (a forward and a backward through per-head copies of the stream).
ATTRIBUTION_PAYS = 10
FORWARDS_PER_POINT = 8
_ATTRIBUTIONS: weakref.WeakKeyDictionary[PatchingRuntime, list[torch.Tensor] | None] = weakref.WeakKeyDictionary()


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


class Eta:
    """The seconds a search has left, for its bar and its callback. From the receivers' depth and the pace so far
    (:class:`Remaining`) until the run is seen to be long enough for an attribution pass to pay (at most a
    :data:`ATTRIBUTION_PAYS`-th of it); after that also from predicted cones and fitted costs (:class:`ConeEstimate`),
    which hold where cheap receivers near the output come first and deep ones, costlier per query, come last."""

    def __init__(self, runtime: PatchingRuntime, edges: EdgeGraph, forward_s: float, attribute: bool) -> None:
        self._runtime, self._edges = runtime, edges
        self._depth = Remaining(runtime, edges)
        self._cones: ConeEstimate | None = None
        self._attribute = attribute
        self._attribution_estimate = STEPS * FORWARDS_PER_POINT * forward_s
        self.attribution_s = 0.0  # spent on the attribution pass: not search time
        self._finished: list[tuple[int, bool, float | None]] = []
        self.restored_units = self.units = self.seconds = 0.0

    def finish(self, row: int, searched: bool, seconds: float | None) -> None:
        """Record finished receiver ``row``; ``seconds``: its time in this process (``None``: restored from a
        checkpoint)."""
        units = self._depth.finish(row, searched)
        self._finished.append((row, searched, seconds))
        if seconds is None:
            self.restored_units += units
        else:
            self.units, self.seconds = self.units + units, self.seconds + seconds
        if self._cones is not None:
            try:
                self._cones.finish(row, searched, seconds)
            except Exception as error:  # an estimate: it never ends a search
                self._drop_cones(error)
        elif self._attribute and self._runtime.index.ends_step(row) and self._long_enough(row + 1):
            self._start_cones()

    def seconds_left(self, next_row: int) -> float | None:
        """Predicted seconds of receivers ``next_row`` on; ``None`` before anything is measured. With cones, the
        larger of the two estimates: each falls short where it fails (the depth estimate prices deep receivers at
        the pace of shallow ones; the cones miss the kept edges the attribution ranks low), and neither overshoots
        much once the first receivers are timed (benchmarks/resume_eta.py)."""
        rows = range(next_row, len(self._edges.receivers))
        by_depth = self._depth.expected(rows) * self.seconds / self.units if self.units > 0 else None
        try:
            by_cones = None if self._cones is None else self._cones.seconds_left(rows)
        except Exception as error:
            self._drop_cones(error)
            by_cones = None
        if by_cones is None or by_depth is None:
            return by_depth if by_cones is None else by_cones
        return max(by_cones, by_depth)

    def restored_seconds(self) -> float:
        """The restored receivers' work at this run's pace (what a resumed bar starts from)."""
        return self.restored_units * self.seconds / self.units if self.units > 0 else 0.0

    def _long_enough(self, next_row: int) -> bool:
        left = self.seconds_left(next_row)
        return left is not None and self.seconds + left >= ATTRIBUTION_PAYS * self._attribution_estimate

    def _start_cones(self) -> None:
        start = time.perf_counter()
        self._attribute = False
        try:
            if self._runtime not in _ATTRIBUTIONS:  # a sweep's searches share their runtime's
                _ATTRIBUTIONS[self._runtime] = edge_attribution(self._runtime, self._edges) if self._fits() else None
            scores = _ATTRIBUTIONS[self._runtime]
            if scores is not None:
                self._cones = ConeEstimate(self._runtime, self._edges, scores)
                for row, searched, seconds in self._finished:
                    self._cones.finish(row, searched, seconds)
        except Exception as error:
            _ATTRIBUTIONS[self._runtime] = None
            self._drop_cones(error)
        self.attribution_s += time.perf_counter() - start

    def _drop_cones(self, error: Exception) -> None:
        """Go on with the depth estimate alone, and say why: the ETA is worth less than the search."""
        self._cones = None
        warnings.warn(
            f"pahq_fx: the ETA's cone estimate failed ({type(error).__name__}: {error}); the progress bar goes on with "
            "the depth estimate alone",
            stacklevel=2,
        )

    def _fits(self) -> bool:
        from .plan import PlanError, free_memory

        try:
            free = free_memory(self._runtime.device)[0]
        except (PlanError, OSError):
            return False
        return attribution_bytes(self._runtime, self._edges) <= MEMORY_SHARE * free
