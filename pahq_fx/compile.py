"""torch.compile of a transformed model, counting compilations, and the backend for other pipelines."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .errors import UnsupportedArchitectureError


class CountingBackend:
    """A torch.compile backend that forwards to ``inner`` and counts the graphs it was asked to compile."""

    def __init__(self, inner: str | Callable = "inductor") -> None:
        self.inner = inner
        self.compilations = 0
        self.seconds = 0.0  # inside the inner backend: the compile time proper (dynamo's tracing not included)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        self.compilations += 1
        start = time.perf_counter()
        try:
            if callable(self.inner):
                return self.inner(gm, example_inputs)
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend(self.inner)(gm, example_inputs)
        finally:
            self.seconds += time.perf_counter() - start


def _lift_weights(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[torch.Tensor], tuple]:
    """The same computation with every constant (weights, buffers) as a trailing input, the constants, and a
    signature of the graph's structure that ignores node names (so components of different layers compare equal)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(gm.graph.nodes)
    for i, node in enumerate(n for n in nodes if n.op == "placeholder"):
        env[node] = graph.placeholder(f"x{i}")
    constants = []
    for node in (n for n in nodes if n.op == "get_attr"):
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        env[node] = graph.placeholder(f"w{len(constants)}")
        constants.append(value)
    index = {node: i for i, node in enumerate(nodes)}
    signature = [tuple((c.shape, c.dtype) for c in constants)]
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("node", index[n]))
        signature.append((node.op, str(node.target), repr(args)))
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph), constants, tuple(signature)


def compile_by_structure(modules: list[fx.GraphModule], backend: Callable) -> list[Callable]:
    """One compiled graph per distinct structure among ``modules`` (for example one for every layer's MLP), with
    each module's weights passed as tensor inputs: the number of compilations does not grow with depth."""
    compiled: dict[tuple, Callable] = {}
    out = []
    for module in modules:
        lifted, constants, signature = _lift_weights(module)
        if signature not in compiled:
            compiled[signature] = torch.compile(lifted, backend=backend, dynamic=False)
        out.append(_WithConstants(compiled[signature], constants))
    return out


class _WithConstants:
    """Calls a weights-as-inputs graph with one component's weights."""

    def __init__(self, fn: Callable, constants: list[torch.Tensor]) -> None:
        self.fn = fn
        self.constants = constants

    def __call__(self, *args: torch.Tensor) -> Any:
        return self.fn(*args, *self.constants)


def compile_module(module: nn.Module, inner: str | Callable = "inductor") -> tuple[Callable, CountingBackend]:
    """``torch.compile`` with dynamic batch/sequence shapes; returns the callable and its counter."""
    counter = CountingBackend(inner)
    return torch.compile(module, backend=counter, dynamic=None), counter


def _token_input_index(example_inputs: list[Any]) -> int:
    integer = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2]
    if len(integer) != 1:
        raise UnsupportedArchitectureError(
            f"pahq_fx.backend expects a graph with one integer [batch, seq] input (input_ids); found {len(integer)}"
        )
    return integer[0]


class _GraphAsModel(nn.Module):
    """Dynamo's captured graph with parameters bound as attributes, taking only input_ids."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], token_index: int) -> None:
        super().__init__()
        self.gm = gm
        self.token_index = token_index
        self.constants = [t for i, t in enumerate(example_inputs) if i != token_index]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        args = list(self.constants)
        args.insert(self.token_index, input_ids)
        out = self.gm(*args)
        if isinstance(out, (tuple, list)):
            if len(out) != 1:
                raise UnsupportedArchitectureError(
                    "pahq_fx.backend needs the compiled function to return only logits "
                    f"(it returns {len(out)} tensors; call the model with use_cache=False and take .logits)"
                )
            out = out[0]
        return out


def backend(
    head: tuple[int, int] | None = None,
    low_precision: str = "fp8",
    granularity: str = "per_row",
    inner: str | Callable = "inductor",
) -> Callable[[fx.GraphModule, list[Any]], Callable]:
    """A ``torch.compile`` backend that applies the PAHQ passes, then compiles with ``inner``.

    Use as ``torch.compile(fn, backend=pahq_fx.backend(head=(0, 1)))`` where ``fn`` maps ``input_ids`` to
    logits (for a Hugging Face model: ``lambda ids: model(ids, use_cache=False).logits``). The graph dynamo
    captures is re-traced to ATen, split per head and lowered; the result is compiled with ``inner``.
    """
    from .precision import lower_precision, set_head
    from .split import split_heads
    from .trace import trace

    def compile_graph(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        token_index = _token_input_index(example_inputs)
        built: list[Callable] = []

        def build(args: tuple[Any, ...]) -> Callable:
            # Dynamo hands the backend fake tensors; the passes need real values, so build on first call.
            ids = args[token_index]
            wrapped = _GraphAsModel(gm, list(args), token_index)
            split = lower_precision(split_heads(trace(wrapped, ids)), low_precision, granularity)
            set_head(split, head)
            return split if inner == "eager" else torch.compile(split, backend=inner)

        def run(*args: Any) -> tuple[torch.Tensor]:
            if not built:
                built.append(build(args))
            return (built[0](args[token_index]),)

        return run

    return compile_graph
