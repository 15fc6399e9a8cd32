"""Receiver inputs, stored or recomputed (docs/runtime.md, "Receiver inputs recomputed").

``stored`` (the default) keeps every running receiver's FP32 input in the state and adds a query's changes to it.
``recomputed`` keeps none: at Llama-3.1-8B's shape the per-receiver inputs are most of the state's bound. It keeps,
per step ``k``, the change of the stream it reads ``D_k = sum over its senders of (load(current_s) - load(clean_s))``
and, once a sparse receiver needs it, the corrupted read ``C_k = clean_read_k + sum of load(cmc_s)``. A receiver's
input is then rebuilt when a query reaches it, from the shorter of its two lists::

    input_r = clean_read_k + D_k + sum_{s removed into r} removal_change(r, s)
            = C_k - sum_{s kept into r} removal_change(r, s)

``D_k`` is never updated by additions: a commit that changes a sender drops the ``D_k`` of every step that reads it,
and it is summed again from the stored outputs when next needed, in a fixed order (the nearest earlier step whose
senders it contains, then its own other senders by index). So the state is a function of the decisions and the
stored outputs alone, and a resume from a state file or speculation's one-removal-at-a-time commits give bit for bit
the sequential search's state within the mode.
"""

from __future__ import annotations

import enum
import itertools

import torch

from ...errors import PahqError, UnsupportedArchitectureError
from .deltas import Pending, add_terms
from .state import RuntimeState

InputKey = tuple[str, tuple[int, ...] | frozenset[int]] | int


class ReceiverInputs(enum.Enum):
    """Whether the runtime stores every receiver's input or rebuilds it from the removed and kept edges."""

    STORED = "stored"
    RECOMPUTED = "recomputed"

    @classmethod
    def parse(cls, value: str | ReceiverInputs) -> ReceiverInputs:
        try:
            return value if isinstance(value, ReceiverInputs) else cls(str(value).lower())
        except ValueError:
            raise PahqError(f"unknown receiver inputs {value!r}; choose one of {', '.join(m.value for m in cls)}") from None


class InputState(RuntimeState):
    """Part of :class:`~pahq_fx.acdc.runtime.PatchingRuntime`: the receivers' inputs in the state, in either mode."""

    def _index_inputs(self) -> None:
        """Every step's read senders (those of its receivers, which must agree in the recomputed mode) and the steps
        reading each sender."""
        self._read_senders: list[tuple[int, ...]] = []
        self._readers: list[list[int]] = [[] for _ in self.edges.senders]
        for k, rows in enumerate(self.index.step_rows):
            sets = {frozenset(self.edges.receivers[r].senders) for units in rows.values() for r in units if r >= 0}
            if len(sets) != 1 and self.receiver_inputs is ReceiverInputs.RECOMPUTED:
                raise UnsupportedArchitectureError(
                    f"the receivers of {self.steps[k].name} read different senders: run with receiver_inputs='stored'"
                )
            senders = tuple(sorted(frozenset().union(*sets)))
            self._read_senders.append(senders)
            for s in senders:
                self._readers[s].append(k)

    def _reset_inputs(self) -> None:
        self.inputs = [None] * len(self.edges.receivers)
        self._stream_changes: dict[int, torch.Tensor | None] = {}  # D_k, None where every sender is clean
        self._corrupted_reads: dict[int, torch.Tensor] = {}  # C_k
        self._forget_shapes()
        self._forget_inputs()

    def _forget_shapes(self) -> None:
        """Drop what depends on which steps are row-only: each step's summed senders and its D's parent."""
        self._included_senders: dict[int, frozenset[int]] = {}
        self._parents: dict[int, int | None] = {}

    def _forget_inputs(self) -> None:
        """Drop the rebuilt inputs of the step last read: they hold the state before a commit."""
        self._rebuilt: tuple[int, dict[InputKey, torch.Tensor]] = (-1, {})

    @property
    def _keeps_inputs(self) -> bool:
        """Stored inputs: a query keeps its new inputs, and its heads' changes, until it ends."""
        return self.receiver_inputs is ReceiverInputs.STORED

    def _input(self, row: int) -> torch.Tensor:
        """Receiver ``row``'s input in the state: set for every receiver of a step that runs, which is all a query reads.
        Stored, an input held as its step's clean read is read back (:meth:`clean_read`). Recomputed, receivers with the
        same lists share one tensor, kept while their step is the one read."""
        k = self.index.row_step[row]
        if self._keeps_inputs:
            x = self.inputs[row]
            assert x is not None, f"receiver row {row} has no input in the state: its step does not run"
            return self.clean_read(k) if x is self.clean_reads[k] else x
        assert k >= self.active_from, f"receiver row {row} has no input in the state: its step does not run"
        step, rebuilt = self._rebuilt
        if step != k:
            rebuilt = {}
            self._rebuilt = (k, rebuilt)
        key = self._input_key(row)
        if key not in rebuilt:
            rebuilt[key] = self._rebuild(row, key)
        return rebuilt[key]

    def _input_key(self, row: int) -> InputKey:
        """What determines receiver ``row``'s state input among its step's receivers: receivers with equal keys have
        equal inputs (:meth:`_step_inputs` shares their new inputs)."""
        if self._keeps_inputs:
            return id(self.inputs[row])
        removed, kept = self.edge_state.removed_from[row], self.edge_state.kept_in[row]
        return ("removed", tuple(removed)) if len(removed) <= len(kept) else ("kept", frozenset(kept))

    def _rebuild(self, row: int, key: InputKey) -> torch.Tensor:
        """Receiver ``row``'s input from its key's list, in the list's order (a kept set: by sender index)."""
        assert not isinstance(key, int)
        form, senders = key
        k = self.index.row_step[row]
        if form == "kept":
            return add_terms(self._corrupted_read(k), (self._removal_change(row, s) for s in sorted(senders)), subtract=True)
        change = self._stream_change(k)
        own = () if change is None else (change,)
        return add_terms(self._clean_read(k), itertools.chain(own, (self._removed_term(row, s) for s in senders)))

    def _rows(self, k: int) -> bool:
        return k in self.rows_only

    def _clean_read(self, k: int) -> torch.Tensor:
        if self._rows(k):
            return self.read_codec.load(self.read_codec.select_rows(self.clean_reads[k], self.final_rows))
        return self.clean_read(k)

    def _removed_term(self, row: int, s: int) -> torch.Tensor:
        """What a removed edge adds to ``clean_read + D_k``: a row-only sender is left out of a whole-batch step's
        ``D_k`` (its whole output no longer exists; every edge from it to such a step is removed), so it adds its
        corruption alone."""
        if self.sends_rows(s) and not self.reads_rows(row):
            return self.codec.load(self.corrupt_minus_clean[s])
        return self._removal_change(row, s)

    def _included(self, k: int) -> frozenset[int]:
        """The senders ``D_k`` sums: all that step k reads, but row-only ones where it reads whole batches."""
        if k not in self._included_senders:
            senders = self._read_senders[k]
            rows = self._rows(k)
            self._included_senders[k] = frozenset(s for s in senders if rows or not self.sends_rows(s))
        return self._included_senders[k]

    def _parent(self, k: int) -> int | None:
        """The nearest earlier step whose ``D`` is a prefix of step k's (its senders among k's, its shape k's or whole)."""
        if k not in self._parents:
            included = self._included(k)
            self._parents[k] = next(
                (j for j in reversed(range(k)) if (self._rows(k) or not self._rows(j)) and self._included(j) <= included), None
            )
        return self._parents[k]

    def _stream_change(self, k: int) -> torch.Tensor | None:
        """``D_k``: its parent's, then its own other changed senders by index (the order fixes its round-off)."""
        if k in self._stream_changes:
            return self._stream_changes[k]
        parent = self._parent(k)
        change = None if parent is None else self._stream_change(parent)
        if change is not None and parent is not None and self._rows(k) and not self._rows(parent):
            change = self.final_rows_of(change)
        done = set() if parent is None else self._included(parent)
        changed = [s for s in sorted(self._included(k) - done) if self.outputs[s] is not self.clean[s]]
        terms = (self._sender_change(k, s) for s in changed)
        if change is None and changed:
            change = next(terms)
        change = change if change is None else add_terms(change, terms)
        self._stream_changes[k] = change
        return change

    def _sender_change(self, k: int, s: int) -> torch.Tensor:
        """``load(current_s) - load(clean_s)`` in the shape step k reads (a term of ``D_k``)."""
        load = self.codec.load
        if self.sends_rows(s):
            return load(self.outputs[s]) - self.final_rows_of(load(self.clean[s]))
        if self._rows(k):
            return self.final_rows_of(load(self.outputs[s])) - self.final_rows_of(load(self.clean[s]))
        return load(self.outputs[s]) - load(self.clean[s])

    def _corrupted_read(self, k: int) -> torch.Tensor:
        """``C_k``: step k's read with every edge into it removed; fixed by the caches, built once per step."""
        if k not in self._corrupted_reads:
            cmc = self._cmc_rows if self._rows(k) else self.corrupt_minus_clean
            self._corrupted_reads[k] = add_terms(self._clean_read(k), (self.codec.load(cmc[s]) for s in self._read_senders[k]))
        return self._corrupted_reads[k]

    def _keep_inputs(self, pending: Pending, k: int, new_inputs: dict[int, torch.Tensor], read: torch.Tensor | None) -> None:
        """A query's new inputs of step k, kept for the commit where the state stores them; recomputed, freed after their
        step. An input that is the step's clean ``read`` is kept as the read as held (FP32: itself; bf16: no FP32 copy
        in the state), and :meth:`_input` reads it back."""
        if self._keeps_inputs:
            held = self.clean_reads[k]
            pending.inputs.update({row: held if x is read else x for row, x in new_inputs.items()})

    def _commit_inputs(self, pending: Pending) -> None:
        """Stored: the new inputs become the state's. Recomputed: the streams of steps reading a changed sender go."""
        self._forget_inputs()
        if self._keeps_inputs:
            for row, x in pending.inputs.items():
                self.inputs[row] = x
            return
        for s in pending.outputs:
            for k in self._readers[s]:
                self._stream_changes.pop(k, None)

    def _inputs_to_rows(self, row: int) -> None:
        """Step ``row``'s moves to the final read's rows (its sender's output does too, which every ``D`` may read)."""
        if self._keeps_inputs:
            self.inputs[row] = self.final_rows_of(self._input(row))
            return
        self._stream_changes.clear()
        self._corrupted_reads.clear()
        self._forget_shapes()
        self._forget_inputs()

    def _input_tensors(self, from_step: int = 0) -> list[torch.Tensor]:
        """The inputs' tensors the state holds for steps ``from_step`` on."""
        if self._keeps_inputs:
            return [x for r, x in enumerate(self.inputs) if x is not None and self.index.row_step[r] >= from_step]
        held = [x for k, x in self._stream_changes.items() if x is not None and k >= from_step]
        return held + [x for k, x in self._corrupted_reads.items() if k >= from_step]
