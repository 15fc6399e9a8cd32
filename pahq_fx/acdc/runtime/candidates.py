"""Candidate batches: several edge queries into one receiver evaluated in one pass along an extra batch
dimension (speculation, :mod:`~pahq_fx.acdc.speculation`), and the batch-shape helpers the cascade uses for them."""

from __future__ import annotations

import torch

from ...metrics import metric_value
from ..row_batch import RowBatch
from .rows import ReachedRows
from .state import Aux, RuntimeState


class CandidateBatches(RuntimeState):
    """Part of :class:`~pahq_fx.acdc.runtime.PatchingRuntime`: candidate batches and the shapes they run at."""

    @torch.no_grad()
    def try_remove_each(self, row: int, senders: list[int], removed_before: list[bool]) -> list[float]:
        """Candidate queries into one receiver, evaluated together along an extra batch dimension: candidate i
        removes ``senders[i]`` on top of the state with ``senders[j]`` removed for every earlier j where
        ``removed_before[j]`` (the decisions a predictor expects). Returns each candidate's metric; nothing is
        decided until :meth:`keep_candidate`.

        Removing edges into one receiver changes only that receiver's input (its senders lie upstream), so every
        candidate has the same cone; the candidates' inputs are built in the order the sequential search would
        build them, bit for bit, and the cone runs once for all of them."""
        if not senders or len(set(senders)) != len(senders) or len(removed_before) != len(senders):
            raise ValueError(f"candidates need distinct senders and one guess each, got {senders} and {removed_before}")
        self._check_removable(row, senders)
        if len(senders) > 1:
            self._prepare_candidates(len(senders))
        self.evaluated += len(senders)
        removed = [(row, s) for s, before in zip(senders, removed_before, strict=True) if before]
        self._candidate_removed = [(*tuple(removed[: sum(removed_before[:i])]), (row, s)) for i, s in enumerate(senders)]
        if len(senders) == 1:  # the sequential query itself: its values are the commit's
            self._pending = self._remove({row: senders})
            return [self._pending.metric]
        self._pending = None
        base = self.final if row == self.index.final_row else self._input(row)
        inputs, prefix = [], base
        for s, before in zip(senders, removed_before, strict=True):
            inputs.append(prefix + self._removal_change(row, s))
            if before:
                prefix = inputs[-1]
        self._candidates = len(senders)
        try:
            batch = self._cascade({}, None, None, new_inputs={row: torch.stack(inputs)})
        finally:
            self._candidates = None
        return batch.metrics  # the batch's values are dropped: keep_candidate recomputes the kept removals

    @torch.no_grad()
    def keep_candidate(self, index: int | None, decided: int) -> float:
        """After :meth:`try_remove_each`, with ``decided`` of its candidates' decisions taken: make candidate
        ``index``'s removals part of the state (the last candidate whose removal was kept), or keep the state
        (None). Returns the metric of the state.

        The kept removals are committed one at a time, each by its own pass at the task's own batch, exactly as the
        sequential search commits them: the state is then the sequential search's, bit for bit (a batch's values
        differ from single passes by round-off, and a commit's round-off would stay in the state), and a
        checkpoint's replay rebuilds it exactly. A batch of one commits its own values."""
        single, self._pending = self._pending, None
        self.queries += decided
        if index is None:
            return self.metric
        if single is not None:
            self._pending = single
            return self.commit()
        for row, sender in self._candidate_removed[index]:
            self._pending = self._remove({row: [sender]})
            self.commit()
        return self.metric

    def batches_candidates(self) -> bool:
        """Whether candidate batches can run: an eager runtime whose trace takes any batch size, with auxiliary
        values (masks, positions) that are the task's repeated per candidate."""
        if self._compiled:
            self.candidate_refusal = "a compiled runtime runs one query at a time"
            return False
        if self._candidate_support is None:
            try:
                self._prepare_candidates(2)
                self._candidate_support = True
            # Any exception: this runs the model's own prelude at twice its batch, whatever that code raises; the
            # refusal is the run's report's note, and the search goes on one query at a time.
            except Exception as error:
                self._candidate_support = False
                self.candidate_refusal = str(error).splitlines()[0] if str(error) else type(error).__name__
        return self._candidate_support

    def _prepare_candidates(self, k: int) -> None:
        """The prelude's auxiliary values at k times the task's batch, checked against the task's own."""
        if k in self._candidate_aux:
            return
        aux = tuple(self._prelude(self._clean_ids.repeat(k, 1))[1:])
        for mine, theirs in zip(self.aux, aux, strict=True):
            if not isinstance(mine, torch.Tensor):  # a size: the batch's becomes the candidate batch's
                batch = self._clean_ids.shape[0]
                if mine != theirs and (mine, theirs) != (batch, k * batch):
                    raise ValueError(f"an auxiliary value changes with the batch: {mine!r} -> {theirs!r}")
                continue
            if theirs.shape == mine.shape:
                expected = mine
            elif mine.dim() and theirs.shape == (k * mine.shape[0], *mine.shape[1:]):
                expected = mine.repeat(k, *([1] * (mine.dim() - 1)))
            else:
                raise ValueError(
                    f"an auxiliary value of shape {tuple(mine.shape)} has shape {tuple(theirs.shape)} at {k} candidates"
                )
            if not torch.equal(expected, theirs):
                raise ValueError(f"an auxiliary value of shape {tuple(mine.shape)} is not repeated per candidate")
        rows = RowBatch(k * self.row_batch.rows, self.row_batch.seq)
        row_aux = self._prelude_aux(rows) if self._rows_prelude_aux is not None else None
        if row_aux is None and self._rows_prelude_aux is not None:
            raise ValueError(f"the final read's rows do not run at {k} times their number")
        final_aux = self._final_aux if row_aux is None else [row_aux[i] for i in self.structure.final_aux]
        self._candidate_aux[k] = aux
        self._candidate_rows[k] = (rows, row_aux or (), final_aux)

    def candidate_bytes(self, row: int) -> int:
        """What one candidate of a batch into ``row`` may hold at most: the state of every step from the
        receiver's on (inputs, outputs, projections) and the final read."""
        step = self.index.row_step[row]
        tensors = [
            t for s, stored in enumerate(self.outputs) if self.index.sender_step[s] >= step for t in self.codec.tensors(stored)
        ]
        tensors += self._input_tensors(step)
        tensors += [p for k, p in self.projections.items() if k >= step]
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*tensors, self.final]}
        return sum(seen.values())

    def _row_aux(self, k: int) -> list[Aux]:
        aux = self._rows_prelude_aux if self._candidates is None else self._candidate_rows[self._candidates][1]
        assert aux is not None, "a row-only component runs where the rows' prelude values exist"
        return [aux[i] for i in self.steps[k].aux]

    def _packed_aux(self, k: int, rows: ReachedRows) -> list[Aux]:
        """Step k's auxiliary values at the shape of the reached rows packed as a batch (computed once per shape)."""
        shape = rows.batch.shape
        if shape not in self._packed_prelude:
            aux = self._prelude_aux(rows.batch)
            assert aux is not None, "rows are restricted only where the prelude runs at other batch sizes"
            self._packed_prelude[shape] = aux
        return [self._packed_prelude[shape][i] for i in self.steps[k].aux]

    def _row_component(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Step k's token-wise component on the final read's rows, ``x`` [rows, d] (a candidate batch: [K, rows, d])."""
        if self._candidates is None:
            return self.row_batch.unpack(self._components[k](self.row_batch.pack(x), *self._row_aux(k)))
        rows = self._candidate_rows[self._candidates][0]
        return rows.unpack(self._components[k](rows.pack(x.flatten(0, 1)), *self._row_aux(k))).unflatten(
            0, (self._candidates, -1)
        )

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """A candidate batch's [K, B, ...] as the [K * B, ...] batch the traced components take; the state's
        [B, ...] repeated for every candidate. Unchanged outside a candidate batch."""
        if self._candidates is None:
            return x
        return x.flatten(0, 1) if x.dim() == self._clean_ids.dim() + 2 else x.repeat(self._candidates, *([1] * (x.dim() - 1)))

    def _unflat(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._candidates is None else x.unflatten(0, (self._candidates, -1))

    def _final_metric(self, final_rows: torch.Tensor) -> torch.Tensor:
        """The metric of a final read [rows, d] (a candidate batch's [K, rows, d]: one value per candidate)."""
        k = self._candidates
        if self._final_shape is None:
            if k is None:
                rows, aux, flat = self.row_batch, self._row_final_aux, final_rows
            else:
                rows, _, aux = self._candidate_rows[k]
                flat = final_rows.flatten(0, 1)
            logits = self._unflat(rows.unpack(self._unembed(rows.pack(flat), *aux)))
        else:
            stream = final_rows.reshape(-1, *self._final_shape[1:])
            logits = self._unflat(self._unembed(stream, *self._aux(self.structure.final_aux)))
            logits = logits.flatten(-3, -2).index_select(-2, self.positions)
        return metric_value(self.metric_kind, logits, self.clean_distribution, self.correct, self.incorrect)
