"""The incremental patching runtime: a query recomputes only what the tested edge changes (docs/runtime.md).

It keeps the *state* of the patched forward pass -- every sender's current output, every receiver's current
input, every attention layer's per-head projections -- for the current removed-edge set, start step and
precision plan. A receiver's input is (docs/acdc.md)::

    input_r = clean_read_r + sum_{s removed} (corrupt_s - clean_s) + sum_{s kept} (current_s - clean_s)

Removing edge (s, r) changes ``input_r`` by ``corrupt_s - current_s``; r's component is recomputed, and the
change of its output travels along kept edges only, to the receivers that read it, in topological order (the
"cone"). Components that nothing reaches keep their state. :meth:`try_remove` computes the tentative values
and the metric; :meth:`commit` makes them the state, :meth:`rollback` drops them.

Steps below the one under investigation are clean and FP32 (every edge into them is present), so they are
never run; when the search moves into a new step it is *activated* (its inputs leave the clean cache and its
heads are recomputed under the plan), and a new precision plan recomputes only the heads whose precision
changes. Caches and sender outputs are held in the run's storage format (:mod:`~pahq_fx.acdc.storage`: FP32 by
default, bf16 or per-row scaled FP8 to fit large models), the clean reads in FP32 or bf16 with them; inputs and
projections are FP32; the final read holds only the rows the metric reads when the unembedding is token-wise.

The parts, one job each: :mod:`.index` (the immutable index of rows, senders and steps), :mod:`.edge_state` (the
removed and kept edges), :mod:`.caches` (setup), :mod:`.cascade` and :mod:`.attention_step` (what a query
recomputes), :mod:`.deltas` (a query's tentative values), :mod:`.candidates` (candidate batches), :mod:`.state`
(what the parts share, declared for the type checker); this module holds the state and the public API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import fx

from ...compile import CountingBackend, compile_by_structure
from ...ir import graph_meta
from ...ir.modules import StreamShaped
from ...ir.names import Role
from ...ir.structure import Step, StepKind
from ...metrics import Metric
from ...passes.precision import Format, FullPrecisionUnits, all_heads_fp32
from ..edges import EdgeGraph, Receiver
from ..row_batch import RowBatch
from ..storage import Storage, codec, read_storage
from ..task import Task
from .attention_step import AttentionStep
from .caches import CacheSetup
from .candidates import CandidateBatches
from .cascade import Cascade
from .deltas import Pending
from .edge_state import EdgeState
from .index import RuntimeIndex
from .inputs import InputState, ReceiverInputs
from .state import Aux, Kernel


def _stream_shaped(fn: Callable) -> Callable:
    """``fn`` with its output given its input's [batch, seq, d] shape (as :class:`StreamShaped` does)."""

    def run(x: torch.Tensor, *aux: torch.Tensor) -> torch.Tensor:
        return fn(x, *aux).reshape(x.shape)

    return run


class PatchingRuntime(CacheSetup, Cascade, AttentionStep, CandidateBatches, InputState):
    """State of the patched forward pass of a split model on a task; answers ACDC's queries incrementally."""

    def __init__(
        self,
        graph: fx.GraphModule,
        edges: EdgeGraph,
        task: Task,
        metric: Metric,
        compile: bool = False,
        storage: Storage = Storage.FP32,
        receiver_inputs: ReceiverInputs = ReceiverInputs.STORED,
    ) -> None:
        self.graph = graph
        self._prelude, self._unembed = graph.get_submodule("prelude"), graph.get_submodule("unembed")
        self.storage = storage
        self.codec = codec(storage)
        self.read_codec = codec(read_storage(storage))
        self.edges = edges
        self.metric_kind = metric
        self.structure = graph_meta.structure(graph)
        self.steps: tuple[Step, ...] = self.structure.steps
        self.counter = CountingBackend("inductor") if compile else None
        report = graph_meta.precision_report(graph)
        self.low_precision = report is not None and report.config.low_precision is not Format.FP32
        self.index = RuntimeIndex(graph, self.steps, edges)
        self.receiver_inputs = receiver_inputs
        self._index_inputs()
        self._components, self._cores, self._metric = self._kernels()
        self.device = task.clean_input_ids.device
        self._clean_ids = task.clean_input_ids
        self._compiled = compile
        self._candidates: int | None = None  # while a candidate batch runs: how many candidates it holds
        self._candidate_support: bool | None = None
        self._candidate_removed: list[tuple[tuple[int, int], ...]] = []
        self.candidate_refusal = ""
        self._candidate_aux: dict[int, tuple[Aux, ...]] = {}
        # per candidate count: the final read's rows as one batch, the prelude's values for it, the final read's values
        self._candidate_rows: dict[int, tuple[RowBatch, tuple[Aux, ...], list[Aux]]] = {}
        self._packed_prelude: dict[tuple[int, int], tuple[Aux, ...]] = {}
        self.positions = task.metric_mask.flatten().nonzero().flatten()
        with torch.no_grad(), all_heads_fp32(graph):
            self._setup_caches(task)
        self.correct, self.incorrect = task.answers_at_metric_positions() if metric.needs_answers else (None, None)
        with torch.no_grad():
            self._clean_metric = float(self._metric(self._final_clean))
        self.reset()

    def reset(self) -> None:
        """Back to the state right after setup (every edge kept, nothing run, no query counted), keeping the
        traced graph and the clean and corrupted caches: a threshold sweep pays setup once."""
        edges = self.edges
        self.queries = 0  # queries decided, as the sequential search counts them
        self.evaluated = 0  # queries computed, speculative candidates whose result was dropped included
        self.last_recomputed = []
        self.edge_state = EdgeState(edges)
        self.active_from = len(self.steps)
        self.rows_only: set[int] = set()  # MLP and norm steps whose state is kept at the final read's rows only
        self.plan: dict[int, FullPrecisionUnits] = {}
        self.outputs = list(self.clean)
        self._reset_inputs()
        self.projections: dict[int, torch.Tensor] = {}
        self.final = self._final_clean
        self.metric = self._clean_metric
        self._pending: Pending | None = None

    def start_of(self, receiver: Receiver) -> int:
        """Index of the first step that runs while this receiver is investigated (len(steps): only the final read)."""
        return self.index.start_of(receiver)

    @property
    def compilations(self) -> int:
        return 0 if self.counter is None else self.counter.compilations

    @property
    def compile_seconds(self) -> float:
        return 0.0 if self.counter is None else self.counter.seconds

    def _kernels(self) -> tuple[dict[int, Kernel], dict[int, Kernel], Kernel]:
        """MLPs and post-attention norms, attention cores by step, and the final read + metric: eager, or compiled
        once per component structure with weights as inputs (every layer's MLP shares one graph). Per-head
        projections and norms stay eager: their shapes change with the number of heads a query reaches."""
        mlps = {k: getattr(self.graph, s.module) for k, s in enumerate(self.steps) if s.kind is not StepKind.ATTENTION}
        cores = {k: getattr(self.graph, s.module).core for k, s in enumerate(self.steps) if s.kind is StepKind.ATTENTION}
        counter = self.counter  # set where the runtime compiles
        if counter is None:
            return mlps, cores, self._final_metric
        inner = [m.component if isinstance(m, StreamShaped) else m for m in mlps.values()]
        for k, fn in zip(list(mlps), compile_by_structure(inner, counter), strict=True):
            mlps[k] = _stream_shaped(fn)
        compiled_cores = dict(zip(cores, compile_by_structure(list(cores.values()), counter), strict=True))
        return mlps, compiled_cores, torch.compile(self._final_metric, backend=counter, dynamic=False)

    def _aux(self, indices: Iterable[int]) -> list[Aux]:
        """The prelude's auxiliary values at the batch that runs now: the task's, or a candidate batch's."""
        aux = self.aux if self._candidates is None else self._candidate_aux[self._candidates]
        return [aux[i] for i in indices]

    def state_bytes(self) -> int:
        """Bytes held by the state and the caches (distinct tensors counted once)."""
        stored = (*self.clean, *self.corrupt_minus_clean, *self._cmc_rows, *self.outputs)
        tensors = [
            *(t for each in stored for t in self.codec.tensors(each)),
            *(t for read in self.clean_reads for t in self.read_codec.tensors(read)),
            *self._input_tensors(),
            *self.projections.values(),
            self.final,
        ]
        seen: dict[int, int] = {}
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def _unit_plan(self, receiver: Receiver) -> dict[int, FullPrecisionUnits]:
        """FP32 units while ``receiver`` is investigated: its head (q), its key/value group (k, v); none otherwise."""
        if not self.low_precision or not receiver.is_attention_input:
            return {}
        layer_index, role, unit = receiver.attention_input
        layer = self.edges.head_graph.layers[layer_index]
        if role is Role.QUERY:
            units = FullPrecisionUnits(unit, layer.kv_group_of_head[unit])
        else:
            units = FullPrecisionUnits(-1 if layer.grouped else unit, unit)
        return {self.index.row_step[self.edges.receiver_index[receiver.name]]: units}

    @torch.no_grad()
    def investigate(self, receiver: Receiver) -> float:
        """Move the state to ``receiver``'s start step and precision plan (committed); return the metric ``m0``."""
        self.queries += 1
        self.evaluated += 1
        self._pending = self._cascade({}, self.start_of(receiver), self._unit_plan(receiver))
        return self.commit()

    @torch.no_grad()
    def run_from(self, step: int) -> float:
        """Let every step from ``step`` on run (none is clean any more); committed. Returns the metric."""
        self._pending = self._cascade({}, step, None)
        return self.commit()

    @torch.no_grad()
    def try_remove(self, row: int, senders: Iterable[int]) -> float:
        """The metric with the edges ``senders -> row`` removed as well; tentative until :meth:`commit`."""
        return self.try_remove_edges({row: list(senders)})

    @torch.no_grad()
    def try_remove_edges(self, removals: dict[int, list[int]]) -> float:
        """The metric with the edges ``{receiver row: senders}`` removed as well; tentative until :meth:`commit`."""
        self.queries += 1
        self.evaluated += 1
        self._pending = self._remove(removals)
        return self._pending.metric

    @torch.no_grad()
    def remove(self, row: int, senders: Iterable[int]) -> None:
        """Remove edges without testing them (ACDC prunes a receiver whose node has no outgoing edge left)."""
        senders = list(senders)
        if self.index.row_step[row] >= self.active_from and self.is_live(row):
            self._pending = self._remove({row: senders})
            self.commit()
        else:  # a dead node's input is never read again; a step that does not run yet reads the removed set
            self.edge_state.mark_removed(row, senders)
            self._update_rows_only()

    def is_live(self, row: int) -> bool:
        """Whether the node this receiver feeds still sends anything (the final read always counts).

        The state is exact for live receivers' inputs and for senders with kept edges, where those edges read
        them; a dead node's inputs and outputs are never read again, so they are not maintained."""
        return row == self.index.final_row or any(self.edge_state.kept_out[s] for s in self.index.feeding[row])

    def commit(self) -> float:
        """Make the last tentative values the state; returns the metric."""
        pending, self._pending = self._pending, None
        assert pending is not None, "commit() follows a query"
        self._commit_inputs(pending)
        for s, stored in pending.outputs.items():
            self.outputs[s] = stored
        self.projections.update(pending.projections)
        for row, s in pending.removed:
            self.edge_state.mark_removed(row, [s])

        if pending.final is not None:
            self.final = pending.final
        if pending.active_from is not None:
            self.active_from = pending.active_from
        if pending.plan is not None:
            self.plan = pending.plan
        self.metric = pending.metric
        self._update_rows_only()
        return self.metric

    def rollback(self) -> None:
        """Drop the last tentative values."""
        self._pending = None

    @property
    def removed(self) -> set[tuple[int, int]]:
        """The removed edges, as (receiver row, sender) pairs."""
        return self.edge_state.removed

    def is_kept(self, row: int, sender: int) -> bool:
        return sender in self.edge_state.kept_in[row]

    @property
    def kept_edges(self) -> int:
        return self.edge_state.kept_edges

    @property
    def total_edges(self) -> int:
        return sum(len(r.senders) for r in self.edges.receivers)
