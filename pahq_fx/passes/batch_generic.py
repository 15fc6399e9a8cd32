"""A graph that takes any batch size, from a trace at one fixed batch size.

``torch.export`` with a dynamic batch dimension reasons symbolically about every shape in the model (sympy
relations for each view, each norm's decomposition, each matmul): on the 8-head GPT-2 about a third of the export.
A causal LM's graph uses its batch size only as a size (views, expands, new tensors), so a trace at a fixed batch
size ``B`` can be made batch-generic afterwards: every integer argument that is a positive multiple ``k * B`` becomes
``sym_size(input_ids, 0) * k``, the same nodes a dynamic export writes. ``B`` is chosen so that a literal of the
model itself is not mistaken for the batch (:func:`tracing_batch`: Qwen3-Next's unrolled recurrence spells out
every index of its 64-token chunk); the caller checks the result against the model at two other batch sizes and
traces dynamically where it differs. A fixed shape also lets the trace skip export itself (``make_fx`` at export's
ATen level, :func:`pahq_fx.passes.trace._fixed_shape_graph`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

aten = torch.ops.aten

# Integers of a config up to this bound may be loop bounds (chunk sizes, windows, kernel widths) whose indices the
# graph spells out; the tracing batch is larger than all of them. Larger config values (vocabularies, theta) are
# only sizes: the batch must not divide them.
_LOOP_BOUND = 8192
_SLICE_END = 2**63 - 1  # what slices use for "to the end"


def _integers(value: Any) -> Iterator[int]:
    """Every integer inside a config value (nested dicts, lists and tuples)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _integers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _integers(item)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def tracing_batch(model: nn.Module, example: torch.Tensor) -> int:
    """The batch size to trace at: a prime larger than the example's length and every config integer up to
    ``_LOOP_BOUND`` (so that no index or size of the model equals it) that divides none of the config's integers
    (so that no product of them is a multiple of it)."""
    config = getattr(model, "config", None)
    known = [*example.shape, _SLICE_END]
    if config is not None and hasattr(config, "to_dict"):
        known.extend(_integers(config.to_dict()))
    known = [abs(i) for i in known if i]
    batch = max([example.shape[1], *(i for i in known if i <= _LOOP_BOUND)]) + 1
    while not _is_prime(batch) or any(i % batch == 0 for i in known):
        batch += 1
    return batch


def tiled(example: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` rows of ``example`` (its rows repeated in order)."""
    return example[torch.arange(batch, device=example.device) % example.shape[0]]


def generalise(gm: fx.GraphModule, batch: int) -> int:
    """Make the batch size of ``gm`` (traced at ``batch``) symbolic, in place; the number of literals replaced."""
    graph = gm.graph
    input_ids = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(input_ids):
        size = graph.call_function(aten.sym_size.int, (input_ids, 0))
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node is size or node.target is operator.getitem:
            continue  # a tuple's index is a position among a fixed number of outputs, never a size

        def symbolic(value: Any, node: fx.Node = node) -> Any:
            nonlocal replaced
            if type(value) is not int or value <= 0 or value % batch:
                return value
            replaced += 1
            if value == batch:
                return size
            with graph.inserting_before(node):
                return graph.call_function(operator.mul, (size, value // batch))

        node.args = fx.node.map_aggregate(node.args, symbolic)
        node.kwargs = fx.node.map_aggregate(node.kwargs, symbolic)
    if not replaced:
        graph.erase_node(size)
    gm.recompile()
    # export's input check would hold every call to the traced batch size; torch types Module.__setattr__ for tensors
    # and modules only, and this is the plain flag the exported module reads
    gm.validate_inputs = False  # type: ignore[assignment]
    return replaced
