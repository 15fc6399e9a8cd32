"""A plan before the run: edges, queries, memory and time of an ACDC search, and whether it fits (docs/runtime.md).

The memory figures are arithmetic over the edge graph and the tensor shapes, following what
:class:`~pahq_fx.acdc.runtime.PatchingRuntime` allocates (``_setup_caches``, ``reset``, ``commit``, a query's
``_cascade``), so they need no weights: :func:`plan_from_config` plans Llama-3.1-8B at 1500 tokens from its
configuration alone (parameters counted on the meta device). :func:`plan` plans a loaded model on a task, and
with ``calibrate`` times a few real queries per layer on a runtime built as ``discover`` builds it, to extrapolate
the time of a whole run.

What the runtime holds (``N = batch x seq`` tokens, ``d`` = d_model, ``F`` the final read's rows: the metric
positions where the unembedding acts per token, ``S`` senders, ``K`` steps):

* caches, from setup to the end: every sender's clean output and corrupted-minus-clean (``2 S`` x ``N x d``), every
  step's clean read (``K`` x ``N x d``), corrupted-minus-clean at the final rows (``S`` x ``F x d``) and the clean
  final read (``F x d``). ``state_bytes()`` right after setup is exactly this.
* state, once every step runs with every edge kept: each attention layer's projections
  (``N x (H + 2 G) d_head``), and the trailing MLP (and post-attention norm) moved to the final rows
  (``2 F x d`` each); inputs and outputs still share the clean caches. Exact, too.
* state bound: on top, an own output for every sender but the embedding and an own input for every receiver but
  ``resid_post`` (``(S - 1 + R - 1)`` x ``N x d``): what a search that changes every component would hold.
* a query's transient tensors, for a dense query into the first layer (its cone is everything above): per attention
  layer the shared new input, new projections, the heads' new outputs (stored) and their summed change
  (``2 N d + N (H + 2 G) d_head`` in FP32, ``H`` stored outputs), per MLP an input, a change and a stored output,
  and the largest component's own temporaries (an MLP's hidden activations, an attention core's scores); the bound
  adds the heads' own changes, kept where a receiver adds one alone.
* setup's own peak: the corrupted run's reads exist next to the caches for a moment.

``receiver_inputs="recomputed"`` holds no per-receiver input: the state bound has two FP32 streams per step instead
(the stream's change and the corrupted read), and a query holds one step's new and rebuilt inputs at a time.

``storage`` is the runtime's storage format (:mod:`~pahq_fx.acdc.storage`): the clean and corrupted-minus-clean
outputs of every sender and the senders' own outputs at that element size (fp8: one FP32 scale per row); the clean
reads in bf16 for either low format; projections, inputs and the final read FP32, as the runtime holds them.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..atomic import write_text
from ..errors import PlanError, UnsupportedArchitectureError
from ..ir import names
from ..ir.head_graph import Component, HeadGraph, LayerInfo
from ..ir.names import Role
from ..memory_size import parse_bytes

FP32 = "fp32"
# Element bytes of a storage format, and the extra bytes per stored row (fp8: one FP32 scale per row).
STORAGE = {"fp32": (4, 0), "bf16": (2, 0), "fp8": (1, 4)}
# The format each storage format holds the clean reads in (storage.READ_STORAGE, here without importing torch).
READ_STORAGE = {"fp32": "fp32", "bf16": "bf16", "fp8": "bf16"}
GiB = 2**30
# Receivers' inputs: every one stored in the state, or rebuilt when a query reaches it (runtime/inputs.py).
STORED, RECOMPUTED = "stored", "recomputed"
RECEIVER_INPUTS = (STORED, RECOMPUTED)
BOUND, DENSE = "bound", "dense"  # what a check assumes of the circuit: anything (the bound), or a dense one

_GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2"}
_OUTPUT_NORM = {"gemma2", "olmo2"}


# ---------------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """What the arithmetic needs about a model: its per-head graph, widths, and weight bytes."""

    name: str
    head_graph: HeadGraph
    d_head: int
    d_mlp: int
    vocab: int
    gated_mlp: bool
    model_bytes: int  # the model's own parameters and buffers (FP32: pahq_fx refuses narrower weights)
    split_bytes: int  # what the split graph adds: per-head copies of q, k, v, o weights, their biases, index buffers
    token_wise: bool = True  # the final norm and unembedding act per token: the final read keeps the metric rows only
    split_peak: int | None = None  # measured: the most the trace and split held above the model's weights

    @property
    def d_model(self) -> int:
        return self.head_graph.d_model

    @property
    def layers(self) -> int:
        return self.head_graph.n_layers

    def steps(self) -> list[tuple[str, str, int]]:
        """(kind, name, layer) of every step in execution order: ``attention``, ``norm`` or ``mlp``."""
        out = [("mlp", c.name, -1) for c in self.head_graph.leading]
        for layer in self.head_graph.layers:
            out.append(("attention", names.attention(layer.index), layer.index))
            if layer.has_output_norm:
                out.append(("norm", layer.output_norm_name, layer.index))
            out += [("mlp", c.name, layer.index) for c in layer.components]
        return out


def head_graph_from_config(config: Any) -> HeadGraph:
    """The per-head graph the split pass finds in a Hugging Face decoder of a known family (GPT-2, GPT-NeoX
    sequential or parallel, OPT, Llama, Mistral, Qwen2, Gemma 2), built from its configuration alone."""
    kind = getattr(config, "model_type", "")
    n_layers, n_heads, n_groups, d_model = _sizes(config)
    if n_heads % n_groups:
        raise UnsupportedArchitectureError(f"{n_heads} heads do not split into {n_groups} key/value groups")
    parallel = kind == "gpt_neox" and bool(getattr(config, "use_parallel_residual", True))
    output_norm = kind in _OUTPUT_NORM
    coupled = frozenset({Role.QUERY, Role.KEY}) if kind == "olmo2" else frozenset()
    written = [names.EMBED]
    layers = []
    per_group = n_heads // n_groups
    for index in range(n_layers):
        attention = names.attention_output(index) if output_norm else names.attention(index)
        mlp = names.mlp(index)
        reads = tuple(written) if parallel else (*written, attention)
        layers.append(
            LayerInfo(
                index,
                n_heads,
                n_groups,
                tuple(h // per_group for h in range(n_heads)),
                tuple(written),
                (Component(mlp, reads),),
                output_norm,
                coupled,
            )
        )
        written += [attention, mlp]
    return HeadGraph(tuple(layers), tuple(written), d_model)


def _sizes(config: Any) -> tuple[int, int, int, int]:
    kind = getattr(config, "model_type", "")
    known = {"gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen2", "gemma2", "olmo2"}
    if kind not in known:
        raise UnsupportedArchitectureError(
            f"no configuration-only plan for model_type {kind!r} (known: {', '.join(sorted(known))}); "
            "pahq_fx.plan(model, task) traces the model instead"
        )
    n_layers = _first(config, "num_hidden_layers", "n_layer")
    n_heads = _first(config, "num_attention_heads", "n_head")
    n_groups = getattr(config, "num_key_value_heads", None) or n_heads
    d_model = _first(config, "hidden_size", "n_embd")
    return n_layers, n_heads, n_groups, d_model


def _first(config: Any, *keys: str) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise UnsupportedArchitectureError(f"the configuration has none of {', '.join(keys)}")


def geometry_from_config(config: Any, name: str | None = None, model_bytes: int | None = None) -> Geometry:
    """A :class:`Geometry` from a Hugging Face configuration: parameters counted on the meta device (no weights),
    unless ``model_bytes`` gives them."""
    kind = config.model_type
    n_layers, n_heads, n_groups, d_model = _sizes(config)
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    d_mlp = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or getattr(config, "ffn_dim", None)
        or 4 * d_model
    )
    vocab = int(config.vocab_size)
    model_bytes = _meta_model_bytes(config) if model_bytes is None else model_bytes
    q_bias = kind in ("gpt2", "gpt_neox", "opt", "qwen2") or bool(getattr(config, "attention_bias", False))
    o_bias = kind in ("gpt2", "gpt_neox", "opt") or bool(getattr(config, "attention_bias", False))
    width = (n_heads + 2 * n_groups) * d_head
    per_layer = 4 * (width * d_model + n_heads * d_head * d_model + (width if q_bias else 0) + (d_model if o_bias else 0))
    per_layer += 8 * (width + n_heads * d_head) + 32  # int64 scatter and z-order indices, four FP32-head buffers
    return Geometry(
        name or getattr(config, "_name_or_path", "") or kind,
        head_graph_from_config(config),
        int(d_head),
        int(d_mlp),
        vocab,
        kind in _GATED,
        model_bytes,
        n_layers * per_layer,
    )


def _meta_model_bytes(config: Any) -> int:
    """FP32 bytes of the model's parameters and buffers (tied weights once), instantiated on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    return _tensor_bytes(list(model.parameters()) + list(model.buffers()), as_fp32=True)


def _tensor_bytes(tensors: Iterable[Any], as_fp32: bool = False, exclude: set[int] | None = None) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen or (exclude is not None and key in exclude):
            continue
        seen.add(key)
        size = 4 if as_fp32 and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def geometry_from_runtime(runtime: Any, model: Any) -> Geometry:
    """A :class:`Geometry` read from a built runtime: its graph's head graph and widths, the split copies counted by
    storage (what the split graph holds that the model does not)."""
    from ..ir import graph_meta
    from ..ir.structure import StepKind

    graph = runtime.graph
    head_graph = graph_meta.head_graph(graph)
    block = next(getattr(graph, s.module) for s in runtime.steps if s.kind is StepKind.ATTENTION)
    d_head = int(block.q.weight.shape[1])
    mlp_widths = [
        p.shape[0]
        for n, p in model.named_parameters()
        if p.dim() == 2
        and p.shape[0] != head_graph.d_model
        and p.shape[1] == head_graph.d_model
        and "embed" not in n
        and "wte" not in n
        and "lm_head" not in n
        and "embed_out" not in n
    ]
    config = getattr(model, "config", None)
    d_mlp = int(
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or getattr(config, "ffn_dim", None)
        or (max(mlp_widths) if mlp_widths else 4 * head_graph.d_model)
    )
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    model_tensors = list(model.parameters()) + list(model.buffers())
    model_ptrs = {t.data_ptr() for t in model_tensors}
    split = _tensor_bytes(list(graph.parameters()) + list(graph.buffers()), exclude=model_ptrs)
    kind = getattr(config, "model_type", "")
    return Geometry(
        getattr(config, "_name_or_path", "") or type(model).__name__,
        head_graph,
        d_head,
        d_mlp,
        vocab,
        kind in _GATED,
        _tensor_bytes(model_tensors),
        split,
        token_wise=len(runtime.final_rows) == len(runtime.positions),
    )


# ---------------------------------------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Workload:
    """The task's shape: prompts, tokens per prompt, and the rows the metric reads (default one per prompt)."""

    batch: int
    seq: int
    positions: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def with_batch(self, batch: int) -> Workload:
        return Workload(batch, self.seq, max(1, round(self.positions * batch / self.batch)))


# ---------------------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by term. ``peak`` = weights + the largest of: the eager forwards before setup, setup's own peak, and
    caches + state + one dense query's transient tensors: a dense circuit's run. ``peak_bound``: with the state bound
    and the query bound instead, what a search at any threshold stays under."""

    storage: str
    weights: int  # the model's parameters and buffers
    split_weights: int  # the split graph's per-head copies
    split_peak: int  # the trace and split pass at their peak, above the weights (the copies included)
    caches: dict[str, int]
    state_start: int  # every step running, every edge kept: exact
    state_bound: int  # every sender and receiver holding its own tensor
    query: int  # the most a dense first-layer query holds at once: tentative values, changes, a component's temporaries
    query_bound: int  # the same with every receiver building its own new input
    component: int  # the largest component's own temporaries (an MLP's hidden activations, an attention core's)
    setup_peak: int  # caches plus what exists only during setup
    forward: int  # an eager forward of the original model (the task check and the forward timing)
    candidates: int = 0  # what speculation's candidate batches add at most: more dense queries, within their budget
    receiver_inputs: str = STORED

    @property
    def cache_bytes(self) -> int:
        return sum(self.caches.values())

    @property
    def search_peak(self) -> int:
        return self.cache_bytes + self.state_start + self.query + self.candidates

    @property
    def peak(self) -> int:
        return self.weights + max(self.forward, self.split_peak, self.split_weights + max(self.setup_peak, self.search_peak))

    @property
    def peak_bound(self) -> int:
        bound = self.cache_bytes + self.state_bound + self.query_bound + self.candidates
        return self.weights + max(
            self.forward, self.split_peak, self.split_weights + max(self.setup_peak, self.search_peak, bound)
        )

    def needed(self, assume: str) -> int:
        """The peak a check compares with the memory: ``bound`` (any threshold) or ``dense`` (a dense circuit)."""
        return self.peak_bound if assume == BOUND else self.peak

    def to_json(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "receiver_inputs": self.receiver_inputs,
            "weights": self.weights,
            "split_weights": self.split_weights,
            "split_peak": self.split_peak,
            "caches": dict(self.caches),
            "cache_bytes": self.cache_bytes,
            "state_start": self.state_start,
            "state_bound": self.state_bound,
            "query": self.query,
            "query_bound": self.query_bound,
            "component": self.component,
            "setup_peak": self.setup_peak,
            "forward": self.forward,
            "candidates": self.candidates,
            "search_peak": self.search_peak,
            "peak": self.peak,
            "peak_bound": self.peak_bound,
        }


def memory_plan(
    geometry: Geometry, workload: Workload, storage: str = FP32, candidate_budget: int = 0, receiver_inputs: str = STORED
) -> MemoryPlan:
    """The bytes a search on ``workload`` holds, term by term (module docstring), with the senders' outputs stored in
    ``storage`` and the receivers' inputs ``receiver_inputs``; the transient tensors of a query and of setup are FP32."""
    if storage not in STORAGE:
        raise PlanError(f"unknown storage format {storage!r}; one of {', '.join(STORAGE)}")
    _check_inputs(receiver_inputs)
    recomputed = receiver_inputs == RECOMPUTED
    elem, per_row = STORAGE[storage]
    g, hg = geometry, geometry.head_graph
    n, d = workload.tokens, g.d_model
    f_rows = workload.positions if g.token_wise else n
    stream = n * (d * elem + per_row)  # one stored [batch, seq, d_model] tensor
    rows = f_rows * (d * elem + per_row)  # one stored tensor at the final read's rows
    fp32_stream = 4 * n * d
    steps = g.steps()
    senders = len(hg.senders())
    receivers = len(hg.receivers())
    fp32_rows = 4 * f_rows * d
    read_stream = n * d * STORAGE[READ_STORAGE[storage]][0]  # a clean read as held (storage.read_storage)
    held_reads = read_stream != fp32_stream  # read back to FP32 where they are used
    caches = {
        "clean outputs": senders * stream,
        "corrupted - clean": senders * stream,
        "clean reads": len(steps) * read_stream,
        "corrupted - clean at final rows": senders * rows,
        "clean final read": fp32_rows,
    }
    widths = [(layer.n_heads + 2 * layer.n_kv_groups) * g.d_head for layer in hg.layers]
    projections = sum(4 * n * w for w in widths)
    tail = 0
    for kind, _, _ in reversed(steps):  # the last MLP (and norm) send to resid_post alone: moved to the final rows
        if kind == "attention":
            break
        tail += 1 if g.token_wise else 0
    # the trailing MLP's stored output and FP32 input (none where inputs are recomputed), at the rows
    state_start = projections + tail * (rows + (0 if recomputed else fp32_rows))
    if recomputed:  # per step the stream's change and the corrupted read, instead of an input per receiver
        state_bound = state_start + (senders - 1) * stream + 2 * len(steps) * fp32_stream
    else:
        state_bound = state_start + (senders - 1) * stream + (receivers - 1) * fp32_stream + fp32_rows
    # A dense query into the first step (a key/value input where that recomputes the most heads): every step above
    # recomputed, its tentative inputs, projections, outputs and changes held until the query ends; the peak is the
    # most held at once, with the running component's own temporaries (the trailing MLP runs at the final rows).
    mlp_hidden = 4 * n * g.d_mlp * (3 if g.gated_mlp else 2)
    cores = {
        layer.index: 4
        * (
            2 * workload.batch * layer.n_heads * workload.seq**2
            + n * layer.n_heads * g.d_head
            + n * d
            + n * (layer.n_heads + 2 * layer.n_kv_groups) * g.d_head
        )
        for layer in hg.layers
    }
    component = max(mlp_hidden, *cores.values())
    first = hg.layers[0]
    unit_heads = first.n_heads if first.coupled_roles else max(1, first.n_heads // first.n_kv_groups)
    held = query = 0
    first_attention = True
    # Stored, a step's new input stays until the query ends; recomputed, it is freed after its step, but exists beside
    # the state input rebuilt for it (where a commit changed the stream). Stored inputs that are a bf16 clean read are
    # read back to FP32 beside the new input, the same.
    kept_input = 0 if recomputed else fp32_stream
    step_inputs = 2 * fp32_stream if recomputed or held_reads else fp32_stream
    for i, (kind, _, layer) in enumerate(steps):
        if i >= len(steps) - tail:
            held += 3 * 4 * f_rows * d
        elif kind == "attention":
            info = hg.layers[layer]
            heads = unit_heads if first_attention else info.n_heads
            first_attention = False
            projections_new = 4 * n * (info.n_heads + 2 * info.n_kv_groups) * g.d_head
            query = max(query, held + step_inputs + projections_new + cores[layer])
            # the heads' FP32 outputs while they are stored; then the stored ones and the layer's summed change (a
            # single recomputed head: its own change) stay, the heads' own changes computed for the sum and dropped
            query = max(query, held + step_inputs + projections_new + heads * (fp32_stream + stream))
            held += kept_input + projections_new + heads * stream + fp32_stream
        else:
            query = max(query, held + step_inputs + mlp_hidden)
            held += kept_input + fp32_stream + stream  # its new input (where kept) and change, its stored output
        query = max(query, held)
    query = max(query, held + 2 * 4 * f_rows * d)  # the new final read and its change
    # Where removals have made a layer's receivers' sums differ, each receiver builds its own new input, and a head's
    # change that a receiver adds alone is kept. Recomputed: one step's new inputs at a time, beside their rebuilt state
    # inputs, and a head's change computed again each time it is added (one at a time).
    own_inputs = [layer.n_heads + 2 * layer.n_kv_groups - 1 for layer in hg.layers]
    extra = 2 * max(own_inputs) + 1 if recomputed else sum(layer.n_heads for layer in hg.layers) + sum(own_inputs)
    query_bound = query + extra * fp32_stream
    # Setup: the clean run's FP32 outputs and reads, the corrupted run's changes from them stored as they come, the
    # step outputs either run sums, and a component's temporaries; the clean outputs are stored after.
    fp32_caches = 4 * (senders * n * d + (senders + 1) * f_rows * d) + len(steps) * read_stream
    setup_peak = fp32_caches + senders * stream + read_stream * len(steps) + component + (fp32_stream if held_reads else 0)
    forward = 4 * n * g.vocab + 4 * 4 * n * d + component
    # The split pass builds the per-head copies from stacked weights and probes the graph: measured at about twice
    # the copies on models of d_model 256-4096 (benchmarks/plan_accuracy.py), more on tiny ones (its probes).
    split_peak = g.split_peak if g.split_peak is not None else 2 * g.split_bytes
    # Speculation holds up to MAX_CANDIDATES dense queries at once, within its budget (speculation.candidate_memory).
    from .speculation import MAX_CANDIDATES

    candidates = min((MAX_CANDIDATES - 1) * query_bound, candidate_budget)
    return MemoryPlan(
        storage,
        g.model_bytes,
        g.split_bytes,
        split_peak,
        caches,
        state_start,
        state_bound,
        query,
        query_bound,
        component,
        setup_peak,
        forward,
        candidates,
        receiver_inputs,
    )


def _check_inputs(receiver_inputs: str) -> None:
    if receiver_inputs not in RECEIVER_INPUTS:
        raise PlanError(f"unknown receiver inputs {receiver_inputs!r}; one of {', '.join(RECEIVER_INPUTS)}")


def choice_label(storage: str, receiver_inputs: str) -> str:
    """A storage and receiver-input choice as the plan names it: ``bf16``, ``bf16/recomputed``."""
    return storage if receiver_inputs == STORED else f"{storage}/{receiver_inputs}"


def _options(key: str) -> str:
    """The command-line options of a :func:`choice_label`."""
    storage, _, inputs = key.partition("/")
    return f"--storage {storage}" + (f" --receiver-inputs {inputs}" if inputs else "")


def choices() -> list[tuple[str, str]]:
    """Storage and receiver inputs, the most exact first, then the fastest: fp32/stored, fp32/recomputed, bf16/..."""
    return [(s, m) for s in STORAGE for m in RECEIVER_INPUTS]


# ---------------------------------------------------------------------------------------------------------- time
@dataclass(frozen=True)
class Timing:
    """Seconds per query measured on a few real receivers per step, extrapolated to a whole dense run."""

    forward_s: float  # one eager forward of the original model on the clean batch (median of 3)
    by_layer: dict[int, float]  # receiver layer (-1: before the first, layers: resid_post) -> seconds per edge query
    measured: list[dict[str, Any]]  # every calibration query: step, role, seconds
    investigate_s: float  # all receivers' investigate calls (step activations included)
    query_s: float  # every edge queried, cones as with every edge kept
    calibration_s: float
    queries: int

    @property
    def total_s(self) -> float:
        return self.investigate_s + self.query_s

    @property
    def forward_equivalents_per_query(self) -> float:
        return self.total_s / max(self.queries, 1) / self.forward_s

    def to_json(self) -> dict[str, Any]:
        return {
            "forward_s": self.forward_s,
            "seconds_per_query_by_layer": {str(k): v for k, v in self.by_layer.items()},
            "investigate_s": self.investigate_s,
            "query_s": self.query_s,
            "total_s": self.total_s,
            "queries": self.queries,
            "forward_equivalents_per_query": self.forward_equivalents_per_query,
            "calibration_s": self.calibration_s,
            "measured": self.measured,
            "note": "dense upper bound: every edge queried, each query's cone as with every edge kept",
        }


def calibrate_runtime(
    runtime: Any,
    forward_s: float,
    queries_per_role: int = 2,
    layers: Sequence[int] | None = None,
    min_seconds: float = 0.1,
    max_queries: int = 64,
) -> Timing:
    """Time ``investigate`` and at least ``queries_per_role`` edge queries (``try_remove`` then ``rollback``; more, up to
    ``max_queries``, until they took ``min_seconds``: a fast query's time is noisy) on the first receiver ACDC visits
    of each role of each step in ``layers`` (default: every layer; the first and last are always included), in ACDC's
    order, then :meth:`~PatchingRuntime.reset`. A query's time is the median of its samples. Steps not measured take
    the linear interpolation
    of their role's measured neighbours. Every edge is kept throughout: each query's cone is a dense circuit's."""
    start = time.perf_counter()
    edges = runtime.edges
    n_layers = edges.head_graph.n_layers
    wanted = set(range(n_layers)) if layers is None else {*layers, 0, n_layers - 1}
    step_layer = [_step_layer(step.name) for step in runtime.steps] + [n_layers]
    first_of: dict[tuple[int, Any], int] = {}
    extra_of: dict[int, int] = {}  # a second receiver of a step: an investigate that activates nothing
    for row, receiver in enumerate(edges.receivers):
        k = runtime.index.row_step[row]
        if step_layer[k] not in wanted and k != len(runtime.steps):
            continue
        key = (k, receiver.role or receiver.kind)
        if key not in first_of:
            first_of[key] = row
        elif k not in extra_of:
            extra_of[k] = row
    sampled = sorted(set(first_of.values()) | set(extra_of.values()))
    first_rows = {min(r for (k2, _), r in first_of.items() if k2 == k) for k in {k for k, _ in first_of}}
    activation_s, plain_investigates, per_key = 0.0, [], {}
    measured = []
    for row in sampled:
        receiver = edges.receivers[row]
        t0 = time.perf_counter()
        runtime.investigate(receiver)
        elapsed = time.perf_counter() - t0
        if row in first_rows:
            activation_s += elapsed
        else:
            plain_investigates.append(elapsed)
        if row not in first_of.values():
            continue
        k = runtime.index.row_step[row]
        times: list[float] = []
        senders = receiver.senders
        while len(times) < queries_per_role or (sum(times) < min_seconds and len(times) < max_queries):
            sender = senders[len(times) % len(senders)]
            t0 = time.perf_counter()
            runtime.try_remove(row, [sender])
            runtime.rollback()
            times.append(time.perf_counter() - t0)
        key = (k, receiver.role or receiver.kind)
        per_key[key] = statistics.median(times)
        measured.append(
            {
                "step": runtime.steps[k].name if k < len(runtime.steps) else names.RESID_POST,
                "receiver": receiver.name,
                "layer": step_layer[k],
                "seconds": times,
            }
        )
    runtime.reset()
    # Per-edge-query seconds of every row: its (step, role) measured, or interpolated along the steps of that role.
    by_role: dict[Any, list[tuple[int, float]]] = {}
    for (k, role), seconds in per_key.items():
        by_role.setdefault(_role_key(role), []).append((k, seconds))
    query_s = 0.0
    layer_s: dict[int, float] = {}
    layer_q: dict[int, int] = {}
    for row, receiver in enumerate(edges.receivers):
        k = runtime.index.row_step[row]
        role = receiver.role or receiver.kind
        measured_s = per_key.get((k, role))
        row_s = measured_s if measured_s is not None else _interpolate(sorted(by_role[_role_key(role)]), k)
        n = len(receiver.senders)
        query_s += n * row_s
        layer = step_layer[k]
        layer_s[layer] = layer_s.get(layer, 0.0) + n * row_s
        layer_q[layer] = layer_q.get(layer, 0) + n
    plain = statistics.median(plain_investigates) if plain_investigates else 0.0
    investigate_s = activation_s + plain * (len(edges.receivers) - len(first_rows))
    queries = sum(len(r.senders) for r in edges.receivers) + len(edges.receivers)
    by_layer = {layer: layer_s[layer] / layer_q[layer] for layer in sorted(layer_s) if layer_q[layer]}
    return Timing(forward_s, by_layer, measured, investigate_s, query_s, time.perf_counter() - start, queries)


def _step_layer(step_name: str) -> int:
    match = re.match(r"[am](-?\d+)", step_name)
    return int(match.group(1)) if match else -1


def _role_key(role: Any) -> str:
    return getattr(role, "value", str(role))


def _interpolate(points: list[tuple[int, float]], k: int) -> float:
    if k <= points[0][0]:
        return points[0][1]
    for (k0, v0), (k1, v1) in itertools.pairwise(points):
        if k0 <= k <= k1:
            return v0 + (v1 - v0) * (k - k0) / (k1 - k0)
    return points[-1][1]


# ---------------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Edges, queries, memory and time of an ACDC run, and whether it fits ``max_memory`` (bytes)."""

    model: str
    workload: Workload
    geometry: Geometry
    edges: int
    receivers: int
    senders: int
    memory: MemoryPlan
    projections: dict[str, MemoryPlan]  # the same run with the other storage formats and receiver inputs, by choice_label()
    device: str
    max_memory: int
    max_memory_source: str
    loaded_bytes: int = 0  # weights already on the device (part of the peak, already out of its free memory)
    timing: Timing | None = None
    measured: dict[str, int] = field(default_factory=dict)  # from the built runtime: setup_state_bytes, split_peak, setup_peak
    largest_batch: int | None = None  # where it does not fit: the most prompts of this length that do
    notes: tuple[str, ...] = field(default_factory=tuple)
    assume: str = BOUND  # what the check assumes of the circuit: BOUND (any threshold) or DENSE

    @property
    def queries(self) -> int:
        """An upper bound: one query per edge and one ``investigate`` per receiver."""
        return self.edges + self.receivers

    @property
    def needed(self) -> int:
        """The peak the check compares with ``max_memory``: ``memory.peak_bound`` (any threshold), or
        ``memory.peak`` (a dense circuit) with ``assume="dense"``."""
        return self.memory.needed(self.assume)

    @property
    def fits(self) -> bool:
        return self.needed <= self.max_memory

    @property
    def fits_dense(self) -> bool:
        return self.memory.peak <= self.max_memory

    def check(self) -> Plan:
        """``self``, or :class:`~pahq_fx.errors.PlanError` saying what would fit."""
        if self.fits:
            return self
        raise PlanError(self.refusal())

    def refusal(self) -> str:
        m, w = self.memory, self.workload
        what = "at any threshold" if self.assume == BOUND else "for a dense circuit"
        lines = [
            (
                f"{self.model} on {w.batch} x {w.seq} tokens does not fit {_gib(self.max_memory)} "
                f"({self.max_memory_source}): its peak {what} is {_gib(self.needed)} (weights "
                f"{_gib(m.weights + m.split_weights)}, caches {_gib(m.cache_bytes)}, state up to "
                f"{_gib(m.state_bound if self.assume == BOUND else m.state_start)}, a query up to "
                f"{_gib(m.query_bound if self.assume == BOUND else m.query)}; setup {_gib(m.setup_peak)})"
            )
        ]
        if self.largest_batch:
            lines.append(f"at most {self.largest_batch} prompts of {w.seq} tokens fit ({self.largest_batch * w.seq} tokens)")
        elif m.weights + m.split_weights >= self.max_memory:
            lines.append("the weights alone do not fit")
        else:
            lines.append(f"not even one prompt of {w.seq} tokens fits")
        if self.assume == BOUND and self.fits_dense:
            lines.append(f"a dense circuit's run would fit ({_gib(m.peak)}; assume='dense', --assume dense, to allow it)")
        for key, projection in self.projections.items():
            if projection.needed(self.assume) <= self.max_memory:
                storage, _, inputs = key.partition("/")
                option = f"storage={storage!r}" + (f", receiver_inputs={inputs!r}" if inputs else "")
                lines.append(f"{option} ({_options(key)}) would fit ({_gib(projection.needed(self.assume))})")
        return "; ".join(lines)

    def to_json(self) -> dict[str, Any]:
        g, w = self.geometry, self.workload
        return {
            "model": self.model,
            "batch": w.batch,
            "seq": w.seq,
            "tokens": w.tokens,
            "positions": w.positions,
            "layers": g.layers,
            "heads": g.head_graph.layers[0].n_heads,
            "kv_groups": g.head_graph.layers[0].n_kv_groups,
            "d_model": g.d_model,
            "d_head": g.d_head,
            "d_mlp": g.d_mlp,
            "vocab": g.vocab,
            "senders": self.senders,
            "receivers": self.receivers,
            "edges": self.edges,
            "queries_upper_bound": self.queries,
            "memory": self.memory.to_json(),
            "other_storage": {k: v.to_json() for k, v in self.projections.items()},
            "measured": dict(self.measured),
            "device": self.device,
            "max_memory": self.max_memory,
            "max_memory_source": self.max_memory_source,
            "loaded_bytes": self.loaded_bytes,
            "assume": self.assume,
            "needed": self.needed,
            "fits": self.fits,
            "fits_dense": self.fits_dense,
            "largest_batch": self.largest_batch,
            "timing": None if self.timing is None else self.timing.to_json(),
            "notes": list(self.notes),
        }

    @property
    def _split_source(self) -> str:
        return "measured" if self.geometry.split_peak is not None else "estimated: twice the copies"

    def describe(self) -> str:
        g, w, m = self.geometry, self.workload, self.memory
        layer = g.head_graph.layers[0]
        lines = [
            f"# Plan: {self.model} on {w.batch} x {w.seq} tokens ({w.positions} metric rows)",
            "",
            (
                f"{g.layers} layers, {layer.n_heads} heads, {layer.n_kv_groups} key/value groups, d_model {g.d_model}, "
                f"d_head {g.d_head}, d_mlp {g.d_mlp}, vocab {g.vocab}"
            ),
            (
                f"{self.edges:,} edges, {self.senders:,} senders, {self.receivers:,} receivers; at most {self.queries:,} "
                "queries (one per edge, one per receiver)"
            ),
            "",
            f"| memory ({choice_label(m.storage, m.receiver_inputs)}) | bytes |",
            "| --- | --- |",
            f"| weights (model) | {_gib(m.weights)} |",
            f"| weights (split per-head copies) | {_gib(m.split_weights)} |",
            f"| trace and split at their peak, above the weights ({self._split_source}) | {_gib(m.split_peak)} |",
        ]
        lines += [f"| cache: {k} | {_gib(v)} |" for k, v in m.caches.items()]
        measured = (
            ""
            if "setup_state_bytes" not in self.measured
            else f" (state_bytes() after setup: {_gib(self.measured['setup_state_bytes'])})"
        )
        lines += [
            f"| caches in all{measured} | {_gib(m.cache_bytes)} |",
            f"| state, every edge kept (projections, rows) | {_gib(m.state_start)} |",
            f"| state bound (every component changed) | {_gib(m.state_bound)} |",
            f"| a dense first-layer query's transient tensors | {_gib(m.query)} |",
            f"| setup's own peak (above the weights and copies) | {_gib(m.setup_peak)}"
            + (f" (measured {_gib(self.measured['setup_peak'])})" if "setup_peak" in self.measured else "")
            + " |",
            f"| **peak, a dense circuit** | **{_gib(m.peak)}** |",
            f"| **peak bound, any threshold** (state and query bounds) | **{_gib(m.peak_bound)}** |",
            f"| max_memory ({self.max_memory_source}) | {_gib(self.max_memory)} |",
            (
                f"| fits ({'any threshold: the bound' if self.assume == BOUND else 'a dense circuit'}) | "
                f"{'yes' if self.fits else 'NO'} |"
            ),
        ]
        if self.largest_batch is not None and not self.fits:
            lines.append(f"| largest batch that fits | {self.largest_batch} x {w.seq} |")
        for p in self.projections.values():
            inputs = ", receiver inputs recomputed" if p.receiver_inputs == RECOMPUTED else ""
            lines.append(
                f"| with {p.storage} storage{inputs}: caches + state, peak, bound | "
                f"{_gib(p.cache_bytes + p.state_start)}, {_gib(p.peak)}, {_gib(p.peak_bound)} |"
            )
        t = self.timing
        if t is not None:
            lines += [
                "",
                (
                    f"Time, extrapolated from {len(t.measured)} calibration receivers ({t.calibration_s:.1f} s), an upper "
                    f"bound for a dense circuit (every edge queried, cones as with every edge kept): {_duration(t.total_s)} "
                    f"({t.queries:,} queries, {t.forward_equivalents_per_query:.3g} forward-equivalents per query; one eager "
                    f"forward {t.forward_s * 1000:.1f} ms)"
                ),
                "",
                "| receiver layer | seconds per query | forward-equivalents |",
                "| --- | --- | --- |",
            ]
            for layer_index, seconds in t.by_layer.items():
                label = "resid_post" if layer_index == g.layers else str(layer_index)
                lines.append(f"| {label} | {seconds:.4g} | {seconds / t.forward_s:.3g} |")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _gib(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def free_memory(device: Any) -> tuple[int, str]:
    """The device's free memory now, and where the figure comes from."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device} (torch.cuda.mem_get_info)"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    raise PlanError("cannot read the free memory of this machine: pass max_memory")


def _assemble(
    geometry: Geometry,
    workload: Workload,
    *,
    storage: str,
    device: str,
    max_memory: int | str | None,
    loaded_bytes: int,
    assume: str = BOUND,
    receiver_inputs: str = STORED,
    speculation: bool = False,
    timing: Timing | None = None,
    measured: dict[str, int] | None = None,
    notes: tuple[str, ...] = (),
) -> Plan:
    if assume not in (BOUND, DENSE):
        raise PlanError(f"assume must be {BOUND!r} (any threshold) or {DENSE!r} (a dense circuit), got {assume!r}")
    if storage not in STORAGE:
        raise PlanError(f"unknown storage format {storage!r}; one of {', '.join(STORAGE)}")
    if max_memory is None:
        free, source = free_memory(device)
        limit = free + loaded_bytes
        source = source + (f" plus {_gib(loaded_bytes)} of weights already loaded" if loaded_bytes else "")
    else:
        limit, source = parse_bytes(max_memory), "max_memory"
    edges = EdgeCounts.of(geometry.head_graph)
    budget = _candidate_budget(device, limit) if speculation else 0  # candidate batches run only under speculation
    _check_inputs(receiver_inputs)
    memory = memory_plan(geometry, workload, storage, budget, receiver_inputs)
    projections = {
        choice_label(s, m): memory_plan(geometry, workload, s, budget, m)
        for s, m in choices()
        if (s, m) != (storage, receiver_inputs)
    }
    largest = None
    if memory.needed(assume) > limit:
        largest = _largest_batch(geometry, workload, storage, limit, assume, budget, receiver_inputs)
    return Plan(
        geometry.name,
        workload,
        geometry,
        edges.edges,
        edges.receivers,
        edges.senders,
        memory,
        projections,
        device,
        limit,
        source,
        loaded_bytes,
        timing,
        measured or {},
        largest,
        notes,
        assume,
    )


def _candidate_budget(device: str, limit: int) -> int:
    """What speculation's candidate batches may hold on ``device`` (:func:`~pahq_fx.acdc.speculation.candidate_memory`);
    for a device this machine does not have (a plan for a GPU made on a CPU), the same share of ``limit``."""
    import torch

    from .speculation import MEMORY_SHARE, candidate_memory

    try:
        return candidate_memory(torch.device(device))
    except (RuntimeError, AssertionError):
        return limit // MEMORY_SHARE


def _largest_batch(
    geometry: Geometry, workload: Workload, storage: str, limit: int, assume: str, budget: int, receiver_inputs: str = STORED
) -> int:
    lo, hi = 0, workload.batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory_plan(geometry, workload.with_batch(mid), storage, budget, receiver_inputs).needed(assume) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class EdgeCounts:
    senders: int
    receivers: int
    edges: int

    @classmethod
    def of(cls, head_graph: HeadGraph) -> EdgeCounts:
        from .edges import EdgeGraph

        graph = EdgeGraph(head_graph)
        return cls(len(graph.senders), len(graph.receivers), sum(len(r.senders) for r in graph.receivers))


def plan_from_config(
    config: Any,
    batch: int,
    seq: int,
    *,
    positions: int | None = None,
    storage: str = FP32,
    device: str = "cpu",
    max_memory: int | str | None = None,
    name: str | None = None,
    assume: str = BOUND,
    check: bool = False,
    receiver_inputs: str = STORED,
    speculation: bool = False,
) -> Plan:
    """The plan of a run on ``batch`` prompts of ``seq`` tokens (``positions`` metric rows, default one per prompt)
    from a Hugging Face configuration alone: no weights, no runtime, no timing. ``check`` raises
    :class:`~pahq_fx.errors.PlanError` where it does not fit. ``receiver_inputs``, ``speculation``: as :func:`plan`'s."""
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in (batch, seq)):
        raise PlanError(f"batch and seq must be positive integers, got batch={batch!r}, seq={seq!r}")
    if positions is not None and (
        isinstance(positions, bool) or not isinstance(positions, int) or not 0 < positions <= batch * seq
    ):
        raise PlanError(f"positions (metric rows) must be between 1 and batch x seq = {batch * seq}, got {positions!r}")
    geometry = geometry_from_config(config, name)
    result = _assemble(
        geometry,
        Workload(batch, seq, positions or batch),
        storage=storage,
        device=device,
        max_memory=max_memory,
        loaded_bytes=0,
        assume=assume,
        receiver_inputs=receiver_inputs,
        speculation=speculation,
    )
    return result.check() if check else result


def plan(
    model: Any,
    task: Any,
    *,
    metric: str = "kl",
    precision: str = "auto",
    storage: str = FP32,
    max_memory: int | str | None = None,
    calibrate: bool = True,
    queries_per_role: int = 2,
    layers: Sequence[int] | None = None,
    granularity: str = "per_row",
    compile: bool | str = "auto",
    assume: str = BOUND,
    check: bool = True,
    receiver_inputs: str = STORED,
    speculation: bool = False,
) -> Plan:
    """The plan of ``discover(model, task, ...)``: edges, queries (an upper bound), weights, caches, state and peak
    memory, and (``calibrate``) time from ``queries_per_role`` real queries per receiver role of each of ``layers``
    (default every layer) on a runtime built as ``discover`` builds it, extrapolated to a whole dense run.

    ``max_memory`` (bytes or ``"20GiB"``; default the device's free memory plus the model's weights already on it):
    with ``check``, a run that cannot fit raises :class:`~pahq_fx.errors.PlanError`, saying what would fit, before
    anything is built. ``assume="bound"`` (default) checks the peak bound, which a search at any threshold stays under;
    ``"dense"`` the peak of a dense circuit's run (a sparse search's state can grow past it). ``storage``: the
    runtime's storage format (fp32, bf16, fp8) and ``receiver_inputs`` whether it stores every receiver's input or
    recomputes it (``stored``, ``recomputed``); ``Plan.projections`` gives the other choices' figures. ``speculation``:
    whether the run batches candidate queries (``discover``'s ``speculation`` other than ``"off"``), whose budget
    the peak then includes."""
    import torch

    from ..ir import graph_meta
    from ..passes.pipeline import lower_split
    from ..passes.precision import AUTO, Format, PrecisionConfig, parse_format
    from .edges import EdgeGraph
    from .run_info import eager_forward_seconds
    from .runtime import PatchingRuntime, ReceiverInputs
    from .setup import _trace_for, check_vocabulary, parse_metric, resolve_compile
    from .storage import Storage

    if calibrate and (isinstance(queries_per_role, bool) or not isinstance(queries_per_role, int) or queries_per_role < 1):
        raise PlanError(f"queries_per_role must be a positive integer, got {queries_per_role!r}")
    parsed_metric = parse_metric(metric, task)
    check_vocabulary(model, task)
    ids = task.clean_input_ids
    device = ids.device
    workload = Workload(int(ids.shape[0]), int(ids.shape[1]), int(task.metric_mask.sum()))
    model_tensors = list(model.parameters()) + list(model.buffers())
    loaded = _tensor_bytes([t for t in model_tensors if t.device == device])
    config = getattr(model, "config", None)
    notes: list[str] = []
    try:
        geometry = geometry_from_config(config, model_bytes=_tensor_bytes(model_tensors))
    except (UnsupportedArchitectureError, AttributeError, ValueError, TypeError) as error:
        geometry = None
        notes.append(f"no configuration-only geometry ({error}); the runtime was built to read it")
    fmt = Format.FP32 if precision == AUTO else parse_format(precision)
    if precision == AUTO:
        notes.append(
            "precision='auto' times each format at the start of the run, holding two runtimes while it measures; planned in fp32"
        )
    if geometry is not None:
        early = _assemble(
            geometry,
            workload,
            storage=storage,
            device=str(device),
            max_memory=max_memory,
            loaded_bytes=loaded,
            assume=assume,
            notes=tuple(notes),
            receiver_inputs=receiver_inputs,
            speculation=speculation,
        )
        if check:
            early.check()  # refuse before anything is traced or cached
        if not calibrate:
            return early
    if fmt.value != FP32:
        notes.append(
            f"the other heads in {fmt.value}: the split weights include their low-precision copies (counted "
            "from the built runtime; the check before it counted FP32 copies only)"
        )
    compiled, _ = resolve_compile(compile, device)
    # As setup.build_runtime builds it, in two measured phases: the trace and split, then the runtime's caches.
    with torch.no_grad():
        graph, split_peak = measured_peak(lambda: lower_split(_trace_for(model, ids), PrecisionConfig(fmt, granularity)), device)
        edges = EdgeGraph(graph_meta.head_graph(graph))
        runtime, setup_peak = measured_peak(
            lambda: PatchingRuntime(
                graph,
                edges,
                task,
                parsed_metric,
                compile=compiled,
                storage=Storage(storage),
                receiver_inputs=ReceiverInputs(receiver_inputs),
            ),
            device,
        )
    measured = {"setup_state_bytes": runtime.state_bytes(), "split_peak": split_peak, "setup_peak": setup_peak}
    geometry = replace(geometry_from_runtime(runtime, model), split_peak=split_peak)
    timing = None
    outside = sorted(set(layers or ()) - set(range(edges.head_graph.n_layers)))
    if calibrate and outside:
        last = edges.head_graph.n_layers - 1
        raise PlanError(f"layers {outside} to calibrate are not in the model, which has layers 0 to {last}")
    if calibrate:
        forward_s = statistics.median(eager_forward_seconds(model, ids, repeats=3))
        timing = calibrate_runtime(runtime, forward_s, queries_per_role, layers)
    result = _assemble(
        geometry,
        workload,
        storage=storage,
        device=str(device),
        max_memory=max_memory,
        loaded_bytes=loaded,
        assume=assume,
        timing=timing,
        measured=measured,
        notes=tuple(notes),
        receiver_inputs=receiver_inputs,
        speculation=speculation,
    )
    return result.check() if check else result


def _config_plan(
    model: Any,
    task: Any,
    *,
    max_memory: int | str | None,
    storage: str,
    assume: str,
    receiver_inputs: str,
    speculation: bool,
) -> Plan | None:
    """The configuration-only plan of ``discover(model, task)``, unchecked; None where the model's family has no
    configuration-only geometry (nothing is traced to find out)."""
    tensors = list(model.parameters()) + list(model.buffers())
    try:
        geometry = geometry_from_config(getattr(model, "config", None), model_bytes=_tensor_bytes(tensors))
    except (UnsupportedArchitectureError, AttributeError, ValueError, TypeError):
        return None
    device = task.clean_input_ids.device
    ids = task.clean_input_ids
    workload = Workload(int(ids.shape[0]), int(ids.shape[1]), int(task.metric_mask.sum()))
    loaded = _tensor_bytes([t for t in tensors if t.device == device])
    return _assemble(
        geometry,
        workload,
        storage=storage,
        device=str(device),
        max_memory=max_memory,
        loaded_bytes=loaded,
        assume=assume,
        receiver_inputs=receiver_inputs,
        speculation=speculation,
    )


def preflight(
    model: Any,
    task: Any,
    *,
    max_memory: int | str | None = None,
    storage: str = FP32,
    assume: str = BOUND,
    receiver_inputs: str = STORED,
    speculation: bool = False,
) -> Plan | None:
    """The configuration-only plan of a run, checked: :class:`~pahq_fx.errors.PlanError` where it cannot fit, None
    where the model's family has no configuration-only geometry (nothing is traced to find out). What ``pahq-fx
    discover`` and ``sweep`` run before anything else."""
    result = _config_plan(
        model,
        task,
        max_memory=max_memory,
        storage=storage,
        assume=assume,
        receiver_inputs=receiver_inputs,
        speculation=speculation,
    )
    return None if result is None else result.check()


AUTO_STORAGE = "auto"


def choose_storage(
    model: Any,
    task: Any,
    *,
    max_memory: int | str | None = None,
    assume: str = BOUND,
    receiver_inputs: str | None = None,
    speculation: bool = False,
) -> tuple[str, str, str]:
    """``storage="auto"``: the first storage and receiver inputs whose planned peak fits ``max_memory`` (default: the
    device's free memory) in the order of :func:`choices` (exactness first, then speed: fp32 stored, fp32 recomputed,
    bf16 stored, ...; only ``receiver_inputs`` where it is given), and a line saying why. FP32 (and stored inputs,
    unless given) where the family has no configuration-only plan; :class:`~pahq_fx.errors.PlanError`, saying what
    would fit, where none does."""
    if receiver_inputs is not None:
        _check_inputs(receiver_inputs)
    candidates = [(s, m) for s, m in choices() if receiver_inputs in (None, m)]
    first = _config_plan(
        model,
        task,
        max_memory=max_memory,
        storage=candidates[0][0],
        assume=assume,
        receiver_inputs=candidates[0][1],
        speculation=speculation,
    )
    if first is None:
        inputs = receiver_inputs or STORED
        key = choice_label(FP32, inputs)
        return FP32, inputs, f"storage auto: {key} (this family has no configuration-only plan to choose from)"
    peaks = {choice_label(*candidates[0]): first.needed, **{k: p.needed(assume) for k, p in first.projections.items()}}
    what = "at any threshold" if assume == BOUND else "for a dense circuit"
    for i, (storage, inputs) in enumerate(candidates):
        key = choice_label(storage, inputs)
        if peaks[key] <= first.max_memory:
            tried = ", ".join(f"{k} {_gib(peaks[k])}" for k in (choice_label(*c) for c in candidates[: i + 1]))
            return storage, inputs, f"storage auto: {key} (planned peak {what}: {tried}; memory {_gib(first.max_memory)})"
    raise PlanError(first.refusal())


def write_json(result: Plan, path: str) -> None:
    """The plan as JSON, through the atomic writer (whole or absent, never through a planted link)."""
    write_text(path, json.dumps(result.to_json(), indent=2) + "\n")


__all__ = [
    "AUTO_STORAGE",
    "RECEIVER_INPUTS",
    "Geometry",
    "MemoryPlan",
    "Plan",
    "Timing",
    "Workload",
    "calibrate_runtime",
    "choose_storage",
    "free_memory",
    "geometry_from_config",
    "geometry_from_runtime",
    "head_graph_from_config",
    "memory_plan",
    "parse_bytes",
    "plan",
    "plan_from_config",
]


def measured_peak(fn: Any, device: Any = "cpu") -> tuple[Any, int]:
    """``fn()``'s result and the most bytes its tensors held at once above what was allocated when it started: on
    CUDA from the allocator's peak statistics, elsewhere from the profiler's allocation events (every allocation and
    free of the CPU allocator, in order). What the tests and benchmarks/plan_accuracy.py compare the plan with."""
    result, peak, _ = measured_allocation(fn, device)
    return result, peak


def measured_allocation(fn: Any, device: Any = "cpu") -> tuple[Any, int, int]:
    """``fn()``'s result, its peak (as :func:`measured_peak`) and the bytes it left allocated."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return result, peak, running
