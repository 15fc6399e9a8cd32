"""Small, generic helpers over torch.fx graphs: reachability, dominators, recorded values, extraction.

Nothing here knows about attention or transformers; :mod:`pahq_fx.analysis` builds on these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg

aten = torch.ops.aten

# Ops that only change how a tensor is viewed or are identities at inference time.
SHAPE_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
}


def node_arg(node: fx.Node, index: int) -> fx.Node:
    """``node.args[index]`` where the op makes it a node (a tensor input): fx types an argument as any value a graph
    can hold, so this is where that is checked (a ``TypeError`` naming the node otherwise)."""
    value = node.args[index]
    if not isinstance(value, fx.Node):
        raise TypeError(f"{node.name}: argument {index} is {value!r}, not a node")
    return value


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads, in argument order, without duplicates."""
    seen: dict[fx.Node, None] = {}
    map_arg((node.args, node.kwargs), lambda n: seen.setdefault(n, None))
    return list(seen)


def writes_in_place(node: fx.Node) -> bool:
    """Whether the node is an ATen op that mutates one of its inputs (``add_``, ``copy_``, ``index_put_``)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def attribute(root: torch.nn.Module, target: str) -> Any:
    """What a ``get_attr`` node with this dotted ``target`` reads from ``root``."""
    for part in target.split("."):
        root = getattr(root, part)
    return root


def record_values(gm: fx.GraphModule, *args: Any) -> dict[fx.Node, Any]:
    """Run ``gm`` on ``args`` and return the value every node produced."""
    values: dict[fx.Node, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*args)
    return values


def ancestors(roots: Iterable[fx.Node], within: set[fx.Node] | None = None) -> set[fx.Node]:
    """All nodes the roots depend on (roots excluded), optionally restricted to ``within``."""
    out: set[fx.Node] = set()
    stack = [p for r in roots for p in input_nodes(r)]
    while stack:
        n = stack.pop()
        if n in out or (within is not None and n not in within):
            continue
        out.add(n)
        stack.extend(input_nodes(n))
    return out


def descendants(roots: Iterable[fx.Node], within: set[fx.Node] | None = None) -> set[fx.Node]:
    """All nodes that depend on the roots (roots excluded), optionally restricted to ``within``."""
    out: set[fx.Node] = set()
    stack = [u for r in roots for u in r.users]
    while stack:
        n = stack.pop()
        if n in out or (within is not None and n not in within):
            continue
        out.add(n)
        stack.extend(n.users)
    return out


def dominates(candidate: fx.Node, target: fx.Node, sources: set[fx.Node], within: set[fx.Node]) -> bool:
    """Whether every path from ``sources`` to ``target`` inside ``within`` passes through ``candidate``."""
    if candidate in sources:
        return True
    seen: set[fx.Node] = set()
    stack = list(sources)
    while stack:
        n = stack.pop()
        if n is candidate or n in seen or n not in within:
            continue
        if n is target:
            return False
        seen.add(n)
        stack.extend(n.users)
    return True


def first_with_shape(node: fx.Node, values: dict[fx.Node, Any], lead: Sequence[int], up: bool) -> fx.Node:
    """Walk through shape-only ops from ``node`` (upwards or downwards) to the first node whose
    value has the leading dimensions ``lead`` (the [batch, seq] of the residual stream)."""
    current = node
    while True:
        value = values.get(current)
        if isinstance(value, torch.Tensor) and tuple(value.shape[: len(lead)]) == tuple(lead) and value.dim() == len(lead) + 1:
            return current
        if up:
            if current.op != "call_function" or current.target not in SHAPE_OPS:
                return current
            current = node_arg(current, 0)
        else:
            users = list(current.users)
            if len(users) != 1 or users[0].target not in SHAPE_OPS:
                return current
            current = users[0]


def extract(
    gm: fx.GraphModule,
    nodes: set[fx.Node],
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    name: str,
    always_tuple: bool = False,
) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Copy ``nodes`` of ``gm`` into a new GraphModule.

    ``inputs`` become the first placeholders; every other value the nodes read from outside the set
    (other than parameters, which are copied as attributes) becomes an extra placeholder. Returns the
    module and the list of those extra outside nodes, in placeholder order. The module returns its one output
    as such, unless ``always_tuple`` (for callers that index the outputs, however many there are).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = graph.placeholder(f"in_{i}_{n.name}")
    extra: list[fx.Node] = []

    def lookup(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            env[n] = graph.get_attr(str(n.target))
            return env[n]
        extra.append(n)
        env[n] = graph.placeholder(f"aux_{n.name}")
        return env[n]

    order = [n for n in gm.graph.nodes if n in nodes and n not in inputs]
    # Placeholders must come first: discover outside reads before copying compute nodes.
    for n in order:
        for p in input_nodes(n):
            if (p not in nodes or p in inputs) and p.op != "get_attr":
                lookup(p)
    for n in order:
        env[n] = graph.node_copy(n, lookup)
    out = tuple(lookup(o) for o in outputs)
    graph.output(out[0] if len(out) == 1 and not always_tuple else out)
    graph.eliminate_dead_code()
    module = fx.GraphModule(gm, graph, class_name=name)
    return module, extra
