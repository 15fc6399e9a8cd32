"""The passes as plain functions, for use inside other compile pipelines.

``trace(model) -> GraphModule``; ``fuse_activations(GraphModule) -> GraphModule`` (in place);
``split_heads(GraphModule) -> GraphModule``;
``lower_precision(GraphModule, PrecisionConfig | format, granularity) -> GraphModule``; ``set_head(GraphModule, head)``;
``build(model, example_inputs, PrecisionConfig)``: the four in order, as every entry point of pahq_fx runs them.

Each pass lives in a module of this package. ``pahq_fx.passes.trace`` is the function, which shadows its module of
the same name: ``importlib.import_module("pahq_fx.passes.trace")`` reaches the module.
"""

from .activations import fuse_activations
from .pipeline import build
from .precision import lower_precision, set_head
from .split import split_heads
from .trace import trace

__all__ = ["build", "fuse_activations", "lower_precision", "set_head", "split_heads", "trace"]
