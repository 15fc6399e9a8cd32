"""Checkpoints of a discovery run: the decisions so far, written after receivers, and their exact replay."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .edges import EdgeGraph
from .runtime import PatchingRuntime

CHECKPOINT_FORMAT = "pahq_fx.acdc.checkpoint/1"
# A write costs more as effects accumulate, and on a small model it costs more than a receiver's queries: after a
# write, the next waits until WRITE_BUDGET times its cost has passed, so writing stays under 1/WRITE_BUDGET of the run.
WRITE_BUDGET = 50


class Checkpoint:
    """A JSON file of finished receivers, removed edges, measured effects and the query count, tied to the run's
    arguments by ``fingerprint``. ``path=None`` keeps nothing. Writes are atomic (write, then rename), so a run
    killed at any moment leaves the previous checkpoint or the new one, never half of one. A run saves after a
    receiver when :meth:`due` says so: after the first, then as often as :data:`WRITE_BUDGET` allows."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._next_write = 0.0

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, None when there is none; another run's checkpoint is an error."""
        if self.path is None or not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint {self.path} is unreadable: {error}") from None
        if data.get("format") != CHECKPOINT_FORMAT or data.get("fingerprint") != self.fingerprint:
            theirs = data.get("fingerprint", {}) if isinstance(data, dict) else {}
            differs = sorted(k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k]) or ["format"]
            raise CheckpointError(
                f"checkpoint {self.path} belongs to another run (its {', '.join(differs)} differ from this one's); "
                "delete it to start afresh, or write this run to another folder"
            )
        return data

    def due(self) -> bool:
        return self.path is not None and time.perf_counter() >= self._next_write

    def save(self, done: list[str], removed: list[tuple[int, int]], effects: dict[tuple[int, int], float], queries: int,
             groups: list[int] | None = None, predictor: dict[str, Any] | None = None) -> None:
        """``groups``: for each removed edge, the commit that removed it (edges removed together, by a candidate
        batch, are replayed together); ``predictor``: the speculation predictor's state, so that a resumed run
        batches as the uninterrupted one would."""
        if self.path is None:
            return
        start = time.perf_counter()
        data = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "done": done,
            "removed": [list(edge) for edge in removed],
            "effects": [[r, s, e] for (r, s), e in sorted(effects.items())],
            "queries": queries,
        }
        if groups is not None:
            data["groups"] = groups
        if predictor is not None:
            data["predictor"] = predictor
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        end = time.perf_counter()
        self._next_write = end + WRITE_BUDGET * (end - start)

    def finish(self) -> None:
        """The run is complete: its checkpoint has nothing left to resume."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def replay(runtime: PatchingRuntime, edges: EdgeGraph, done: list[str], removed: set[tuple[int, int]],
           effects: dict[tuple[int, int], float], groups: dict[tuple[int, int], int] | None = None) -> None:
    """Rebuild the state of a checkpointed run by repeating its state changes in order (bit for bit the same
    state as the uninterrupted run; no edge is measured again): one pass per commit, edges that a candidate batch
    removed together (``groups``: removed edge -> its commit) in one. A receiver without measured effects was
    pruned."""
    groups = groups or {}
    for name in done:
        row = edges.receiver_index[name]
        receiver = edges.receivers[row]
        if not any((row, s) in effects for s in receiver.senders):
            runtime.remove(row, receiver.senders)
            continue
        runtime.investigate(receiver)
        commits: dict[int, list[int]] = {}
        for i, s in enumerate(receiver.senders):
            if (row, s) in removed:
                commits.setdefault(groups.get((row, s), -1 - i), []).append(s)
        for senders in commits.values():
            runtime.try_remove_group(row, senders)
            runtime.commit()
