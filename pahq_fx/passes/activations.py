"""The activation-fusion pass: a chain of pointwise ops that computes GELU of one tensor -> one GELU op.

Many families write their activation out in Python (GPT-2's ``gelu_new``: ``0.5 * x * (1 + tanh(sqrt(2 / pi)
* (x + 0.044715 * x ** 3)))``), which the trace records as eight pointwise ops, each a full pass over the MLP's
hidden activations. ``aten.gelu`` computes the same function in one pass. The tanh form is fused into the operator
``pahq_fx::gelu_tanh`` (:data:`gelu_tanh`), which is ``aten.gelu`` except on float32/float64 CPU tensors without
autograd, where ATen's vectorised tanh is the slow part: there it computes ``x * sigmoid(2u)``, which equals
``0.5 x (1 + tanh(u))``, to a few ulps of float64 ``aten.gelu`` (tests/test_activations.py). Timings:
docs/performance.md.

The pass recognises activations by value, not by spelling: a region of pointwise ops whose only tensor input is
one node ``x`` is evaluated in float64 on a grid of probe values, and replaced when it equals a known activation
there to 1e-6 (relative to the activation's magnitude, at least 1). So every way of writing GELU (``gelu_new``,
``gelu_fast``, ``gelu_accurate``, the erf form) is fused, and a formula that differs (another constant, QuickGELU,
a clipped GELU) is left as it was. The fused op differs from the written-out chain by float32 round-off only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from ..ir.graph_utils import input_nodes

aten = torch.ops.aten

# Ops that map each element on its own, with Python scalars as their only other arguments.
_POINTWISE = {
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.rsub.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.pow.Tensor_Scalar,
    aten.neg.default,
    aten.tanh.default,
    aten.erf.default,
    aten.exp.default,
    aten.sigmoid.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.reciprocal.default,
}

# Where the probes are dense: GELU bends within a few units of zero and is x or 0 beyond.
_PROBES = torch.cat(
    [torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64), torch.tensor([-60.0, -30.0, 30.0, 60.0], dtype=torch.float64)]
)
_TOLERANCE = 1e-6


_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)

# An operator rather than a Python function, so that a graph holding it is one node to every tracer (FX's symbolic
# tracer traces a saved GraphModule again when it is loaded); CompositeImplicitAutograd: autograd, export and
# torch.compile see the ops its implementation runs.
torch.library.define("pahq_fx::gelu_tanh", "(Tensor x) -> Tensor")


@torch.library.impl("pahq_fx::gelu_tanh", "CompositeImplicitAutograd")
def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, ``0.5 x (1 + tanh(u))`` with ``u = sqrt(2 / pi) (x + 0.044715 x^3)``.

    On a CPU, float32 or float64 and no autograd, as ``x * sigmoid(2u)`` (the same function: ``0.5 (1 + tanh u) =
    sigmoid(2u)``) with in-place passes over one temporary, which is faster than ``aten.gelu`` there.
    Everywhere else (CUDA's one fused kernel, half-precision inputs that ``aten.gelu`` computes in float32,
    gradients, and under ``torch.compile``, which fuses either form) it is ``aten.gelu``."""
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and x.requires_grad)
    ):
        return aten.gelu.default(x, approximate="tanh")
    inner = x * x
    inner.mul_(_TWO_SQRT_2_OVER_PI * 0.044715).add_(_TWO_SQRT_2_OVER_PI).mul_(x)
    return inner.sigmoid_().mul_(x)


gelu_tanh = torch.ops.pahq_fx.gelu_tanh.default


@dataclass(frozen=True)
class Activation:
    """A function the pass fuses: its value in float64, and the fused node that replaces a chain computing it."""

    name: str
    reference: Callable[[torch.Tensor], torch.Tensor]
    target: torch._ops.OpOverload
    kwargs: dict


ACTIVATIONS = (
    Activation("gelu_tanh", lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), gelu_tanh, {}),
    Activation("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), aten.gelu.default, {}),
)


def _is_pointwise(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _POINTWISE


def _unary_regions(graph: fx.Graph) -> dict[fx.Node, tuple[fx.Node, frozenset[fx.Node]]]:
    """For every pointwise node that is a function of one tensor alone: (that tensor, the pointwise nodes between)."""
    regions: dict[fx.Node, tuple[fx.Node, frozenset[fx.Node]]] = {}
    for node in graph.nodes:
        if not _is_pointwise(node):
            continue
        sources: set[fx.Node] = set()
        region = {node}
        for parent in input_nodes(node):
            if parent in regions:
                source, inner = regions[parent]
                sources.add(source)
                region |= inner
            else:
                sources.add(parent)
        if len(sources) == 1:
            regions[node] = (sources.pop(), frozenset(region))
    return regions


def _evaluate(region: frozenset[fx.Node], source: fx.Node, output: fx.Node, probes: torch.Tensor) -> torch.Tensor:
    """The region's output with ``probes`` in place of its source (nodes in graph order are topologically sorted)."""
    values: dict[fx.Node, torch.Tensor] = {source: probes}
    node = source
    while node is not output:
        node = node.next
        if node in region:
            assert callable(node.target), "a region holds pointwise call_function nodes only"
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = node.target(*args, **kwargs)
    return values[output]


def _matching(region: frozenset[fx.Node], source: fx.Node, output: fx.Node) -> Activation | None:
    computed = _evaluate(region, source, output, _PROBES)
    for activation in ACTIVATIONS:
        expected = activation.reference(_PROBES)
        if torch.all((computed - expected).abs() <= _TOLERANCE * expected.abs().clamp(min=1.0)):
            return activation
    return None


def fuse_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every written-out GELU in ``gm`` by one node, ``aten.gelu`` or :data:`gelu_tanh` (module docstring).

    Rewrites ``gm`` in place and returns it (the pipeline owns the graph that :func:`~pahq_fx.passes.trace`
    returned; copying it would cost more than the pass). A region is fused only where nothing outside it reads
    its intermediate values. ``meta["fused_activations"]`` counts the fusions by activation name. A tanh GELU that
    the model already calls as one op becomes :data:`gelu_tanh` as well (not counted: nothing was fused).
    """
    regions = _unary_regions(gm.graph)
    fused: dict[str, int] = {}
    for output, (source, region) in regions.items():
        outermost = not any(user in regions and regions[user][0] is source for user in output.users)
        closed = all(user in region for node in region - {output} for user in node.users)
        value = source.meta.get("val")  # absent on graphs from the trace cache, which keeps no metadata
        floating = value is None or (isinstance(value, torch.Tensor) and value.is_floating_point())
        if not (outermost and closed and floating and len(region) > 1):
            continue
        activation = _matching(region, source, output)
        if activation is None:
            continue
        with gm.graph.inserting_before(output):
            replacement = gm.graph.call_function(activation.target, (source,), dict(activation.kwargs))
        replacement.meta = dict(output.meta)
        output.replace_all_uses_with(replacement)
        for node in reversed(list(gm.graph.nodes)):
            if node in region:
                gm.graph.erase_node(node)
        fused[activation.name] = fused.get(activation.name, 0) + 1
    retargeted = _retarget_tanh_gelu(gm.graph)
    if fused or retargeted:
        gm.recompile()
    gm.meta["fused_activations"] = fused
    return gm


def _retarget_tanh_gelu(graph: fx.Graph) -> int:
    """The model's own ``aten.gelu(approximate="tanh")`` nodes (``gelu_pytorch_tanh``: Gemma, GPT-BigCode) run as
    :data:`gelu_tanh` too, so that every tanh GELU of the graph takes the faster CPU path; how many."""
    count = 0
    for node in graph.nodes:
        if (
            node.op == "call_function"
            and node.target is aten.gelu.default
            and len(node.args) == 1
            and node.kwargs == {"approximate": "tanh"}
        ):
            node.target, node.kwargs = gelu_tanh, {}
            count += 1
    return count
