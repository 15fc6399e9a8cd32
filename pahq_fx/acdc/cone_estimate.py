"""The seconds a search has left, from the cones its receivers will have (the progress bar's ETA on long runs).

A query into receiver ``r`` recomputes ``r``'s node and every node downstream of it through kept edges, then the
final read: its cone. The cost of a receiver is its queries times its cone's cost, and a cone depends on decisions
the search has not taken yet (a low receiver's cone is decided by the edges kept among the nodes above it). Those
are predicted from :mod:`~pahq_fx.acdc.attribution`'s estimates: an edge is predicted kept where its estimate
reaches a cut-off, chosen where it best separates the edges already decided (kept from removed), so the estimates'
scale need not match the metric's. The seconds per query, per head and per other node in a cone are fitted by
non-negative least squares to the receivers finished so far; the first tenth of a search has mostly cheap receivers
near the output, so a per-query constant and per-node costs, not a pace per unit, carry to the deep ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

from .edges import EdgeGraph
from .runtime import PatchingRuntime

MIN_FITTED = 3  # searched receivers timed before the seconds per feature are fitted


class ConeEstimate:
    """Predicted cones and liveness of the receivers left, and their seconds from a fit to the finished ones."""

    def __init__(self, runtime: PatchingRuntime, edges: EdgeGraph, attribution: list[torch.Tensor]) -> None:
        self._runtime, self._edges = runtime, edges
        self._scores = [s.tolist() for s in attribution]
        self._head = sum(1 << s.index for s in edges.senders if s.head is not None)
        self._queries = [len(r.senders) + 1 for r in edges.receivers]  # its edges and the baseline
        index = runtime.index
        self._steps_down = sorted(set(index.row_step), reverse=True)  # search order: from the output down
        self._step_rows = {k: [r for r in range(len(edges.receivers)) if index.row_step[r] == k] for k in self._steps_down}
        self._decided: list[tuple[float, bool]] = []
        self._finished: set[int] = set()
        self._features: list[list[float]] = []
        self._seconds: list[float] = []
        self._weights: list[float] | None = None
        self._cones: list[int] = []
        self._live: list[bool] = []
        self._update_cones()

    def finish(self, row: int, searched: bool, seconds: float | None) -> None:
        """Record finished receiver ``row``: its decisions, and (``seconds``: timed in this process) its cost."""
        self._finished.add(row)
        if searched:
            kept = self._runtime.edge_state.kept_in[row]
            senders = self._edges.receivers[row].senders
            self._decided.extend((score, s in kept) for s, score in zip(senders, self._scores[row], strict=True))
            if seconds is not None:
                self._features.append(self._row_features(row))
                self._seconds.append(seconds)
                if len(self._seconds) >= MIN_FITTED:
                    self._weights = _non_negative_fit(self._features, self._seconds)
        if self._runtime.index.ends_step(row):
            self._update_cones()

    def seconds_left(self, rows: range) -> float | None:
        """The predicted seconds of receivers ``rows`` (those left); ``None`` before enough are timed to fit."""
        if self._weights is None:
            return None
        return sum(sum(w * f for w, f in zip(self._weights, self._row_features(r), strict=True)) for r in rows if self._live[r])

    def cone(self, row: int) -> tuple[bool, int, int]:
        """Receiver ``row`` as predicted now: whether it will be searched, and the heads and other nodes in its cone."""
        return self._live[row], (self._cones[row] & self._head).bit_count(), (self._cones[row] & ~self._head).bit_count()

    def _row_features(self, row: int) -> list[float]:
        _, heads, others = self.cone(row)
        q = self._queries[row]
        return [float(q), float(q * heads), float(q * others)]

    def _cut_off(self) -> float:
        """The estimate at and above which an edge is predicted kept: the one that misclassifies the fewest decided
        edges (above every estimate where that is fewest, as before any is kept)."""
        if not self._decided:
            return float("inf")
        scores = torch.tensor([d[0] for d in self._decided], dtype=torch.float64)
        kept = torch.tensor([d[1] for d in self._decided], dtype=torch.float64)
        order = torch.argsort(scores, descending=True, stable=True)
        kept_above = torch.cumsum(kept[order], 0)
        errors = (torch.arange(1, len(order) + 1, dtype=torch.float64) - kept_above) + (kept.sum() - kept_above)
        ranked = scores[order]
        errors[:-1][ranked[:-1] == ranked[1:]] = float("inf")  # a cut-off takes a run of equal estimates whole
        best = int(torch.argmin(errors))
        return float(scores[order[best]]) if errors[best] < kept.sum() else float("inf")

    def _update_cones(self) -> None:
        """Cones and liveness of every receiver from the decisions of the finished ones and the predicted decisions of
        the others, senders from the output down."""
        cut = self._cut_off()
        receivers, index = self._edges.receivers, self._runtime.index
        kept_in = self._runtime.edge_state.kept_in
        out_rows: list[list[int]] = [[] for _ in self._edges.senders]
        for row, receiver in enumerate(receivers):
            if row in self._finished:
                chosen: Iterable[int] = kept_in[row]
            else:
                chosen = [s for s, score in zip(receiver.senders, self._scores[row], strict=True) if score >= cut]
            for s in chosen:
                out_rows[s].append(row)
        sender_cone = [0] * len(self._edges.senders)
        sender_live = [False] * len(self._edges.senders)
        row_cone = [0] * len(receivers)
        row_live = [False] * len(receivers)
        row_live[index.final_row] = True
        for k in self._steps_down:
            for s in index.step_senders[k] if k < index.n_steps else ():  # the final read's step sends nothing
                cone, live = 1 << s, False
                for row in out_rows[s]:
                    cone |= row_cone[row]
                    live = live or row_live[row]
                # A sender whose output reaches no live receiver is not recomputed (its edges into dead ones go).
                sender_cone[s], sender_live[s] = (cone if live else 0), live
            for row in self._step_rows[k]:
                if row == index.final_row:
                    continue
                for s in index.feeding[row]:
                    row_cone[row] |= sender_cone[s]
                    row_live[row] = row_live[row] or sender_live[s]
        self._cones, self._live = row_cone, row_live


def _non_negative_fit(features: list[list[float]], seconds: list[float]) -> list[float]:
    """Least squares with every weight at least zero: the best unconstrained fit over each subset of the features
    (three features: seven subsets)."""
    x, y = torch.tensor(features, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    n = x.shape[1]
    best: tuple[float, list[float]] | None = None
    for size in range(1, n + 1):
        for cols in itertools.combinations(range(n), size):
            solution = torch.linalg.lstsq(x[:, list(cols)], y.unsqueeze(1)).solution.squeeze(1)
            if (solution < 0).any():
                continue
            weights = [0.0] * n
            for c, w in zip(cols, solution.tolist(), strict=True):
                weights[c] = w
            residual = float(((x @ torch.tensor(weights, dtype=torch.float64) - y) ** 2).sum())
            if best is None or residual < best[0]:
                best = (residual, weights)
    return best[1] if best is not None else [0.0] * n
