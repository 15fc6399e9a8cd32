"""Typed access to what the passes leave in ``GraphModule.meta``, each reader naming the pass that writes it.

``trace`` writes the example input ids and whether shapes stayed dynamic; ``split_heads`` the
:class:`~pahq_fx.head_graph.HeadGraph` and the :class:`~pahq_fx.split.Structure`; ``lower_precision`` the
:class:`~pahq_fx.precision.PrecisionReport`. A missing key means a pass was skipped: the error says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from .head_graph import HeadGraph
    from .precision import PrecisionReport
    from .split import Structure

EXAMPLE_INPUT_IDS = "example_input_ids"
DYNAMIC_SHAPES = "dynamic_shapes"
HEAD_GRAPH = "head_graph"
STRUCTURE = "structure"
PRECISION = "precision"

_WRITTEN_BY = {
    EXAMPLE_INPUT_IDS: "pahq_fx.passes.trace",
    DYNAMIC_SHAPES: "pahq_fx.passes.trace",
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


def dynamic_shapes(gm: fx.GraphModule) -> bool:
    """Whether batch and sequence length stayed dynamic in the trace (a graph without the key is assumed dynamic)."""
    return bool(gm.meta.get(DYNAMIC_SHAPES, True))


def head_graph(gm: fx.GraphModule) -> HeadGraph:
    return _read(gm, HEAD_GRAPH)


def structure(gm: fx.GraphModule) -> Structure:
    return _read(gm, STRUCTURE)


def precision_report(gm: fx.GraphModule) -> PrecisionReport | None:
    """The lowering's report, None for a split graph that was not lowered (every head FP32)."""
    return gm.meta.get(PRECISION)
