"""``pahq_fx.transform``, the front door: trace -> split -> precision -> compile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .compile import CountingBackend, compile_module
from .deprecated import renamed
from .errors import UnsupportedArchitectureError
from .ir import graph_meta
from .ir.head_graph import HeadGraph
from .model_io import ExampleInputs, check_ids_fit, id_limits, input_ids_from
from .passes.pipeline import build
from .passes.precision import HeadSpec, PrecisionConfig, PrecisionReport, check_head, set_head
from .passes.weights import check_finite_weights, check_float32_weights


class PahqModel(nn.Module):
    """A causal LM split per head, with one head in FP32 and the others in low precision.

    Call it with ``input_ids`` to get logits. :meth:`set_head` switches the investigated head by writing
    buffers, so a compiled model is not retraced or recompiled (see :attr:`compilations`).
    """

    _runner: Callable  # the graph or its compiled form, kept out of the submodules

    def __init__(
        self,
        graph: fx.GraphModule,
        head: HeadSpec,
        compiled: bool,
        inner: str | Callable,
        limits: tuple[int | None, int | None] = (None, None),
    ) -> None:
        super().__init__()
        self.graph = graph
        self._limits = limits  # vocabulary size and maximum positions, checked on every call
        self._counter: CountingBackend | None = None
        runner: Callable = graph
        if compiled:
            runner, self._counter = compile_module(graph, inner)
        self.__dict__["_runner"] = runner
        self.set_head(head)

    @property
    def head(self) -> HeadSpec:
        return self._head

    @property
    def head_graph(self) -> HeadGraph:
        return graph_meta.head_graph(self.graph)

    @property
    def precision(self) -> PrecisionReport:
        return graph_meta.lowered_report(self.graph)

    @property
    def compilations(self) -> int:
        """Graphs compiled so far (0 when not compiled)."""
        return 0 if self._counter is None else self._counter.compilations

    def set_head(self, head: HeadSpec) -> None:
        """Investigate ``(layer, head)`` in FP32 (``None``: every head in low precision)."""
        check_head(self.graph, head)
        pair = None if head is None else (head[0], head[1])  # a checked pair, given as a tuple or a list
        set_head(self.graph, pair)
        self._head = pair

    def forward(self, input_ids: ExampleInputs, **entries: Any) -> torch.Tensor:
        """Logits for ``input_ids`` (a tensor, ``(ids,)``, a dict or ``BatchEncoding``); keyword entries, as in
        ``model(**encoding)``, are checked as a dict's are: a mask must mask nothing, other entries are refused."""
        input_ids = input_ids_from({"input_ids": input_ids, **entries} if entries else input_ids, "input")
        check_ids_fit(input_ids, self._limits)
        if not graph_meta.accepts_shape(self.graph, input_ids.shape):
            traced = tuple(graph_meta.example_input_ids(self.graph).shape)
            fixed = "static shapes" if not graph_meta.dynamic_dims(self.graph) else "a fixed sequence length"
            raise UnsupportedArchitectureError(
                f"this model was traced with {fixed} at {traced}, and input_ids have shape "
                f"{tuple(input_ids.shape)}; pass example_inputs of the shape you will use to transform()"
            )
        return self._runner(input_ids)

    def extra_repr(self) -> str:
        compiled = "compiled" if self._counter is not None else "eager"
        return f"head={self._head}, precision={self.precision.describe()}, {compiled}"

    def __repr__(self) -> str:
        return f"PahqModel({self.extra_repr()})\n{self.head_graph.describe()}"


@renamed("low_precision", "precision")
def transform(
    model: nn.Module,
    head: HeadSpec = None,
    *,
    example_inputs: ExampleInputs | None = None,
    precision: str = "fp8",
    granularity: str = "per_row",
    compile: bool = True,
    inner: str | Callable = "inductor",
) -> PahqModel:
    """Trace ``model``, split its attention per head, keep ``head`` in FP32 and the rest in ``precision``.

    ``example_inputs`` are the ``input_ids`` used for tracing -- a tensor, ``(input_ids,)`` or a dict /
    tokenizer ``BatchEncoding`` (default: a small random batch); batch and
    sequence length stay dynamic where the model allows it. ``precision`` is a registered format
    (:data:`pahq_fx.formats.FORMATS`: ``fp8`` (e4m3), ``fp8_e5m2``, ``bf16``, ``fp16``, ``fp32``); its default is FP8,
    PAHQ's format, since ``discover``'s ``auto`` measures ACDC queries and a transformed model runs none.
    ``granularity`` is ``per_row`` or ``per_tensor`` (FP8 only). ``low_precision=`` is the deprecated name of ``precision``.
    """
    config = PrecisionConfig(precision, granularity)
    check_float32_weights(model.parameters())  # before the trace, which can take a while on a large model
    check_finite_weights(model)
    return PahqModel(build(model, example_inputs, config), head, compile, inner, id_limits(model))
