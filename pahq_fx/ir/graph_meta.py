"""Typed access to what the passes leave in ``GraphModule.meta``, each reader naming the pass that writes it.

``trace`` writes the example input ids and which of their dimensions stayed dynamic; ``split_heads`` the
:class:`~pahq_fx.ir.head_graph.HeadGraph` and the :class:`~pahq_fx.ir.structure.Structure`; ``lower_precision`` the
:class:`~pahq_fx.passes.precision.PrecisionReport`. A missing key means a pass was skipped: the error says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ..errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from ..passes.precision import PrecisionReport
    from .head_graph import HeadGraph
    from .structure import Structure

EXAMPLE_INPUT_IDS = "example_input_ids"
DYNAMIC_DIMS = "dynamic_dims"
HEAD_GRAPH = "head_graph"
STRUCTURE = "structure"
PRECISION = "precision"

_WRITTEN_BY = {
    EXAMPLE_INPUT_IDS: "pahq_fx.passes.trace",
    DYNAMIC_DIMS: "pahq_fx.passes.trace",
    HEAD_GRAPH: "pahq_fx.passes.split_heads",
    STRUCTURE: "pahq_fx.passes.split_heads",
    PRECISION: "pahq_fx.passes.lower_precision",
}


def _read(gm: fx.GraphModule, key: str) -> Any:
    if key not in gm.meta:
        raise UnsupportedArchitectureError(f"this GraphModule has no meta[{key!r}]: run {_WRITTEN_BY[key]} on it first")
    return gm.meta[key]


def example_input_ids(gm: fx.GraphModule) -> torch.Tensor:
    return _read(gm, EXAMPLE_INPUT_IDS)


def dynamic_dims(gm: fx.GraphModule) -> tuple[int, ...]:
    """The ``input_ids`` dimensions (0: batch, 1: sequence) that stayed dynamic in the trace; a graph without the key
    is assumed dynamic in both."""
    return tuple(gm.meta.get(DYNAMIC_DIMS, (0, 1)))


def accepts_shape(gm: fx.GraphModule, shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether ``input_ids`` of ``shape`` can run on ``gm``: each dimension that is not dynamic has the example's size."""
    traced = example_input_ids(gm).shape
    dims = dynamic_dims(gm)
    return len(shape) == len(traced) and all(d in dims or shape[d] == traced[d] for d in range(len(traced)))


def head_graph(gm: fx.GraphModule) -> HeadGraph:
    return _read(gm, HEAD_GRAPH)


def structure(gm: fx.GraphModule) -> Structure:
    return _read(gm, STRUCTURE)


def precision_report(gm: fx.GraphModule) -> PrecisionReport | None:
    """The lowering's report, None for a split graph that was not lowered (every head FP32)."""
    return gm.meta.get(PRECISION)


def lowered_report(gm: fx.GraphModule) -> PrecisionReport:
    """The lowering's report of a graph that must have been lowered (a transformed model's)."""
    return _read(gm, PRECISION)
