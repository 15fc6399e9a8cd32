"""The residual stream: where a component reads it, and which contributions a read sums."""

from __future__ import annotations

import torch
from torch import fx

from ..errors import UnsupportedArchitectureError
from ..ir.graph_utils import SHAPE_OPS, ancestors, dominates, node_arg
from .graph_facts import GraphFacts
from .layout import aten

CAST_OPS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


class ResidualStream:
    """Reads (nearest residual dominators) and their decomposition into contributions."""

    def __init__(self, facts: GraphFacts) -> None:
        self.facts = facts

    def find_read(self, target: fx.Node, what: str, itself: bool = False) -> fx.Node:
        """Nearest dominator of ``target`` on the residual stream: a residual add, or a node that also flows into
        one outside the component (a norm output shared by attention and MLP, as in GPT-J, is neither).
        With ``itself``, ``target`` may be its own read (projections reading the stream with no norm between)."""
        upstream = ancestors([target], within=self.facts.activations)
        inside = upstream | {target}
        within = self.facts.activations
        candidates = sorted(upstream, key=self.facts.order.__getitem__, reverse=True)
        for candidate in ([target] if itself else []) + candidates:
            if candidate is self.facts.source or not dominates(candidate, target, {self.facts.source}, within):
                continue
            feeds_residual = any(u not in inside and self.facts.is_residual_add(u) for u in candidate.users)
            if self.facts.is_residual_add(candidate) or feeds_residual:
                return candidate
        raise UnsupportedArchitectureError(f"no residual-stream input found for {what} ({target.name})")

    def decompose(self, node: fx.Node, stop: set[fx.Node]) -> list[fx.Node]:
        """The contributions whose sum is ``node``, following residual adds and identity casts/views."""
        if node in stop:
            return [node]
        if self.facts.is_residual_add(node) and not node.kwargs:
            return self.decompose(node_arg(node, 0), stop) + self.decompose(node_arg(node, 1), stop)
        if node.target in SHAPE_OPS | CAST_OPS and self.token_reshape(node_arg(node, 0), node):
            return self.decompose(node_arg(node, 0), stop)
        return [node]

    def token_reshape(self, source: fx.Node, node: fx.Node) -> bool:
        """Whether ``node`` holds ``source``'s values, at most with the token dimensions merged or split
        (OPT runs its MLP residual on [batch * seq, d])."""
        before, after = self.facts.values[source], self.facts.values[node]
        return (
            isinstance(before, torch.Tensor)
            and isinstance(after, torch.Tensor)
            and before.dtype == after.dtype
            and before.shape[-1] == after.shape[-1]
            and before.numel() == after.numel()
        )

    def stream_shaped(self, node: fx.Node) -> fx.Node:
        """Walk up through token reshapes to the [batch, seq, d] form of a residual-stream node."""
        while (
            node.target in SHAPE_OPS
            and self.facts.values[node].dim() != len(self.facts.lead) + 1
            and self.token_reshape(node_arg(node, 0), node)
        ):
            node = node_arg(node, 0)
        return node
