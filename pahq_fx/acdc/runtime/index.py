"""The runtime's immutable index of the split graph: which step, role and unit each receiver row belongs to, which
step writes each sender, and where each head's features sit in an attention block's projections."""

from __future__ import annotations

import torch
from torch import fx

from ...errors import UnsupportedArchitectureError
from ...ir import names
from ...ir.modules import AttentionBlock
from ...ir.names import Role
from ...ir.structure import Step, StepKind
from ..edges import EdgeGraph, Receiver, ReceiverKind

ROLES = tuple(Role)


class AttentionLayout:
    """Where each head's query/key/value features sit in the block's concatenated projections, and its z features."""

    def __init__(self, block: AttentionBlock) -> None:
        device = block.z_order.device
        self.n_heads, self.n_groups = block.n_heads, block.n_kv_groups
        dq, dk, dv = (getattr(block, r.value).weight.shape[1] for r in ROLES)
        offsets = {Role.QUERY: 0, Role.KEY: self.n_heads * dq, Role.VALUE: self.n_heads * dq + self.n_groups * dk}
        widths = {Role.QUERY: dq, Role.KEY: dk, Role.VALUE: dv}
        self.features = {
            role: [
                torch.arange(offsets[role] + u * widths[role], offsets[role] + (u + 1) * widths[role], device=device)
                for u in range(self.n_heads if role is Role.QUERY else self.n_groups)
            ]
            for role in ROLES
        }
        self.dz = block.z_order.numel() // self.n_heads
        self.z_features = [block.z_order[h * self.dz : (h + 1) * self.dz] for h in range(self.n_heads)]
        self.z_in_head_order = block.z_span == (0, block.z_order.numel())

    def z_of(self, z: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """The core output's features of ``heads`` (sorted), [..., len(heads), dz]: a view where they are
        consecutive heads of a core output in head order."""
        if self.z_in_head_order and heads[-1] - heads[0] == len(heads) - 1:
            selected = z.narrow(-1, heads[0] * self.dz, len(heads) * self.dz)
        else:
            selected = z.index_select(-1, torch.cat([self.z_features[h] for h in heads]))
        return selected.unflatten(-1, (len(heads), -1))


class RuntimeIndex:
    """Rows (receivers) and senders by step, built once from the split graph's steps and the edge graph."""

    def __init__(self, graph: fx.GraphModule, steps: tuple[Step, ...], edges: EdgeGraph) -> None:
        self.edges = edges
        self.n_steps = len(steps)
        step_index = {s.name: k for k, s in enumerate(steps)}
        self.row_step: list[int] = []
        self.step_rows: list[dict[Role | ReceiverKind, list[int]]] = [{} for _ in steps]
        for row, r in enumerate(edges.receivers):
            if r.kind is ReceiverKind.RESID_POST:
                self.final_row = row
                self.row_step.append(len(steps))
                continue
            k = step_index[names.attention(r.attention_input[0]) if r.is_attention_input else r.name]
            self.row_step.append(k)
            units = self.step_rows[k].setdefault(r.role or r.kind, [])
            unit = 0 if r.unit is None else r.unit
            units.extend([-1] * (unit + 1 - len(units)))
            units[unit] = row
        self.row_role = [r.role for r in edges.receivers]
        self.row_unit = [0 if r.unit is None else r.unit for r in edges.receivers]
        self.sender_step: list[int] = []
        self.step_senders: list[list[int]] = [[] for _ in steps]
        for s in edges.senders:
            k = step_index.get(s.component, -1)
            self.sender_step.append(k)
            if k >= 0:
                self.step_senders[k].append(s.index)
        self.feeding = [list(edges.feeding_senders(r)) for r in edges.receivers]
        for k, step in enumerate(steps):
            if not self.step_senders[k]:
                raise UnsupportedArchitectureError(f"component {step.name} has no senders in the edge graph")
        self.layouts = {k: AttentionLayout(getattr(graph, s.module)) for k, s in enumerate(steps) if s.kind is StepKind.ATTENTION}

    def cone_steps(self, row: int) -> int:
        """The steps a query into receiver ``row`` may recompute, the final read included: its own step and every one
        after it (what a dense cone runs, the progress bars' measure of a query's work)."""
        return self.n_steps + 1 - min(self.row_step[row], self.n_steps)

    def ends_step(self, row: int) -> bool:
        """Whether ``row`` is the last receiver of its step in search order (a later row belongs to another step)."""
        return row + 1 < len(self.row_step) and self.row_step[row + 1] != self.row_step[row]

    def start_of(self, receiver: Receiver) -> int:
        """Index of the first step that runs while this receiver is investigated (len(steps): only the final read)."""
        return self.row_step[self.edges.receiver_index[receiver.name]]
