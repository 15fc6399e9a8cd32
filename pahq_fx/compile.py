"""torch.compile of a transformed model, counting compilations, and the backend for other pipelines."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .deprecated import renamed
from .errors import UnsupportedArchitectureError
from .ir.graph_utils import attribute
from .passes.weights import check_float32_weights


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
            return _compile_with(self.inner, gm, example_inputs)
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
    constants: list[torch.Tensor] = []
    for node in (n for n in nodes if n.op == "get_attr"):
        env[node] = graph.placeholder(f"w{len(constants)}")
        constants.append(attribute(gm, node.target))
    index = {node: i for i, node in enumerate(nodes)}
    signature: list[tuple[Any, ...]] = [tuple((c.shape, c.dtype) for c in constants)]
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
    out: list[Callable] = []
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
    integer = [
        i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2
    ]
    if len(integer) != 1:
        raise UnsupportedArchitectureError(
            "pahq_fx.backend expects a graph with exactly one integer [batch, seq] input (input_ids); this one has "
            f"{len(integer)} (an attention_mask or position_ids passed by the caller counts: call the model with input_ids only)"
        )
    return integer[0]


def _has_attention(gm: fx.GraphModule) -> bool:
    """Whether a graph dynamo captured computes attention: an SDPA call, or softmax and matmul as eager attention."""
    targets = {str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}

    def has(word: str) -> bool:
        return any(word in t for t in targets)

    return has("scaled_dot_product_attention") or (has("softmax") and (has("matmul") or has("bmm")))


class _GraphAsModel(nn.Module):
    """Dynamo's captured graph with every input but input_ids bound (parameters, buffers), taking only input_ids.

    Returns what the graph returns: the logits alone or a tuple (logits, key/value caches, hidden states...)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], token_index: int) -> None:
        super().__init__()
        self.gm = _without_grad_mode_switches(gm)
        self.token_index = token_index
        self.constants = [t for i, t in enumerate(example_inputs) if i != token_index]

    def forward(self, input_ids: torch.Tensor) -> Any:
        args = list(self.constants)
        args.insert(self.token_index, input_ids)
        out = self.gm(*args)
        if not isinstance(out, (tuple, list)):
            return out
        return out[0] if len(out) == 1 else tuple(out)


def _without_grad_mode_switches(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without dynamo's ``_set_grad_enabled`` calls (Llama's rotary runs under ``no_grad``).

    The passes trace for inference under ``no_grad``; a recorded switch back to grad mode would make
    ``torch.export`` wrap the rest of the model in a higher-order op the passes cannot see into."""
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled and not node.users:
            graph.erase_node(node)
    return fx.GraphModule(gm, graph)


def _compile_with(inner: str | Callable, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    if callable(inner):
        return inner(gm, example_inputs)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)(gm, example_inputs)


@renamed("low_precision", "precision")
def backend(
    head: tuple[int, int] | None = None,
    precision: str = "fp8",
    granularity: str = "per_row",
    inner: str | Callable = "inductor",
) -> Callable[[fx.GraphModule, list[Any]], Callable]:
    """A ``torch.compile`` backend that applies the PAHQ passes, then compiles with ``inner``.

    ``torch.compile(hf_model, backend=pahq_fx.backend(head=(0, 1)))``, then ``hf_model(ids)`` as usual: the
    model's output object comes back, its logits those of :func:`pahq_fx.transform` and its key/value cache (or
    hidden states) computed by the split graph. Every graph dynamo hands over that computes attention is
    re-traced to ATen, split per head, lowered, and compiled with ``inner`` (a backend name or any backend
    callable; ``"eager"`` runs the split graph as is); graphs without attention go to ``inner`` untouched.
    Such a graph must take one integer ``[batch, seq]`` input (``input_ids``); anything else is an
    :class:`UnsupportedArchitectureError` naming what was found. ``precision`` and ``granularity`` as in
    :func:`pahq_fx.transform` (``low_precision=`` is the deprecated name of ``precision``).
    """
    from .passes.pipeline import build as build_graph
    from .passes.precision import PrecisionConfig, set_head

    config = PrecisionConfig(precision, granularity)

    def compile_graph(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        if not _has_attention(gm):
            return _compile_with(inner, gm, example_inputs)
        token_index = _token_input_index(example_inputs)
        _check_inputs_are_module_state(gm, example_inputs, token_index)
        returned = _output_arg(gm)
        multiple = isinstance(returned, (tuple, list)) and len(returned) > 1
        built: list[Callable] = []

        def build(args: tuple[Any, ...]) -> Callable:
            # Dynamo hands the backend fake tensors; the passes need real values, so build on first call.
            ids = args[token_index]
            check_float32_weights(a for a in args if isinstance(a, nn.Parameter))  # the graph reads them as constants
            wrapped = _GraphAsModel(gm, list(args), token_index)
            split = build_graph(wrapped, ids, config)
            set_head(split, head)
            return split if inner == "eager" else torch.compile(split, backend=inner)

        bound: list[tuple] = []

        def run(*args: Any) -> tuple[torch.Tensor, ...]:
            if not built:
                built.append(build(args))
                bound.append(_identities(args, token_index))
            elif _identities(args, token_index) != bound[0]:
                raise UnsupportedArchitectureError(
                    "pahq_fx.backend: an input other than input_ids changed between calls (for example a key/value "
                    "cache passed back in to decode the next token); the split graph binds them at its first call. "
                    "Call the model on whole sequences (past_key_values=None), or use pahq_fx.transform"
                )
            out = built[0](args[token_index])
            return tuple(out) if multiple else (out,)

        return run

    return compile_graph


def _check_inputs_are_module_state(gm: fx.GraphModule, example_inputs: list[Any], token_index: int) -> None:
    """Every input but input_ids must be a parameter or buffer (bound once); dynamo names where each came from."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False)):
        grapharg = node.meta.get("grapharg")
        if i == token_index or grapharg is None or isinstance(value, nn.Parameter):
            continue
        source = grapharg.source.name if hasattr(grapharg.source, "name") else str(grapharg.source)
        if isinstance(value, torch.Tensor) and "._parameters[" not in source and "._buffers[" not in source:
            raise UnsupportedArchitectureError(
                f"pahq_fx.backend: the graph takes {source} as an input besides input_ids; only input_ids may vary "
                "(a key/value cache passed back in, masks or embeddings are not supported: call the model on whole "
                "sequences with input_ids only, or use pahq_fx.transform)"
            )


def _identities(args: tuple[Any, ...], token_index: int) -> tuple:
    """What identifies the bound inputs (parameters, buffers): storage, shape and version of each tensor."""
    return tuple(
        (a.data_ptr(), tuple(a.shape), a._version) if isinstance(a, torch.Tensor) else a
        for i, a in enumerate(args)
        if i != token_index
    )


def _output_arg(gm: fx.GraphModule) -> Any:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]
