"""The cascade: a removal's change travels along kept edges, in step order, to every component it reaches; the
tentative inputs, outputs and metric it computes (docs/runtime.md, "One query")."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

from ...ir import names
from ...ir.structure import StepKind
from ...passes.precision import FullPrecisionUnits
from ..storage import Stored
from .deltas import Deltas, Pending, add_terms
from .rows import ReachedRows
from .state import RuntimeState


class Cascade(RuntimeState):
    """Part of :class:`~pahq_fx.acdc.runtime.PatchingRuntime`: what a query recomputes."""

    def _remove(self, removals: dict[int, list[int]]) -> Pending:
        """Removing (s, r) changes r's input by ``corrupt_s - current_s``; the cascade does the rest."""
        changes: dict[int, torch.Tensor] = {}
        for row, senders in removals.items():
            self._check_removable(row, senders)
            for s in senders:
                change = self._removal_change(row, s)
                changes[row] = change if row not in changes else changes[row] + change
        removed = tuple((row, s) for row, senders in removals.items() for s in senders)
        return self._cascade(changes, None, None, removed=removed)

    def _check_removable(self, row: int, senders: Iterable[int]) -> None:
        """The receiver runs (its step is active) and keeps an edge from every one of ``senders``."""
        if self.index.row_step[row] < self.active_from:
            raise RuntimeError(f"{self.edges.receivers[row].name} does not run yet: investigate it (or run_from) first")
        for s in senders:
            if s not in self.edge_state.kept_in[row]:
                raise ValueError(f"edge {self.edges.senders[s].name} -> {self.edges.receivers[row].name} is not present")

    def reads_rows(self, row: int) -> bool:
        """Whether this receiver's input is kept at the final read's rows only."""
        return row == self.index.final_row or self.index.row_step[row] in self.rows_only

    def sends_rows(self, sender: int) -> bool:
        return self.index.sender_step[sender] in self.rows_only

    def _as_read_by(self, row: int, x: torch.Tensor, sender: int) -> torch.Tensor:
        """A sender's (change of) output in the shape receiver ``row`` holds its input in."""
        return self.final_rows_of(x) if self.reads_rows(row) and not self.sends_rows(sender) else x

    def _removal_change(self, row: int, sender: int) -> torch.Tensor:
        """``corrupt_s - current_s``: what removing (sender, row) adds to the receiver's input."""
        load = self.codec.load
        if self.outputs[sender] is self.clean[sender]:
            return load(self._cmc_rows[sender]) if self.reads_rows(row) else load(self.corrupt_minus_clean[sender])
        if self.sends_rows(sender):
            return load(self._cmc_rows[sender]) + self.final_rows_of(load(self.clean[sender])) - load(self.outputs[sender])
        change = load(self.corrupt_minus_clean[sender]) + load(self.clean[sender]) - load(self.outputs[sender])
        return self._as_read_by(row, change, sender)

    def _change(self, sender: int, new: Stored) -> torch.Tensor:
        """A sender's change of output, between stored values: the state's inputs are sums of stored outputs."""
        return self.codec.load(new) - self.codec.load(self.outputs[sender])

    def _update_rows_only(self) -> None:
        """Move MLPs and norms whose kept edges all go to the final read or to row-only ones to row-only state (for
        good: kept edges only ever disappear). Their other rows are never read again."""
        for k in reversed(range(self.active_from, len(self.steps))):
            if k in self.rows_only or k not in self.token_wise_components:
                continue
            sender = self.index.step_senders[k][0]
            if all(self.reads_rows(r) for r in self.edge_state.kept_out[sender]):
                self.rows_only.add(k)
                row = next(iter(self.index.step_rows[k].values()))[0]  # the component's one receiver
                self._inputs_to_rows(row)
                self.outputs[sender] = self.codec.select_rows(self.outputs[sender], self.final_rows)

    def _cascade(
        self,
        changes: dict[int, torch.Tensor],
        activate_from: int | None,
        plan: dict[int, FullPrecisionUnits] | None,
        removed: tuple[tuple[int, int], ...] = (),
        new_inputs: dict[int, torch.Tensor] | None = None,
    ) -> Pending:
        """Recompute, in step order, every component that ``changes`` (input deltas by receiver row), ``new_inputs``
        (inputs given whole, by receiver row), newly running steps or a new plan reach, following kept edges; the
        tentative state and metric."""
        given = new_inputs or {}
        pending = Pending(removed=removed)
        kept_in = self.edge_state.kept_in_without(removed) if removed else self.edge_state.kept_in
        new_from = self.active_from if activate_from is None else min(activate_from, self.active_from)
        plan_changes: dict[int, FullPrecisionUnits] = {}
        if plan is not None:
            pending.plan = plan
            for k in set(plan) | set(self.plan):
                if k >= self.active_from and plan.get(k, FullPrecisionUnits()) != self.plan.get(k, FullPrecisionUnits()):
                    plan_changes[k] = self.plan.get(k, FullPrecisionUnits())
        current_plan = plan if plan is not None else self.plan
        if new_from < self.active_from:
            pending.active_from = new_from
        deltas = Deltas(lambda sender: self._change(sender, pending.outputs[sender]), keep_heads=self._keeps_inputs)
        rows = self._reached_rows(changes, given) if new_from == self.active_from and not plan_changes else None
        first = min(
            [self.index.row_step[r] for r in (*changes, *given) if r != self.index.final_row]
            + [new_from if new_from < self.active_from else len(self.steps)]
            + list(plan_changes)
        )
        for k in range(first, len(self.steps)):
            activating = new_from <= k < self.active_from
            read = self.clean_read(k) if activating else None  # one FP32 tensor, shared by every input equal to it
            new_inputs, changed = self._step_inputs(k, changes, given, deltas, kept_in, read)
            self._keep_inputs(pending, k, new_inputs, read)
            step = self.steps[k]
            if step.kind is StepKind.ATTENTION:
                old_units = plan_changes.get(k)
                if not new_inputs and old_units is None:
                    continue
                outputs = self._attention(
                    k, new_inputs, changed, current_plan.get(k, FullPrecisionUnits()), old_units, activating, pending, rows
                )
                pending.outputs.update(outputs)
                deltas.add_heads(k, list(outputs))
            else:
                if not changed:
                    continue
                x, sender = new_inputs[changed[0]], self.index.step_senders[k][0]
                pending.recomputed.append(step.name)
                if k in self.rows_only:
                    pending.outputs[sender] = self.codec.store(self._row_component(k, x))
                elif rows is not None:
                    packed = rows.batch.pack(rows.take(self._flat(x)))
                    out = rows.batch.unpack(self._components[k](packed, *self._packed_aux(k, rows)))
                    pending.outputs[sender] = self._with_rows(sender, rows, out)
                else:
                    out = self._unflat(self._components[k](self._flat(x), *self._aux(step.aux)))
                    pending.outputs[sender] = self.codec.store(out)
                deltas.add(sender, self._change(sender, pending.outputs[sender]))
        final_change = changes.get(self.index.final_row)
        reaching = [s for s in deltas if s in kept_in[self.index.final_row]]
        if reaching:
            total = add_terms(0, (self._as_read_by(self.index.final_row, d, s) for s, d in deltas.terms(reaching)))
            final_change = total if final_change is None else final_change + total
        final = given.get(self.index.final_row)
        if final_change is not None:
            final = self.final + final_change if final is None else final + final_change
        if final is None:
            pending.metric = self.metric
            pending.metrics = [self.metric] * (self._candidates or 1)
        else:
            pending.final = final
            pending.recomputed.append(names.RESID_POST)
            values = self._metric(final) if self._candidates is None else self._final_metric(final)
            pending.metrics = [float(v) for v in values.reshape(-1)]
            pending.metric = pending.metrics[0]
        self.last_recomputed = pending.recomputed
        return pending

    def _reached_rows(self, changes: dict[int, torch.Tensor], given: dict[int, torch.Tensor]) -> ReachedRows | None:
        """The stream rows a query's changes reach (:class:`ReachedRows`), where the model allows recomputing only them
        (checked at setup); None: every row. Inputs kept at the final read's rows only are left out: nothing that runs
        on the whole stream reads them."""
        if not self.restrict_rows:
            return None
        changed = [(c != 0).any(-1) for row, c in changes.items() if not self.reads_rows(row)]
        changed += [(x != self._input(row)).any(-1) for row, x in given.items() if not self.reads_rows(row)]
        if not changed:
            return None
        if self._candidates is not None:  # the state's rows repeated for every candidate, as _flat repeats them
            changed = [m.expand(self._candidates, *m.shape[-2:]) for m in changed]
        return ReachedRows.of(changed, self.row_batch.seq)

    def _with_rows(self, sender: int, rows: ReachedRows, out: torch.Tensor) -> Stored:
        """The sender's state output with the reached rows replaced by ``out`` [rows, d], stored."""
        return self.codec.replace_rows(self.outputs[sender], rows.index, self.codec.store(out), self._candidates)

    def _step_inputs(
        self,
        k: int,
        changes: dict[int, torch.Tensor],
        given: dict[int, torch.Tensor],
        deltas: Deltas,
        kept_in: list[set[int]],
        read: torch.Tensor | None,
    ) -> tuple[dict[int, torch.Tensor], list[int]]:
        """New inputs of step k's receivers that ``changes``, ``given`` or upstream deltas reach (all of them when the
        step starts running, given its clean ``read``: the read plus the removed edges' corruption), and the rows whose
        input differs from the one the component's current output was computed from."""
        new_inputs, changed = {}, []
        # Receivers whose input is the same sum (same base, same deltas; a step's receivers share one shape) share
        # one tensor: in a dense circuit every q/k/v input of a layer is the same sum, computed and stored once. Bit
        # for bit what each would get alone (same terms, same order); nothing modifies an input in place.
        built: dict[tuple, torch.Tensor] = {}
        for rows in self.index.step_rows[k].values():
            for row in rows:
                if not self.is_live(row):
                    if read is not None:
                        new_inputs[row] = read  # a placeholder: nothing reads a dead node's result (its head may run)
                    continue
                if row in given:  # the investigated receiver of a candidate batch: no delta reaches it from downstream
                    new_inputs[row] = given[row]
                    changed.append(row)
                    continue
                reaching = [s for s in deltas if s in kept_in[row]]
                if read is not None:
                    removed = tuple(self.edge_state.removed_from[row])
                    key = ("clean read", removed, *reaching)
                elif reaching or row in changes:
                    removed, key = (), ("state", self._input_key(row), *reaching)
                else:
                    continue
                if row in changes:  # its own change: a sum no other receiver has
                    new_inputs[row] = self._input_sum(row, read, reaching, deltas, changes[row])
                else:
                    if key not in built:
                        built[key] = self._input_sum(row, read, reaching, deltas, None)
                    new_inputs[row] = built[key]
                if removed or reaching or row in changes:
                    changed.append(row)
        return new_inputs, changed

    def _input_sum(
        self, row: int, read: torch.Tensor | None, reaching: list[int], deltas: Deltas, change: torch.Tensor | None
    ) -> torch.Tensor:
        """Receiver ``row``'s new input: its base (``read``, its step's clean read, plus its removed edges' corruption
        when the step starts running; its state input otherwise), then its own change, then the deltas reaching it
        (:meth:`Deltas.terms`), in that order."""
        load = self.codec.load
        if read is not None:
            x = add_terms(read, (load(self.corrupt_minus_clean[s]) for s in self.edge_state.removed_from[row]))
        else:
            x = self._input(row)
        own = () if change is None else (change,)
        # Lazily: a term is made when added (a head's change, with inputs recomputed, is not held beyond that).
        return add_terms(x, itertools.chain(own, (self._as_read_by(row, d, s) for s, d in deltas.terms(reaching))))
