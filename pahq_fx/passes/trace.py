"""Hugging Face causal LM + example ``input_ids`` -> an ATen-level FX GraphModule that returns logits.

One generic path for every family: ``torch.export`` (non-strict) of a thin wrapper that calls the model
with ``use_cache=False`` and keeps only the logits, with dynamic batch and sequence dimensions where the
model allows it. Or the batch alone: ACDC's prompts all have one length, and a fixed length halves the export. That
graph is traced at a fixed batch and made batch-generic (:mod:`pahq_fx.passes.batch_generic`), by ``make_fx`` at export's
own ATen level without the rest of export (its imports, program and verifier): about a third of the export's time.
The model is put in eval mode and on the SDPA attention kernel for the duration of the trace (both so that the
attention call is one recognisable op), and restored afterwards: tracing does not mutate the model.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import fx, nn

from ..errors import InvalidInputsError
from ..ir import graph_meta
from ..ir.graph_utils import writes_in_place
from ..model_io import ExampleInputs, as_traced, check_ids_fit, default_example_inputs, id_limits, input_ids_from
from . import batch_generic, trace_cache
from .causal_attention import SwitchesAttention, mask_free_attention

aten = torch.ops.aten
_log = logging.getLogger(__name__)

# Ops that export leaves in an inference graph but that do nothing at inference time.
_NO_OP_TARGETS = {aten._assert_tensor_metadata.default}


@contextlib.contextmanager
def _inference_setup(model: nn.Module) -> Iterator[None]:
    """Eval mode and SDPA attention for the trace, restored on exit."""
    was_training = model.training
    config = getattr(model, "config", None)
    previous_impl: str | None = getattr(config, "_attn_implementation", None)
    switched = model if previous_impl is not None and previous_impl != "sdpa" and isinstance(model, SwitchesAttention) else None
    try:
        model.eval()
        if switched is not None:
            try:
                switched.set_attn_implementation("sdpa")
            except (ValueError, ImportError):
                switched = None
        yield
    finally:
        if switched is not None and previous_impl is not None:
            switched.set_attn_implementation(previous_impl)
        model.train(was_training)


DynamicShapes = bool | Literal["batch"]

_DIM_NAMES = ("batch", "seq")


def _dynamic_dims_of(dynamic_shapes: DynamicShapes) -> tuple[int, ...]:
    """The ``input_ids`` dimensions to keep dynamic: ``True`` batch and sequence, ``"batch"`` the batch, ``False`` none."""
    if dynamic_shapes is True or dynamic_shapes is False:
        return (0, 1) if dynamic_shapes else ()
    if dynamic_shapes == "batch":
        return (0,)
    raise InvalidInputsError(f"dynamic_shapes must be True, False or 'batch', got {dynamic_shapes!r}")


def _export(
    module: nn.Module, model: nn.Module, example: torch.Tensor, dims: tuple[int, ...]
) -> tuple[torch.export.ExportedProgram, tuple[int, ...]]:
    """The program and the dimensions it kept dynamic: ``dims``; else, for the batch alone, batch and sequence
    (export's guards can fail to simplify with a fixed length where they do with a symbolic one: Llama 4's
    chunked attention); else none, as some models specialise shapes. Where the sequence length is fixed, a causal
    mask is left to SDPA's ``is_causal`` when that is exact (:mod:`pahq_fx.passes.causal_attention`)."""
    attempts = [dims, (0, 1)] if dims == (0,) else [dims] if dims else []
    with _lean_trace():
        for attempt in attempts:
            # By position, not by name: a plain module's forward may call its input anything (nanoGPT's ``idx``).
            shapes = ({d: torch.export.Dim(_DIM_NAMES[d], min=1) for d in attempt},)
            with _attention_for(model, example, attempt), contextlib.suppress(Exception):
                program = torch.export.export(module, (example,), dynamic_shapes=shapes, strict=False)
                return program, attempt if program.range_constraints else ()
        with _attention_for(model, example, ()):
            return torch.export.export(module, (example,), strict=False), ()


def _attention_for(model: nn.Module, example: torch.Tensor, dynamic: tuple[int, ...]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if 1 in dynamic else mask_free_attention(model, example)


@contextlib.contextmanager
def _lean_trace() -> Iterator[None]:
    """A trace (export or ``make_fx``) without three costs that buy nothing here:

    - fake-tensor dispatch caching: a trace meets most op signatures once or twice, so filling the cache costs
      more than it saves;
    - stack traces on every node (``torch.fx.config.do_not_emit_stack_traces``): nothing downstream reads them;
    - the cyclic garbage collector, paused while export runs: its full collections walk every object that torch
      and transformers created. The garbage left is collected once the collector runs again.

    What it saves shows in a process that traces many times (the tests, sweeps, the naive reference); timings of
    the trace are in docs/performance.md.
    """
    import torch._dynamo.config
    import torch.fx.config

    collecting, stack_traces_off = gc.isenabled(), torch.fx.config.do_not_emit_stack_traces
    gc.disable()
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
            yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = stack_traces_off
        if collecting:
            gc.enable()


def _hidden_writes(graph: fx.Graph) -> bool:
    """Whether the graph writes tensors in place where data flow does not show it: an in-place op whose result
    nothing reads (``buffer[..., i] = x``, as Qwen3-Next's gated delta rule fills its output chunk by chunk), so
    later reads of the buffer do not depend on the write in the graph. The passes follow data flow, so such a
    graph is functionalised first. In-place ops whose result is read on (Falcon's residual ``add_``, routers'
    ``div_``) are seen and kept, as are graphs without any (most), which skip the functionalisation's cost."""
    return any(writes_in_place(n) and not n.users for n in graph.nodes)


def _strip_inference_no_ops(gm: fx.GraphModule) -> None:
    """Remove export's metadata asserts and eval-mode dropout."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _NO_OP_TARGETS:
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is aten.dropout.default and node.args[2] is False:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def trace(model: nn.Module, example_inputs: ExampleInputs | None = None, dynamic_shapes: DynamicShapes = True) -> fx.GraphModule:
    """Trace ``model`` into an ATen-level GraphModule.

    ``model`` is a Hugging Face causal LM (anything with a ``config``: it is called with
    ``use_cache=False`` and its ``.logits`` kept) or any module mapping ``input_ids`` to logits (or to a tuple
    of tensors among which the logits: see :func:`pahq_fx.analysis.analyse`). ``example_inputs`` is
    ``input_ids`` as a tensor, a tuple ``(input_ids,)`` or a dict / ``BatchEncoding`` (:func:`input_ids_from`).
    The result takes ``input_ids`` [batch, seq] and returns logits [batch, seq, vocab]. Its ``meta``
    holds the example input used (``meta["example_input_ids"]``) and the dimensions that stayed dynamic
    (``meta["dynamic_dims"]``: ``(0, 1)``, ``(0,)`` or ``()``). ``dynamic_shapes="batch"`` keeps the sequence
    length at the example's: where every input has one length (ACDC's tasks), that trace costs about half of a
    dynamic one (it is a fixed-batch trace made batch-generic and checked against the model at two other batch sizes;
    a model it does not reproduce is exported with a dynamic batch; see :func:`_fixed_shape_graph`).
    ``dynamic_shapes=False`` traces at the example's shape without first trying dynamic dimensions:
    for a model already known to specialise them, whose failed dynamic attempt can cost more than the trace itself
    (Qwen3-Next's unrolled recurrence). A model whose batch-only trace fails is traced with both dimensions
    dynamic; one that specialises a dimension it was asked to keep dynamic is traced at the example's shape.

    Traces of Hugging Face models are cached on disk (:mod:`pahq_fx.passes.trace_cache`; ``PAHQ_FX_TRACE_CACHE=off``
    turns it off): a model traced before, in any process, is loaded instead of exported again, once it reproduces
    the model's logits on the example.
    """
    requested = _dynamic_dims_of(dynamic_shapes)
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    else:
        example_inputs = input_ids_from(example_inputs)
        check_ids_fit(example_inputs, id_limits(model), "example_inputs")
    with _inference_setup(model), torch.no_grad():
        entry = trace_cache.key(model, example_inputs, requested)
        cached = None if entry is None else trace_cache.load(model, example_inputs, entry)
        if cached is not None and _reproduces(model, cached[0], example_inputs):
            gm, dims = cached
        else:
            gm, dims = _trace_afresh(model, example_inputs, requested)
            if entry is not None:
                trace_cache.store(gm, model, entry, dims)
    gm.meta[graph_meta.EXAMPLE_INPUT_IDS] = example_inputs
    gm.meta[graph_meta.DYNAMIC_DIMS] = dims
    return gm


def _trace_afresh(
    model: nn.Module, example_inputs: torch.Tensor, requested: tuple[int, ...]
) -> tuple[fx.GraphModule, tuple[int, ...]]:
    """(graph, the dimensions that stayed dynamic). A dynamic batch alone comes from a trace at a fixed batch made
    batch-generic (:mod:`pahq_fx.passes.batch_generic`) where that reproduces the model; otherwise from export's own
    dynamic shapes."""
    if requested == (0,):
        generic = _batch_generic_trace(model, example_inputs)
        if generic is not None:
            return generic, requested
    program, dims = _export(as_traced(model), model, example_inputs, requested)
    return _module_of(program), dims


def _module_of(program: torch.export.ExportedProgram) -> fx.GraphModule:
    if _hidden_writes(program.graph):  # checked before functionalising, which re-derives constraints
        program = program.run_decompositions({})
    gm = program.module(check_guards=False)  # no input-guard submodule: it would only be removed again
    _strip_inference_no_ops(gm)
    return gm


def _batch_generic_trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule | None:
    """The model traced at a fixed batch size and made batch-generic, or None where that fails or does not
    reproduce the model's logits at batch sizes other than the traced one (one row, and the example's rows)."""
    batch = batch_generic.tracing_batch(model, example)
    with _lean_trace(), _attention_for(model, example, ()):
        try:
            gm = _fixed_batch_graph(model, batch_generic.tiled(example, batch))
        # Any exception: tracing runs the model's own code at another batch size. The caller falls back to export,
        # which reports its own errors; the reason is logged for whoever debugs a slow trace.
        except Exception as error:
            _log.debug("fixed-batch trace of %s failed, exporting instead: %s", type(model).__name__, error)
            return None
    batch_generic.generalise(gm, batch)
    checks = (example[:1], batch_generic.tiled(example, 2) if example.shape[0] < 2 else example)
    return gm if all(_reproduces(model, gm, ids) for ids in checks) else None


def _fixed_batch_graph(model: nn.Module, input_ids: torch.Tensor) -> fx.GraphModule:
    """The model traced at the shape of ``input_ids``: by :func:`_fixed_shape_graph`, or by export where that graph
    writes in place out of data flow's sight (:func:`_hidden_writes`), which export's functionalisation resolves."""
    gm = _fixed_shape_graph(as_traced(model), input_ids)
    if _hidden_writes(gm.graph):
        return _module_of(torch.export.export(as_traced(model), (input_ids,), strict=False))
    _strip_inference_no_ops(gm)
    return gm


def _fixed_shape_graph(module: nn.Module, input_ids: torch.Tensor) -> fx.GraphModule:
    """``module`` traced at the shape of ``input_ids`` to export's ATen IR (pre-dispatch, fake tensors, the model
    told it is being exported so that it takes the same code paths), without the rest of export: its imports, its
    program, verifier and input guards cost more than the trace itself on small models."""
    from torch._export.utils import _compiling_state_context
    from torch.fx.experimental.proxy_tensor import make_fx

    with _compiling_state_context(), _attributes_kept(module):
        gm = make_fx(module, pre_dispatch=True, tracing_mode="fake", _allow_non_fake_inputs=True)(input_ids)
    (traced_input,) = (node for node in gm.graph.nodes if node.op == "placeholder")
    with gm.graph.inserting_before(traced_input):  # export's name for it, not make_fx's ``arg0_1``
        input_ids_node = gm.graph.placeholder("input_ids")
    input_ids_node.meta = dict(traced_input.meta)
    traced_input.replace_all_uses_with(input_ids_node)
    gm.graph.erase_node(traced_input)
    gm.recompile()
    return gm


@contextlib.contextmanager
def _attributes_kept(module: nn.Module) -> Iterator[None]:
    """Every submodule's attributes, parameters, buffers and children as they were before, afterwards (as export
    keeps them): a forward that assigns a tensor attribute, such as a cache built on first use, would otherwise leave
    one of the trace's fake tensors in the model."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]
    try:
        yield
    finally:
        for m, attributes, parameters, buffers, children in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            restored: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = (
                (m._parameters, parameters),
                (m._buffers, buffers),
                (m._modules, children),
            )
            for live, before in restored:
                live.clear()
                live.update(before)


def _reproduces(model: nn.Module, gm: fx.GraphModule, input_ids: torch.Tensor) -> bool:
    """Whether ``gm`` gives the model's outputs on ``input_ids``, to float32 round-off (False where either fails:
    a stale cache entry, a size the batch generalisation missed, or a model that runs only under export, as
    Dots3-Note's attention)."""
    try:
        got, want = gm(input_ids), as_traced(model)(input_ids)
    # Any exception: both run the model's own code; a graph that fails is one that does not reproduce it, and each
    # caller falls back to a path that reports its own errors (a fresh trace, or export with a symbolic batch).
    except Exception as error:
        _log.debug("%s does not reproduce its graph at shape %s: %s", type(model).__name__, tuple(input_ids.shape), error)
        return False
    got_flat, want_flat = (list(x) if isinstance(x, tuple) else [x] for x in (got, want))
    return len(got_flat) == len(want_flat) and all(
        g.shape == w.shape and bool(torch.allclose(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max().clamp_min(1e-6))))
        for g, w in zip(got_flat, want_flat, strict=True)
    )
