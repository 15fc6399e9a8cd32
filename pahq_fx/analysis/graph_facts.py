"""The facts every part of the analysis reads: recorded values, token-dependent nodes, outputs, logits."""

from __future__ import annotations

import torch
from torch import fx

from ..errors import UnsupportedArchitectureError
from ..ir.graph_utils import input_nodes, record_values
from .layout import Linear, as_linear, aten

ADD_TARGETS = {aten.add.Tensor, aten.add_.Tensor}  # Falcon adds attention into the MLP output in place


class GraphFacts:
    """A traced model run once on the example: values of every node, and which nodes depend on the tokens."""

    def __init__(self, gm: fx.GraphModule, example: torch.Tensor) -> None:
        self.gm = gm
        self.values = record_values(gm, example)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedArchitectureError(f"expected one input (input_ids), the graph has {len(placeholders)}")
        self.source = placeholders[0]
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.activations = self._activations()
        self.outputs = self._outputs()
        self.logits = self._logits()
        self.lead = tuple(self.values[self.logits].shape[:2])

    def _outputs(self) -> list[fx.Node]:
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        flat, _ = torch.utils._pytree.tree_flatten(out_node.args[0])
        for o in flat:
            if not isinstance(o, fx.Node) or not isinstance(self.values.get(o), torch.Tensor):
                raise UnsupportedArchitectureError(f"the graph returns {o!r}, which is not a tensor computed by the graph")
        return flat

    def _logits(self) -> fx.Node:
        """The logits among the outputs: the last-computed [batch, seq, vocab] tensor (a causal LM computes them
        last; key/value caches are 4-d, hidden states come before)."""
        batch, seq = self.values[self.source].shape
        candidates = [o for o in self.outputs if self.values[o].dim() == 3 and tuple(self.values[o].shape[:2]) == (batch, seq)]
        if not candidates:
            raise UnsupportedArchitectureError(
                f"none of the graph's {len(self.outputs)} outputs has the logits' shape [batch, seq, vocab]"
            )
        return max(candidates, key=self.order.__getitem__)

    def _activations(self) -> set[fx.Node]:
        """Nodes whose value depends on the token ids' values (not only on their shape)."""
        out = {self.source}
        for n in self.gm.graph.nodes:
            if n is self.source or n.target is aten.sym_size.int:
                continue
            if any(p in out for p in input_nodes(n)):
                out.add(n)
        return out

    def linear(self, node: fx.Node) -> Linear | None:
        return as_linear(node, self.values, self.activations)

    def is_residual_add(self, node: fx.Node) -> bool:
        return node.target in ADD_TARGETS and all(isinstance(a, fx.Node) and a in self.activations for a in node.args[:2])

    def single_activation_input(self, node: fx.Node) -> fx.Node | None:
        inputs = [p for p in input_nodes(node) if p in self.activations]
        return inputs[0] if len(inputs) == 1 else None
