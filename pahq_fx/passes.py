"""The passes as plain functions, for use inside other compile pipelines.

``trace(model) -> GraphModule``; ``split_heads(GraphModule) -> GraphModule``;
``lower_precision(GraphModule, format, granularity) -> GraphModule``; ``set_head(GraphModule, head)``.
"""

from .precision import lower_precision, set_head
from .split import split_heads
from .trace import trace

__all__ = ["lower_precision", "set_head", "split_heads", "trace"]
