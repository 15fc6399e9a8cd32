"""Which edges the search has removed and which it keeps, by receiver row and by sender."""

from __future__ import annotations

from collections.abc import Iterable

from ..edges import EdgeGraph


class EdgeState:
    """The removed edges into every receiver (in the order they were removed), the senders every receiver still
    keeps, and the receivers every sender still feeds. Every edge is kept at the start; edges are only ever removed."""

    def __init__(self, edges: EdgeGraph) -> None:
        self.removed_from: list[list[int]] = [[] for _ in edges.receivers]
        self.kept_in: list[set[int]] = [set(r.senders) for r in edges.receivers]
        self.kept_out: list[set[int]] = [set() for _ in edges.senders]
        for row, r in enumerate(edges.receivers):
            for s in r.senders:
                self.kept_out[s].add(row)

    def mark_removed(self, row: int, senders: Iterable[int]) -> None:
        for s in senders:
            self.removed_from[row].append(s)
            self.kept_in[row].discard(s)
            self.kept_out[s].discard(row)

    def kept_in_without(self, removed: Iterable[tuple[int, int]]) -> list[set[int]]:
        """Every receiver's kept senders as they would be with the edges ``removed`` (row, sender) removed too;
        the state itself unchanged."""
        kept_in = list(self.kept_in)
        for row, s in removed:
            kept_in[row] = kept_in[row] - {s}
        return kept_in

    @property
    def removed(self) -> set[tuple[int, int]]:
        """The removed edges, as (receiver row, sender) pairs."""
        return {(row, s) for row, senders in enumerate(self.removed_from) for s in senders}

    @property
    def kept_edges(self) -> int:
        return sum(len(k) for k in self.kept_in)
