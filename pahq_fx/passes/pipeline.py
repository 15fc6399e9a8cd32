"""The one pipeline every entry point runs: trace -> fuse_activations -> split_heads -> lower_precision.

:func:`pahq_fx.transform`, :func:`pahq_fx.backend`, ACDC and the benchmarks all build their graph here, so a
change to the order or to a pass's arguments happens once.
"""

from __future__ import annotations

from torch import fx, nn

from ..model_io import ExampleInputs
from .activations import fuse_activations
from .precision import PrecisionConfig, lower_precision
from .split import split_heads
from .trace import trace


def lower_split(traced: fx.GraphModule, config: PrecisionConfig) -> fx.GraphModule:
    """fuse_activations -> split_heads -> lower_precision on an already traced model (ACDC traces on two prompts
    of the task). The activation fusion rewrites ``traced`` in place."""
    return lower_precision(split_heads(fuse_activations(traced)), config)


def build(model: nn.Module, example_inputs: ExampleInputs | None = None, config: PrecisionConfig | None = None) -> fx.GraphModule:
    """trace -> fuse_activations -> split_heads -> lower_precision: the per-head GraphModule of ``model`` under ``config``
    (default: FP8 e4m3, per-row scaling). No head is in FP32 until :func:`pahq_fx.passes.set_head` says which."""
    return lower_split(trace(model, example_inputs), config or PrecisionConfig())
