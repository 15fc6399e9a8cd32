"""One attention step of a query's cascade: the projections its new inputs or a precision change reach, and the
outputs of the heads whose value can differ from the state's."""

from __future__ import annotations

import torch

from ...ir import names
from ...ir.modules import AttentionBlock
from ...ir.names import Role
from ...passes.precision import FullPrecisionUnits
from ..edges import ReceiverKind
from ..storage import Stored
from .deltas import Pending
from .index import ROLES
from .rows import ReachedRows
from .state import Aux, RuntimeState


class AttentionStep(RuntimeState):
    """Part of :class:`~pahq_fx.acdc.runtime.PatchingRuntime`: an attention step's recomputation."""

    def _projections(
        self,
        block: AttentionBlock,
        step_rows: dict[Role | ReceiverKind, list[int]],
        order: dict[Role, list[int]],
        units: FullPrecisionUnits,
        norm_aux: list[Aux],
        new_inputs: dict[int, torch.Tensor],
        rows: ReachedRows | None,
    ) -> list[torch.Tensor]:
        """The listed units' projections, by role, [B, T, units, width] (at reached ``rows`` only: [rows, units,
        width]). Receivers often hold one shared input tensor (every q/k/v input of a layer in a dense circuit,
        :meth:`_step_inputs`): each distinct input is normed once (the norm acts per position), and a role whose units
        all read one input projects it with one matrix multiply over their stacked weights instead of once per unit
        on copies of it."""
        slot: dict[int, int] = {}
        distinct: list[torch.Tensor] = []
        slots: dict[Role, list[int]] = {}
        for role in ROLES:
            slots[role] = []
            for u in order[role]:
                row = step_rows[role][u]
                x = new_inputs[row] if row in new_inputs else self._input(row)
                if id(x) not in slot:
                    slot[id(x)] = len(distinct)
                    distinct.append(self._flat(x) if rows is None else rows.take(self._flat(x)))
                slots[role].append(slot[id(x)])
        stacked = torch.stack(distinct, dim=-2) if len(distinct) > 1 else distinct[0].unsqueeze(-2)
        normed = block.norm(stacked, *norm_aux)
        parts = []
        for role in ROLES:
            if not order[role]:
                continue
            fp32 = units.query_head if role is Role.QUERY else units.kv_group
            projection = getattr(block, role.value)
            if len(set(slots[role])) == 1:
                parts.append(projection.units(normed.select(-2, slots[role][0]), order[role], fp32, shared_input=True))
            else:
                parts.append(projection.units(self._slots_of(normed, slots[role]), order[role], fp32))
        return parts

    @staticmethod
    def _slots_of(normed: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """The normed inputs at ``slots`` along dim -2: a view where they are one ascending range (every unit reading
        an input of its own, as in a dense circuit where kept edges differ per unit), a gathered copy otherwise."""
        start = slots[0]
        if slots == list(range(start, start + len(slots))):
            return normed.narrow(-2, start, len(slots))
        return normed.index_select(-2, torch.tensor(slots, device=normed.device))

    def _attention(
        self,
        k: int,
        new_inputs: dict[int, torch.Tensor],
        changed: list[int],
        units: FullPrecisionUnits,
        old_units: FullPrecisionUnits | None,
        activating: bool,
        pending: Pending,
        rows: ReachedRows | None,
    ) -> dict[int, Stored]:
        """Recompute the projections of attention step k that new inputs or a precision change reach (all of them
        when the step starts running), and the outputs of the heads whose value can differ from the state's, stored.
        With reached ``rows``, projections and outputs are computed at those rows only: the core mixes positions,
        so it still runs on every row."""
        block: AttentionBlock = getattr(self.graph, self.steps[k].module)
        layout = self.index.layouts[k]
        step_rows = self.index.step_rows[k]
        dirty: dict[Role, set[int]] = {role: set() for role in ROLES}
        for row in changed:
            role = self.index.row_role[row]
            assert role is not None, "an attention step's receivers are attention inputs"
            dirty[role].add(self.index.row_unit[row])
        if old_units is not None:
            for head in {old_units.query_head, units.query_head} - {-1}:
                dirty[Role.QUERY].add(head)
            for group in {old_units.kv_group, units.kv_group} - {-1}:
                dirty[Role.KEY].add(group)
                dirty[Role.VALUE].add(group)
        layer = self.edges.head_graph.layers[block.layer]
        heads = {h for role in ROLES for unit in dirty[role] for h in layer.heads_fed_by(role, unit)}
        if activating:
            # All projections are new to the state; FP32 heads reproduce their clean output exactly.
            dirty = {role: set(range(layout.n_heads if role is Role.QUERY else layout.n_groups)) for role in ROLES}
            if self.low_precision:
                heads = set(range(layout.n_heads))
        senders = self.index.step_senders[k]
        heads = {h for h in heads if self.edge_state.kept_out[senders[h]]}  # a dead head's output reaches nothing
        order = {role: sorted(dirty[role]) for role in ROLES}
        aux = self._aux(self.steps[k].aux)
        norm_aux, core_aux = aux[: block.n_norm_aux], aux[block.n_norm_aux :]
        parts = self._projections(block, step_rows, order, units, norm_aux, new_inputs, rows)
        values = torch.cat([part.flatten(-2) for part in parts], dim=-1)
        projections = values if activating else self._updated_projections(k, order, values, rows)
        pending.projections[k] = self._unflat(projections)
        if not heads:
            return {}
        ordered = sorted(heads)
        z = self._cores[k](*block.scatter(projections), *core_aux)
        z_heads = layout.z_of(z, ordered)
        pending.recomputed.extend(names.head(block.layer, h) for h in ordered)
        if rows is None:
            out = self._unflat(block.o.units(z_heads, ordered, units.query_head))
            return {senders[h]: self.codec.store(out.select(-2, i)) for i, h in enumerate(ordered)}
        out = block.o.units(rows.take(z_heads), ordered, units.query_head)
        return {senders[h]: self._with_rows(senders[h], rows, out.select(-2, i)) for i, h in enumerate(ordered)}

    def _updated_projections(
        self, k: int, order: dict[Role, list[int]], values: torch.Tensor, rows: ReachedRows | None
    ) -> torch.Tensor:
        """Step k's state projections [B, T, features] with the listed units' features replaced by ``values`` ([B, T,
        theirs], or [rows, theirs] at reached ``rows``); ``values`` themselves where they are every feature at every
        row."""
        old = self._flat(self.projections[k])
        layout = self.index.layouts[k]
        every_unit = all(len(order[role]) == len(layout.features[role]) for role in ROLES)
        index = torch.cat([layout.features[role][u] for role in ROLES for u in order[role]])
        if rows is None:
            return values if every_unit else old.index_copy(-1, index, values)
        flat = old.flatten(0, 1)
        if not every_unit:
            values = flat.index_select(0, rows.index).index_copy_(-1, index, values)
        return flat.index_copy(0, rows.index, values).view(old.shape)
