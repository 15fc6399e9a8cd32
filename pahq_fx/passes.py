"""The passes as plain functions, for use inside other compile pipelines.

``trace(model) -> GraphModule``; ``split_heads(GraphModule) -> GraphModule``;
``lower_precision(GraphModule, PrecisionConfig | format, granularity) -> GraphModule``; ``set_head(GraphModule, head)``;
``build(model, example_inputs, PrecisionConfig)``: the three in order, as every entry point of pahq_fx runs them.
"""

from .pipeline import build
from .precision import lower_precision, set_head
from .split import split_heads
from .trace import trace

__all__ = ["build", "lower_precision", "set_head", "split_heads", "trace"]
