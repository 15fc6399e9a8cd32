"""Checkpoints of a discovery run: the decisions so far, written after receivers, the runtime's state beside them, and
the exact replay of the decisions the saved state does not hold yet."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

from ..atomic import write_bytes, write_text
from ..errors import CheckpointError
from . import state_io
from .edges import EdgeGraph
from .runtime import PatchingRuntime

_FORMAT_PREFIX = "pahq_fx.acdc.checkpoint/"
# /2: a digest of the content, so that a checkpoint changed after it was written is refused.
CHECKPOINT_FORMAT = _FORMAT_PREFIX + "2"
# A write costs more as effects accumulate, and on a small model it costs more than a receiver's queries: after a
# write, the next waits until WRITE_BUDGET times its cost has passed, so writing stays under 1/WRITE_BUDGET of the run.
# The runtime's state file, larger, is written under a budget of its own on the same rule.
WRITE_BUDGET = 50
STATE_SUFFIX = ".state.safetensors"


class Checkpoint:
    """A JSON file of finished receivers, removed edges, measured effects and the query count, tied to the run's
    arguments by ``fingerprint`` and to its own content by a digest. ``path=None`` keeps nothing. Writes are atomic
    (:mod:`pahq_fx.atomic`), so a run killed at any moment leaves the previous checkpoint or the new one, never half
    of one. A run saves after a
    receiver when :meth:`due` says so: after the first, then as often as :data:`WRITE_BUDGET` allows.

    Beside it, :meth:`save_state` writes the runtime's state (:mod:`.state_io`) to :attr:`state_path`, as often as
    the same budget allows for its own cost; the JSON names the state file by its SHA-256 and the number of finished
    receivers it holds, so a resume (:func:`resume`) loads it and replays only the decisions taken after it. A state
    file that does not match (left by a run killed between the two writes, or changed since) is ignored with a
    warning, and every decision is replayed instead."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], chosen_precision: str | None = None) -> None:
        """``chosen_precision``: the format ``precision="auto"`` measured and chose, kept so that a resume uses it."""
        self.path = path
        self.fingerprint = fingerprint
        self.chosen_precision = chosen_precision
        self._next_write = 0.0
        self._next_state_write = 0.0
        self._state: dict[str, Any] | None = None  # the JSON's reference to the state file on disk

    @property
    def state_path(self) -> Path | None:
        """Where the runtime's state goes: ``checkpoint.json`` -> ``checkpoint.state.safetensors``."""
        return None if self.path is None else self.path.with_name(self.path.stem + STATE_SUFFIX)

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, None when there is none. A checkpoint of another run, one that is not a
        checkpoint, or one changed since it was written (its digest) is a :class:`CheckpointError`: never half-used."""
        data = self.check()
        if data is None:
            return None
        theirs = data.get("fingerprint")
        if theirs != self.fingerprint:
            theirs = theirs if isinstance(theirs, dict) else {}
            differs = sorted(k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k]) or ["fingerprint"]
            raise CheckpointError(
                f"checkpoint {self.path} belongs to another run (its {', '.join(differs)} "
                f"{'differs' if len(differs) == 1 else 'differ'} from this one's); delete it to start afresh, or write "
                "this run to another folder"
            )
        return data

    def check(self) -> dict[str, Any] | None:
        """The file's content, checked for everything but the run it belongs to (which needs the model): a
        checkpoint written by this version of pahq_fx, unchanged since (its digest), every field of its type.
        None when there is no file. The command line calls it before loading the model."""
        if self.path is None or not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint {self.path} is unreadable: {error}") from None
        where = f"checkpoint {self.path}"
        if not isinstance(data, dict) or not str(data.get("format", "")).startswith(_FORMAT_PREFIX):
            raise CheckpointError(f"{where} is not a pahq_fx checkpoint; delete it to start afresh")
        if data["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{where} was written by another version of pahq_fx ({data['format']}); delete it to start afresh"
            )
        if data.get("digest") != _digest(data):
            raise CheckpointError(
                f"{where} was changed after pahq_fx wrote it (its digest does not match its content); delete it to start afresh"
            )
        _check_types(data, where)
        return data

    def due(self) -> bool:
        return self.path is not None and time.perf_counter() >= self._next_write

    def state_due(self) -> bool:
        return self.path is not None and time.perf_counter() >= self._next_state_write

    def save_state(self, runtime: PatchingRuntime, receivers: int) -> None:
        """Write the runtime's state after ``receivers`` finished receivers. It counts only once a :meth:`save`
        names it: call that next (a run killed in between leaves a state file the old JSON does not name)."""
        if self.state_path is None:
            return
        start = time.perf_counter()
        data = state_io.encode(runtime)
        write_bytes(self.state_path, data)
        self._state = {"file": self.state_path.name, "sha256": hashlib.sha256(data).hexdigest(), "receivers": receivers}
        end = time.perf_counter()
        self._next_state_write = end + WRITE_BUDGET * (end - start)

    def load_state(self, runtime: PatchingRuntime, saved: dict[str, Any], removed: set[tuple[int, int]]) -> int:
        """Load the state file ``saved`` (a checkpoint's content) names into ``runtime``; the number of finished
        receivers it holds. 0, with a warning and the runtime untouched, where it is missing or is not the file the
        checkpoint names (a run killed between writing the two leaves that). A named file whose removed edges are not
        the checkpoint's means that one of them was changed after they were written: a :class:`CheckpointError`."""
        reference = saved.get("state")
        self._state = None
        if reference is None or self.state_path is None:
            return 0
        try:
            data = self.state_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != reference["sha256"]:
                raise state_io.StateMismatch("its SHA-256 is not the one the checkpoint names")
            receivers = reference["receivers"]
            if state_io.removed_edges(data) != {(row, s) for row, s in removed if row < receivers}:
                raise CheckpointError(
                    f"checkpoint {self.path} and its state file {self.state_path.name} disagree on the removed edges: "
                    "one was changed after pahq_fx wrote them; delete both to start afresh"
                )
            state_io.restore(runtime, data)
        except (OSError, state_io.StateMismatch) as error:
            warnings.warn(
                f"the state file {self.state_path} does not belong to checkpoint {self.path} ({error}); "
                "replaying every decision instead",
                stacklevel=3,
            )
            return 0
        self._state = reference
        return receivers

    def save(
        self,
        done: list[str],
        removed: list[tuple[int, int]],
        effects: dict[tuple[int, int], float],
        queries: int,
        evaluated: int | None = None,
        predictor: dict[str, Any] | None = None,
    ) -> None:
        """``evaluated``: queries computed (dropped speculative candidates included); ``predictor``: the speculation
        predictor's state, so that a resumed run batches as the uninterrupted one would."""
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
        if evaluated is not None:
            data["evaluated"] = evaluated
        if predictor is not None:
            data["predictor"] = predictor
        if self.chosen_precision is not None:
            data["chosen_precision"] = self.chosen_precision
        if self._state is not None:
            data["state"] = self._state
        data["digest"] = _digest(data)
        write_text(self.path, json.dumps(data))
        end = time.perf_counter()
        self._next_write = end + WRITE_BUDGET * (end - start)

    def finish(self) -> None:
        """The run is complete: its checkpoint has nothing left to resume."""
        for path in (self.path, self.state_path):
            if path is not None:
                path.unlink(missing_ok=True)


def resume(
    runtime: PatchingRuntime,
    edges: EdgeGraph,
    store: Checkpoint,
    saved: dict[str, Any],
) -> int:
    """Rebuild the state of the checkpointed run ``saved``: load the state file it names, then replay the decisions
    taken after it (all of them where there is none); returns the number of finished receivers the state file held.
    Bit for bit the uninterrupted run's state. The decisions are checked first: ones that do not fit are a
    :class:`CheckpointError` and the runtime is left untouched."""
    done = list(saved["done"])
    removed = {(r, s) for r, s in saved["removed"]}
    effects = {(r, s): e for r, s, e in saved["effects"]}
    _check_decisions(edges, done, removed, effects)
    start = store.load_state(runtime, saved, removed)
    replay(runtime, edges, done, removed, effects, start)
    return start


def replay(
    runtime: PatchingRuntime,
    edges: EdgeGraph,
    done: list[str],
    removed: set[tuple[int, int]],
    effects: dict[tuple[int, int], float],
    start: int = 0,
) -> None:
    """Rebuild the state of a checkpointed run by repeating its state changes in order (bit for bit the same
    state as the uninterrupted run, speculative or not: both commit one removal at a time; no edge is measured
    again), from the ``start``-th finished receiver on (the runtime holds the state after the ones before). A
    receiver without measured effects was pruned. The decisions are checked against the model's edges
    first: one that does not fit is a
    :class:`CheckpointError` and the runtime is left untouched."""
    _check_decisions(edges, done, removed, effects)
    for name in done[start:]:
        row = edges.receiver_index[name]
        receiver = edges.receivers[row]
        if not any((row, s) in effects for s in receiver.senders):
            runtime.remove(row, receiver.senders)
            continue
        runtime.investigate(receiver)
        for s in receiver.senders:
            if (row, s) in removed:
                runtime.try_remove(row, [s])
                runtime.commit()


def _digest(data: dict[str, Any]) -> str:
    """SHA-256 of the checkpoint's content (every field but the digest), in a canonical JSON form."""
    content = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(data: dict[str, Any], where: str) -> None:
    """Every field of a checkpoint has the type and shape :meth:`Checkpoint.save` writes."""

    def wrong(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{where} is malformed: {field!r} must be {expected}; delete it to start afresh")

    done, removed, effects = data.get("done"), data.get("removed"), data.get("effects")
    if not isinstance(done, list) or not all(isinstance(d, str) for d in done) or len(set(done)) != len(done):
        raise wrong("done", "a list of distinct receiver names")
    if not isinstance(removed, list) or not all(isinstance(e, list) and len(e) == 2 and all(map(_is_int, e)) for e in removed):
        raise wrong("removed", "a list of [receiver, sender] index pairs")
    if not isinstance(effects, list) or not all(
        isinstance(e, list)
        and len(e) == 3
        and _is_int(e[0])
        and _is_int(e[1])
        and isinstance(e[2], (int, float))
        and not isinstance(e[2], bool)
        for e in effects
    ):
        raise wrong("effects", "a list of [receiver, sender, effect] triples")
    if not _is_int(data.get("queries")) or data["queries"] < 0:
        raise wrong("queries", "a non-negative integer")
    if not _is_int(data.get("evaluated", 0)) or data.get("evaluated", 0) < 0:
        raise wrong("evaluated", "a non-negative integer")
    predictor = data.get("predictor", {"decisions": [], "hits": [], "counts": [0] * 5})
    if (
        not isinstance(predictor, dict)
        or not all(
            isinstance(predictor.get(k), list) and all(map(_is_int, predictor[k])) for k in ("decisions", "hits", "counts")
        )
        or len(predictor["counts"]) != 5
    ):
        raise wrong("predictor", "the predictor's state (decisions, hits and five counts, as integers)")
    if not isinstance(data.get("chosen_precision", ""), str):
        raise wrong("chosen_precision", "a format name")
    state = data.get("state", {"file": "", "sha256": "", "receivers": 0})
    if (
        not isinstance(state, dict)
        or not all(isinstance(state.get(k), str) for k in ("file", "sha256"))
        or not _is_int(state.get("receivers"))
        or not 0 <= state["receivers"] <= len(done)
    ):
        raise wrong("state", "the state file's name, SHA-256 and finished receivers (at most those of 'done')")


def _check_decisions(
    edges: EdgeGraph, done: list[str], removed: set[tuple[int, int]], effects: dict[tuple[int, int], float]
) -> None:
    """The decisions are those of a run of this model: the first receivers in search order, and edges into them."""
    names = [r.name for r in edges.receivers]
    if done != names[: len(done)]:
        raise CheckpointError(
            "its finished receivers are not the first receivers of this model in search "
            "order; it does not belong to this run: delete it to start afresh"
        )
    for kind, pairs in (("removed", removed), ("measured", effects)):
        for row, sender in pairs:
            if not 0 <= row < len(done) or sender not in edges.receivers[row].senders:
                raise CheckpointError(
                    f"its {kind} edge ({row}, {sender}) is not an edge into a finished "
                    "receiver of this model; delete it to start afresh"
                )
    for row in range(len(done)):
        senders = edges.receivers[row].senders
        measured = [(row, s) in effects for s in senders]
        pruned = not any(measured)
        if (pruned and not all((row, s) in removed for s in senders)) or (not pruned and not all(measured)):
            raise CheckpointError(f"its decisions at {done[row]} are incomplete; delete it to start afresh")
