"""What the analysis finds in a traced causal LM: attention calls and sites, linear ops, MLPs, the layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..ir.graph_utils import node_arg
from ..ir.names import Role

aten = torch.ops.aten


@dataclass(frozen=True)
class AttentionCall:
    """Where a graph computes attention: its query, key, value inputs and its output, each [batch, heads, ...]."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    output: fx.Node

    @property
    def inputs(self) -> list[fx.Node]:
        return [self.query, self.key, self.value]

    @property
    def name(self) -> str:
        return self.output.name


@dataclass(frozen=True)
class Linear:
    """A linear op of the graph, normalised to ``y = x @ weight.T + bias``."""

    node: fx.Node
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class AttentionSite:
    """One attention block as found in the graph, with its derived head layout."""

    layer: int
    read: fx.Node
    normed: fx.Node
    projections: list[Linear]
    projection_outputs: list[fx.Node]
    attention: AttentionCall
    z: fx.Node
    output_linear: Linear
    contribution: fx.Node
    output_scale: float
    role_features: dict[Role, list[list[int]]]
    z_features: list[list[int]]
    kv_group_of_head: tuple[int, ...]
    output_norm: fx.Node | None = None  # a post-attention norm's output: what the block adds to the residual stream
    coupled_roles: frozenset[Role] = frozenset()  # roles normalised across heads (OLMo 2's q/k norm)

    @property
    def residual_contribution(self) -> fx.Node:
        """What the block adds to the residual stream: its output, or its post-attention norm's output."""
        return self.contribution if self.output_norm is None else self.output_norm

    @property
    def n_heads(self) -> int:
        return len(self.role_features[Role.QUERY])

    @property
    def n_kv_groups(self) -> int:
        return len(self.role_features[Role.KEY])


@dataclass
class MLPSite:
    """A whole component: any residual contribution that is not attention or embedding (an MLP, a hybrid's
    convolution or state-space mixer). ``layer`` is the attention layer it follows (-1: before the first),
    ``position`` its place among the components that follow that layer."""

    layer: int
    read: fx.Node
    contribution: fx.Node
    position: int = 0


@dataclass
class ModelLayout:
    """Everything the split pass needs: sites, MLPs, the embedding and how every read sums contributions."""

    values: dict[fx.Node, Any]
    lead: tuple[int, int]
    embed: fx.Node
    sites: list[AttentionSite]
    mlps: list[MLPSite]
    final_read: fx.Node
    logits: fx.Node
    outputs: list[fx.Node]  # every graph output, in order; the logits are one of them
    leaves: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)


def as_linear(node: fx.Node, values: dict[fx.Node, Any], activations: set[fx.Node]) -> Linear | None:
    """Recognise ``node`` as a linear op with a constant weight, or return None."""
    if node.op != "call_function":
        return None

    def const(n: Any) -> torch.Tensor | None:
        return values.get(n) if isinstance(n, fx.Node) and n not in activations else None

    if node.target is aten.linear.default:
        weight, bias = const(node.args[1]), const(node.args[2]) if len(node.args) > 2 else None
        if weight is not None:
            return Linear(node, node_arg(node, 0), weight, bias)
    elif node.target is aten.addmm.default and not node.kwargs:
        weight, bias = const(node.args[2]), const(node.args[0])
        if weight is not None and bias is not None:
            return Linear(node, node_arg(node, 1), weight.t(), bias)
    elif node.target in (aten.mm.default, aten.matmul.default):
        weight = const(node.args[1])
        if weight is not None and weight.dim() == 2:
            return Linear(node, node_arg(node, 0), weight.t(), None)
    return None
