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
changes. Caches and sender outputs are held in the run's storage format (:mod:`.storage`: FP32 by default, bf16
or per-row scaled FP8 to fit large models); inputs, projections and reads are FP32; the final read holds only the
rows the metric reads when the unembedding is token-wise.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import fx

from .. import graph_meta, names
from ..compile import CountingBackend, compile_by_structure
from ..errors import UnsupportedArchitectureError
from ..metrics import CleanDistribution, Metric, metric_value
from ..names import Role
from ..precision import Format, FullPrecisionUnits, all_heads_fp32
from ..split import AttentionBlock, Step, StepKind, StreamShaped
from .edges import EdgeGraph, Receiver, ReceiverKind
from .row_batch import RowBatch
from .storage import Storage, Stored, codec
from .task import Task

ROLES = tuple(Role)


@dataclass
class _Pending:
    """Tentative values of one query, kept apart from the state until commit."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # receiver row -> new input
    outputs: dict[int, Stored] = field(default_factory=dict)  # sender -> new output, as stored
    projections: dict[int, torch.Tensor] = field(default_factory=dict)  # attention step -> new per-head projections
    final: torch.Tensor | None = None
    metric: float = 0.0
    metrics: list[float] = field(default_factory=list)  # a candidate batch's: one per candidate
    removed: tuple[tuple[int, int], ...] = ()
    active_from: int | None = None
    plan: dict[int, FullPrecisionUnits] | None = None
    recomputed: list[str] = field(default_factory=list)


class _Deltas:
    """Output changes of one query's recomputed senders (``new - state``), and of the heads of each attention step
    together: a receiver that every recomputed head of a step reaches (every later receiver, in a dense circuit)
    adds their summed change once, computed once per query, instead of one change per head.

    A head's change is computed from its stored new and old outputs when it is first needed, and kept only where a
    receiver adds it alone: a dense query then holds one summed change per layer, not one change per head (on a
    large model, most of what a query holds)."""

    def __init__(self, change: Callable[[int], torch.Tensor]) -> None:
        self._change = change  # sender -> its change, from the stored outputs
        self._changes: dict[int, torch.Tensor | None] = {}  # by sender, in the order they were recomputed
        self._group_of: dict[int, int] = {}  # sender -> attention step, for steps with several recomputed heads
        self._groups: dict[int, list[int]] = {}  # step -> its recomputed heads' senders
        self._sums: dict[int, torch.Tensor] = {}

    def add(self, sender: int, change: torch.Tensor) -> None:
        self._changes[sender] = change

    def add_heads(self, step: int, senders: list[int]) -> None:
        """An attention step's recomputed heads, by sender (their changes computed when needed)."""
        self._changes.update(dict.fromkeys(senders))
        if len(senders) > 1:
            self._groups[step] = list(senders)
            self._group_of.update(dict.fromkeys(senders, step))

    def __iter__(self):
        return iter(self._changes)

    def change(self, sender: int) -> torch.Tensor:
        """One sender's change, kept once computed."""
        if self._changes[sender] is None:
            self._changes[sender] = self._change(sender)
        return self._changes[sender]

    def terms(self, reaching: list[int]) -> list[tuple[int, torch.Tensor]]:
        """(a sender standing for the term, change) for each term a receiver reached by ``reaching`` adds, in
        ``reaching``'s order: a step's summed change where all of its recomputed heads reach, single changes
        otherwise."""
        reached, terms, done = set(reaching), [], set()
        for s in reaching:
            step = self._group_of.get(s)
            if step is None:
                terms.append((s, self.change(s)))
            elif step not in done and reached.issuperset(self._groups[step]):
                done.add(step)
                terms.append((s, self._sum(step)))
            elif step not in done:
                terms.append((s, self.change(s)))
        return terms

    def _sum(self, step: int) -> torch.Tensor:
        """The step's heads' summed change; a head's change not kept already is computed for the sum and dropped."""
        if step not in self._sums:
            kept = self._changes
            parts = (kept[s] if kept[s] is not None else self._change(s) for s in self._groups[step])
            self._sums[step] = functools.reduce(operator.add, parts)
        return self._sums[step]


def _stream_shaped(fn: Callable) -> Callable:
    """``fn`` with its output given its input's [batch, seq, d] shape (as :class:`StreamShaped` does)."""

    def run(x: torch.Tensor, *aux: torch.Tensor) -> torch.Tensor:
        return fn(x, *aux).reshape(x.shape)

    return run


class _AttentionLayout:
    """Where each head's query/key/value features sit in the block's concatenated projections, and its z features."""

    def __init__(self, block: AttentionBlock) -> None:
        device = block.z_order.device
        self.n_heads, self.n_groups = block.n_heads, block.n_kv_groups
        dq, dk, dv = (getattr(block, r.value).weight.shape[1] for r in ROLES)
        offsets = {Role.QUERY: 0, Role.KEY: self.n_heads * dq, Role.VALUE: self.n_heads * dq + self.n_groups * dk}
        widths = {Role.QUERY: dq, Role.KEY: dk, Role.VALUE: dv}
        self.features = {
            role: [
                torch.arange(offsets[role] + u * widths[role], offsets[role] + (u + 1) * widths[role], device=device)
                for u in range(self.n_heads if role is Role.QUERY else self.n_groups)
            ]
            for role in ROLES
        }
        self.dz = block.z_order.numel() // self.n_heads
        self.z_features = [block.z_order[h * self.dz : (h + 1) * self.dz] for h in range(self.n_heads)]
        self.z_in_head_order = block.z_span == (0, block.z_order.numel())

    def z_of(self, z: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """The core output's features of ``heads`` (sorted), [..., len(heads), dz]: a view where they are
        consecutive heads of a core output in head order."""
        if self.z_in_head_order and heads[-1] - heads[0] == len(heads) - 1:
            selected = z.narrow(-1, heads[0] * self.dz, len(heads) * self.dz)
        else:
            selected = z.index_select(-1, torch.cat([self.z_features[h] for h in heads]))
        return selected.unflatten(-1, (len(heads), -1))


class PatchingRuntime:
    """State of the patched forward pass of a split model on a task; answers ACDC's queries incrementally."""

    def __init__(
        self,
        graph: fx.GraphModule,
        edges: EdgeGraph,
        task: Task,
        metric: Metric,
        compile: bool = False,
        storage: Storage = Storage.FP32,
    ) -> None:
        self.graph = graph
        self.storage = storage
        self.codec = codec(storage)
        self.edges = edges
        self.metric_kind = metric
        self.structure = graph_meta.structure(graph)
        self.steps: tuple[Step, ...] = self.structure.steps
        self.counter = CountingBackend("inductor") if compile else None
        report = graph_meta.precision_report(graph)
        self.low_precision = report is not None and report.config.low_precision is not Format.FP32
        self._index_graph()
        self._components, self._cores, self._metric = self._kernels(compile)
        self._layouts = {
            k: _AttentionLayout(getattr(graph, s.module)) for k, s in enumerate(self.steps) if s.kind is StepKind.ATTENTION
        }
        self.device = task.clean_input_ids.device
        self._clean_ids = task.clean_input_ids
        self._compiled = compile
        self._candidates: int | None = None  # while a candidate batch runs: how many candidates it holds
        self._candidate_support: bool | None = None
        self._candidate_removed: list[tuple[tuple[int, int], ...]] = []
        self.candidate_refusal = ""
        self._candidate_aux: dict[int, tuple[torch.Tensor, ...]] = {}
        # per candidate count: the final read's rows as one batch, the prelude's values for it, the final read's values
        self._candidate_rows: dict[int, tuple[RowBatch, tuple, list[torch.Tensor]]] = {}
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
        self.removed_from: list[list[int]] = [[] for _ in edges.receivers]
        self.kept_in = [set(r.senders) for r in edges.receivers]
        self.kept_out: list[set[int]] = [set() for _ in edges.senders]
        for row, r in enumerate(edges.receivers):
            for s in r.senders:
                self.kept_out[s].add(row)
        self.active_from = len(self.steps)
        self.rows_only: set[int] = set()  # MLP and norm steps whose state is kept at the final read's rows only
        self.plan: dict[int, FullPrecisionUnits] = {}
        self.outputs = list(self.clean)
        self.inputs: list[torch.Tensor | None] = [None] * len(edges.receivers)
        self.projections: dict[int, torch.Tensor] = {}
        self.final = self._final_clean
        self.metric = self._clean_metric
        self._pending: _Pending | None = None

    # ----------------------------------------------------------------------------------------------- structure
    def _index_graph(self) -> None:
        """Which step, role and unit every receiver row belongs to, and each step's receiver rows."""
        step_index = {s.name: k for k, s in enumerate(self.steps)}
        self.row_step: list[int] = []
        self.step_rows: list[dict[str, list[int]]] = [{} for _ in self.steps]
        for row, r in enumerate(self.edges.receivers):
            if r.kind is ReceiverKind.RESID_POST:
                self.final_row = row
                self.row_step.append(len(self.steps))
                continue
            k = step_index[names.attention(r.layer) if r.is_attention_input else r.name]
            self.row_step.append(k)
            units = self.step_rows[k].setdefault(r.role or r.kind, [])
            unit = 0 if r.unit is None else r.unit
            units.extend([-1] * (unit + 1 - len(units)))
            units[unit] = row
        self.row_role = [r.role for r in self.edges.receivers]
        self.row_unit = [0 if r.unit is None else r.unit for r in self.edges.receivers]
        self.sender_step: list[int] = []
        self.step_senders: list[list[int]] = [[] for _ in self.steps]
        for s in self.edges.senders:
            k = step_index.get(s.component, -1)
            self.sender_step.append(k)
            if k >= 0:
                self.step_senders[k].append(s.index)
        self.feeding = [list(self.edges.feeding_senders(r)) for r in self.edges.receivers]
        for k, step in enumerate(self.steps):
            if not self.step_senders[k]:
                raise UnsupportedArchitectureError(f"component {step.name} has no senders in the edge graph")

    def start_of(self, receiver: Receiver) -> int:
        """Index of the first step that runs while this receiver is investigated (len(steps): only the final read)."""
        return self.row_step[self.edges.receiver_index[receiver.name]]

    @property
    def compilations(self) -> int:
        return 0 if self.counter is None else self.counter.compilations

    @property
    def compile_seconds(self) -> float:
        return 0.0 if self.counter is None else self.counter.seconds

    def _kernels(self, compile: bool) -> tuple[dict[int, Callable], dict[int, Callable], Callable]:
        """MLPs and post-attention norms, attention cores by step, and the final read + metric: eager, or compiled
        once per component structure with weights as inputs (every layer's MLP shares one graph). Per-head
        projections and norms stay eager: their shapes change with the number of heads a query reaches."""
        mlps = {k: getattr(self.graph, s.module) for k, s in enumerate(self.steps) if s.kind is not StepKind.ATTENTION}
        cores = {k: getattr(self.graph, s.module).core for k, s in enumerate(self.steps) if s.kind is StepKind.ATTENTION}
        if not compile:
            return mlps, cores, self._final_metric
        inner = [m.component if isinstance(m, StreamShaped) else m for m in mlps.values()]
        for k, fn in zip(list(mlps), compile_by_structure(inner, self.counter), strict=True):
            mlps[k] = _stream_shaped(fn)
        compiled_cores = dict(zip(cores, compile_by_structure(list(cores.values()), self.counter), strict=True))
        return mlps, compiled_cores, torch.compile(self._final_metric, backend=self.counter, dynamic=False)

    def _aux(self, indices: Iterable[int]) -> list[torch.Tensor]:
        """The prelude's auxiliary values at the batch that runs now: the task's, or a candidate batch's."""
        aux = self.aux if self._candidates is None else self._candidate_aux[self._candidates]
        return [aux[i] for i in indices]

    # ----------------------------------------------------------------------------------------------- caches
    def _setup_caches(self, task: Task) -> None:
        """FP32 clean and corrupted outputs of every sender, clean reads of every step, the clean final read."""
        prelude = self.graph.prelude(task.clean_input_ids)
        self.aux = tuple(prelude[1:])
        self._final_aux = self._aux(self.structure.final_aux)
        self.clean, self.clean_reads, clean_final = self._full_run(prelude[0])
        self.corrupt_minus_clean, _, _ = self._full_run(
            self.graph.prelude(task.corrupted_input_ids)[0], lambda s, x: self.codec.store(x - self.clean[s])
        )
        full = self._unembed_all(clean_final)
        self.clean_distribution = CleanDistribution.of(full)
        batch, seq = clean_final.shape[:2]
        dims = graph_meta.dynamic_dims(self.graph)
        metric_rows = RowBatch.for_trace(len(self.positions), dims, seq)
        metric_aux = self._prelude_aux(metric_rows)
        self._row_final_aux = self._final_aux if metric_aux is None else [metric_aux[i] for i in self.structure.final_aux]
        token_wise = self._token_wise_unembedding(clean_final, full, metric_rows)
        self.row_batch = metric_rows if token_wise else RowBatch.for_trace(batch * seq, dims, seq)
        self.final_rows = self.positions if token_wise else torch.arange(batch * seq, device=clean_final.device)
        self._final_shape = None if token_wise else clean_final.shape
        self._final_clean = self._rows(clean_final)
        self._rows_prelude_aux = metric_aux if token_wise else self._prelude_aux(self.row_batch)
        self._token_wise_components = {
            k
            for k, step in enumerate(self.steps)
            if step.kind is not StepKind.ATTENTION and token_wise and self._token_wise_component(k)
        }
        # Stored one at a time, each FP32 output released as its stored form replaces it.
        for i, x in enumerate(self.clean):
            self.clean[i] = self.codec.store(x)
        self._cmc_rows = [self._rows(self.codec.load(c)) for c in self.corrupt_minus_clean]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of a [..., B, T, d] tensor that the final read keeps, [..., rows, d]."""
        return x.flatten(-3, -2).index_select(-2, self.final_rows)

    def _full_run(
        self, embed: torch.Tensor, finish: Callable[[int, torch.Tensor], Stored] | None = None
    ) -> tuple[list[Stored], list[torch.Tensor], torch.Tensor]:
        """Every sender's FP32 output (by sender index: a component that runs before its layer's heads, as Falcon-H1's
        Mamba mixer beside the attention, still follows them), every step's read, and the final read, for one input.
        ``finish(sender, output)``, where given, replaces each output as soon as it is computed (the corrupted run
        keeps its change from the clean run, stored, so its FP32 outputs never all exist at once)."""
        outputs: list[Stored | None] = [None] * len(self.edges.senders)
        totals = {names.EMBED: embed}
        reads = []

        def keep(sender: int, x: torch.Tensor) -> None:
            outputs[sender] = x if finish is None else finish(sender, x)

        for k, step in enumerate(self.steps):
            read = sum(totals[c] for c in step.reads)
            reads.append(read)
            block = getattr(self.graph, step.module)
            if step.kind is StepKind.ATTENTION:
                heads = block.from_stream(read, *self._aux(step.aux))
                for sender, head in zip(self.step_senders[k], heads.unbind(2), strict=True):
                    keep(sender, head)
                totals[step.name] = block.combine(heads)
            else:
                out = block(read, *self._aux(step.aux))
                keep(self.step_senders[k][0], out)
                totals[step.name] = out
        for sender, x in enumerate(outputs):  # the embedding's sender: no step writes it
            if x is None:
                keep(sender, embed)
        final = sum(totals[c] for c in self.structure.final_reads)
        return outputs, reads, final

    def _unembed_all(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.graph.unembed(x, *self._final_aux)
        return logits.flatten(0, 1).index_select(0, self.positions)

    def _token_wise_unembedding(self, x: torch.Tensor, full: torch.Tensor, rows: RowBatch) -> bool:
        """Whether the final norm and unembedding act per token, so only the metric rows need to go through them."""
        try:
            got = rows.unpack(
                self.graph.unembed(rows.pack(x.flatten(0, 1).index_select(0, self.positions)), *self._row_final_aux)
            )
            return got.shape == full.shape and bool(torch.allclose(got, full, rtol=1e-5, atol=1e-5))
        except (RuntimeError, IndexError):  # a graph specialised to the batch shape: the whole batch goes through
            return False

    def _prelude_aux(self, rows: RowBatch) -> tuple | None:
        """The prelude's auxiliary values (sizes, masks) for the shape of ``rows``: what a component computed on the
        final read's rows alone needs (MLPs that flatten the stream take the batch and sequence sizes)."""
        ids = self._clean_ids.new_zeros(rows.shape)
        try:
            return tuple(self.graph.prelude(ids)[1:])
        except (RuntimeError, IndexError, ValueError):  # a prelude specialised to the batch: components run on it whole
            return None

    def _row_aux(self, k: int) -> list[torch.Tensor]:
        aux = self._rows_prelude_aux if self._candidates is None else self._candidate_rows[self._candidates][1]
        return [aux[i] for i in self.steps[k].aux]

    def _row_component(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Step k's token-wise component on the final read's rows, ``x`` [rows, d] (a candidate batch: [K, rows, d])."""
        if self._candidates is None:
            return self.row_batch.unpack(self._components[k](self.row_batch.pack(x), *self._row_aux(k)))
        rows = self._candidate_rows[self._candidates][0]
        return rows.unpack(self._components[k](rows.pack(x.flatten(0, 1)), *self._row_aux(k))).unflatten(
            0, (self._candidates, -1)
        )

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """A candidate batch's [K, B, ...] as the [K * B, ...] batch the traced components take; the state's
        [B, ...] repeated for every candidate. Unchanged outside a candidate batch."""
        if self._candidates is None:
            return x
        return x.flatten(0, 1) if x.dim() == self._clean_ids.dim() + 2 else x.repeat(self._candidates, *([1] * (x.dim() - 1)))

    def _unflat(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._candidates is None else x.unflatten(0, (self._candidates, -1))

    def _token_wise_component(self, k: int) -> bool:
        """Whether step k's MLP or norm acts per token, so that it can run on the final read's rows alone."""
        if self._rows_prelude_aux is None:
            return False
        x = self.clean_reads[k]
        try:
            rows = self.row_batch.unpack(self._components[k](self.row_batch.pack(self._rows(x)), *self._row_aux(k)))
        except (RuntimeError, IndexError):  # a recurrence unrolled over the trace's sequence length (Mamba's scan)
            return False
        full = self.clean[self.step_senders[k][0]]  # its FP32 clean output (setup runs this before storing), from this read
        return rows.shape == (len(self.final_rows), x.shape[-1]) and bool(
            torch.allclose(rows, self._rows(full), rtol=1e-5, atol=1e-5)
        )

    def _final_metric(self, final_rows: torch.Tensor) -> torch.Tensor:
        """The metric of a final read [rows, d] (a candidate batch's [K, rows, d]: one value per candidate)."""
        k = self._candidates
        if self._final_shape is None:
            if k is None:
                rows, aux, flat = self.row_batch, self._row_final_aux, final_rows
            else:
                rows, _, aux = self._candidate_rows[k]
                flat = final_rows.flatten(0, 1)
            logits = self._unflat(rows.unpack(self.graph.unembed(rows.pack(flat), *aux)))
        else:
            stream = final_rows.reshape(-1, *self._final_shape[1:])
            logits = self._unflat(self.graph.unembed(stream, *self._aux(self.structure.final_aux)))
            logits = logits.flatten(-3, -2).index_select(-2, self.positions)
        return metric_value(self.metric_kind, logits, self.clean_distribution, self.correct, self.incorrect)

    def state_bytes(self) -> int:
        """Bytes held by the state and the caches (distinct tensors counted once)."""
        held = (t for stored in (*self.clean, *self.corrupt_minus_clean, *self.outputs) for t in self.codec.tensors(stored))
        tensors = [
            *held,
            *self.clean_reads,
            *self._cmc_rows,
            *(t for t in self.inputs if t is not None),
            *self.projections.values(),
            self.final,
        ]
        seen: dict[int, int] = {}
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    # ----------------------------------------------------------------------------------------------- public API
    def _unit_plan(self, receiver: Receiver) -> dict[int, FullPrecisionUnits]:
        """FP32 units while ``receiver`` is investigated: its head (q), its key/value group (k, v); none otherwise."""
        if not self.low_precision or not receiver.is_attention_input:
            return {}
        layer = self.edges.head_graph.layers[receiver.layer]
        if receiver.role is Role.QUERY:
            units = FullPrecisionUnits(receiver.unit, layer.kv_group_of_head[receiver.unit])
        else:
            units = FullPrecisionUnits(-1 if layer.grouped else receiver.unit, receiver.unit)
        return {self.row_step[self.edges.receiver_index[receiver.name]]: units}

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

    # ----------------------------------------------------------------------------------------------- speculation
    @torch.no_grad()
    def try_remove_each(self, row: int, senders: list[int], removed_before: list[bool]) -> list[float]:
        """Candidate queries into one receiver, evaluated together along an extra batch dimension: candidate i
        removes ``senders[i]`` on top of the state with ``senders[j]`` removed for every earlier j where
        ``removed_before[j]`` (the decisions a predictor expects). Returns each candidate's metric; nothing is
        decided until :meth:`keep_candidate`.

        Removing edges into one receiver changes only that receiver's input (its senders lie upstream), so every
        candidate has the same cone; the candidates' inputs are built in the order the sequential search would
        build them, bit for bit, and the cone runs once for all of them."""
        if not senders or len(set(senders)) != len(senders) or len(removed_before) != len(senders):
            raise ValueError(f"candidates need distinct senders and one guess each, got {senders} and {removed_before}")
        self._check_removable(row, senders)
        if len(senders) > 1:
            self._prepare_candidates(len(senders))
        self.evaluated += len(senders)
        removed = [(row, s) for s, before in zip(senders, removed_before, strict=True) if before]
        self._candidate_removed = [(*tuple(removed[: sum(removed_before[:i])]), (row, s)) for i, s in enumerate(senders)]
        if len(senders) == 1:  # the sequential query itself: its values are the commit's
            self._pending = self._remove({row: senders})
            return [self._pending.metric]
        self._pending = None
        base = self.final if row == self.final_row else self.inputs[row]
        inputs, prefix = [], base
        for s, before in zip(senders, removed_before, strict=True):
            inputs.append(prefix + self._removal_change(row, s))
            if before:
                prefix = inputs[-1]
        self._candidates = len(senders)
        try:
            batch = self._cascade({}, None, None, new_inputs={row: torch.stack(inputs)})
        finally:
            self._candidates = None
        return batch.metrics  # the batch's values are dropped: keep_candidate recomputes the kept removals

    @torch.no_grad()
    def keep_candidate(self, index: int | None, decided: int) -> float:
        """After :meth:`try_remove_each`, with ``decided`` of its candidates' decisions taken: make candidate
        ``index``'s removals part of the state (the last candidate whose removal was kept), or keep the state
        (None). Returns the metric of the state.

        The kept removals are committed one at a time, each by its own pass at the task's own batch, exactly as the
        sequential search commits them: the state is then the sequential search's, bit for bit (a batch's values
        differ from single passes by round-off, and a commit's round-off would stay in the state), and a
        checkpoint's replay rebuilds it exactly. A batch of one commits its own values."""
        single, self._pending = self._pending, None
        self.queries += decided
        if index is None:
            return self.metric
        if single is not None:
            self._pending = single
            return self.commit()
        for row, sender in self._candidate_removed[index]:
            self._pending = self._remove({row: [sender]})
            self.commit()
        return self.metric

    def batches_candidates(self) -> bool:
        """Whether candidate batches can run: an eager runtime whose trace takes any batch size, with auxiliary
        values (masks, positions) that are the task's repeated per candidate."""
        if self._compiled:
            self.candidate_refusal = "a compiled runtime runs one query at a time"
            return False
        if self._candidate_support is None:
            try:
                self._prepare_candidates(2)
                self._candidate_support = True
            # Any exception: this runs the model's own prelude at twice its batch, whatever that code raises; the
            # refusal is the run's report's note, and the search goes on one query at a time.
            except Exception as error:
                self._candidate_support = False
                self.candidate_refusal = str(error).splitlines()[0] if str(error) else type(error).__name__
        return self._candidate_support

    def _prepare_candidates(self, k: int) -> None:
        """The prelude's auxiliary values at k times the task's batch, checked against the task's own."""
        if k in self._candidate_aux:
            return
        aux = tuple(self.graph.prelude(self._clean_ids.repeat(k, 1))[1:])
        for mine, theirs in zip(self.aux, aux, strict=True):
            if not isinstance(mine, torch.Tensor):  # a size: the batch's becomes the candidate batch's
                batch = self._clean_ids.shape[0]
                if mine != theirs and (mine, theirs) != (batch, k * batch):
                    raise ValueError(f"an auxiliary value changes with the batch: {mine!r} -> {theirs!r}")
                continue
            if theirs.shape == mine.shape:
                expected = mine
            elif mine.dim() and theirs.shape == (k * mine.shape[0], *mine.shape[1:]):
                expected = mine.repeat(k, *([1] * (mine.dim() - 1)))
            else:
                raise ValueError(
                    f"an auxiliary value of shape {tuple(mine.shape)} has shape {tuple(theirs.shape)} at {k} candidates"
                )
            if not torch.equal(expected, theirs):
                raise ValueError(f"an auxiliary value of shape {tuple(mine.shape)} is not repeated per candidate")
        rows = RowBatch(k * self.row_batch.rows, self.row_batch.seq)
        row_aux = self._prelude_aux(rows) if self._rows_prelude_aux is not None else None
        if row_aux is None and self._rows_prelude_aux is not None:
            raise ValueError(f"the final read's rows do not run at {k} times their number")
        final_aux = self._final_aux if row_aux is None else [row_aux[i] for i in self.structure.final_aux]
        self._candidate_aux[k] = aux
        self._candidate_rows[k] = (rows, row_aux or (), final_aux)

    def candidate_bytes(self, row: int) -> int:
        """What one candidate of a batch into ``row`` may hold at most: the state of every step from the
        receiver's on (inputs, outputs, projections) and the final read."""
        step = self.row_step[row]
        tensors = [t for s, stored in enumerate(self.outputs) if self.sender_step[s] >= step for t in self.codec.tensors(stored)]
        tensors += [x for r, x in enumerate(self.inputs) if x is not None and self.row_step[r] >= step]
        tensors += [p for k, p in self.projections.items() if k >= step]
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*tensors, self.final]}
        return sum(seen.values())

    @torch.no_grad()
    def remove(self, row: int, senders: Iterable[int]) -> None:
        """Remove edges without testing them (ACDC prunes a receiver whose node has no outgoing edge left)."""
        senders = list(senders)
        if self.row_step[row] >= self.active_from and self.is_live(row):
            self._pending = self._remove({row: senders})
            self.commit()
        else:  # a dead node's input is never read again; a step that does not run yet reads the removed set
            self._mark_removed(row, senders)
            self._update_rows_only()

    def is_live(self, row: int) -> bool:
        """Whether the node this receiver feeds still sends anything (the final read always counts).

        The state is exact for live receivers' inputs and for senders with kept edges, where those edges read
        them; a dead node's inputs and outputs are never read again, so they are not maintained."""
        return row == self.final_row or any(self.kept_out[s] for s in self.feeding[row])

    def commit(self) -> float:
        """Make the last tentative values the state; returns the metric."""
        pending, self._pending = self._pending, None
        for row, x in pending.inputs.items():
            self.inputs[row] = x
        for s, x in pending.outputs.items():
            self.outputs[s] = x
        self.projections.update(pending.projections)
        for row, s in pending.removed:
            self._mark_removed(row, [s])

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
        return {(row, s) for row, senders in enumerate(self.removed_from) for s in senders}

    def is_kept(self, row: int, sender: int) -> bool:
        return sender in self.kept_in[row]

    @property
    def kept_edges(self) -> int:
        return sum(len(k) for k in self.kept_in)

    @property
    def total_edges(self) -> int:
        return sum(len(r.senders) for r in self.edges.receivers)

    def _mark_removed(self, row: int, senders: list[int]) -> None:
        for s in senders:
            self.removed_from[row].append(s)
            self.kept_in[row].discard(s)
            self.kept_out[s].discard(row)

    # ----------------------------------------------------------------------------------------------- the cone
    def _remove(self, removals: dict[int, list[int]]) -> _Pending:
        """Removing (s, r) changes r's input by ``corrupt_s - current_s``; the cascade does the rest."""
        changes = {}
        for row, senders in removals.items():
            self._check_removable(row, senders)
            for s in senders:
                change = self._removal_change(row, s)
                changes[row] = change if row not in changes else changes[row] + change
        removed = tuple((row, s) for row, senders in removals.items() for s in senders)
        return self._cascade(changes, None, None, removed=removed)

    def _check_removable(self, row: int, senders: Iterable[int]) -> None:
        """The receiver runs (its step is active) and keeps an edge from every one of ``senders``."""
        if self.row_step[row] < self.active_from:
            raise RuntimeError(f"{self.edges.receivers[row].name} does not run yet: investigate it (or run_from) first")
        for s in senders:
            if s not in self.kept_in[row]:
                raise ValueError(f"edge {self.edges.senders[s].name} -> {self.edges.receivers[row].name} is not present")

    def _reads_rows(self, row: int) -> bool:
        """Whether this receiver's input is kept at the final read's rows only."""
        return row == self.final_row or self.row_step[row] in self.rows_only

    def _sends_rows(self, sender: int) -> bool:
        return self.sender_step[sender] in self.rows_only

    def _as_read_by(self, row: int, x: torch.Tensor, sender: int) -> torch.Tensor:
        """A sender's (change of) output in the shape receiver ``row`` holds its input in."""
        return self._rows(x) if self._reads_rows(row) and not self._sends_rows(sender) else x

    def _removal_change(self, row: int, sender: int) -> torch.Tensor:
        """``corrupt_s - current_s``: what removing (sender, row) adds to the receiver's input."""
        load = self.codec.load
        if self.outputs[sender] is self.clean[sender]:
            return self._cmc_rows[sender] if self._reads_rows(row) else load(self.corrupt_minus_clean[sender])
        if self._sends_rows(sender):
            return self._cmc_rows[sender] + self._rows(load(self.clean[sender])) - load(self.outputs[sender])
        change = load(self.corrupt_minus_clean[sender]) + load(self.clean[sender]) - load(self.outputs[sender])
        return self._as_read_by(row, change, sender)

    def _change(self, sender: int, new: Stored) -> torch.Tensor:
        """A sender's change of output, between stored values: the state's inputs are sums of stored outputs."""
        return self.codec.load(new) - self.codec.load(self.outputs[sender])

    def _update_rows_only(self) -> None:
        """Move MLPs and norms whose kept edges all go to the final read or to row-only ones to row-only state (for
        good: kept edges only ever disappear). Their other rows are never read again."""
        for k in reversed(range(self.active_from, len(self.steps))):
            if k in self.rows_only or k not in self._token_wise_components:
                continue
            sender = self.step_senders[k][0]
            if all(self._reads_rows(r) for r in self.kept_out[sender]):
                self.rows_only.add(k)
                row = next(iter(self.step_rows[k].values()))[0]  # the component's one receiver
                self.inputs[row] = self._rows(self.inputs[row])
                self.outputs[sender] = self.codec.select_rows(self.outputs[sender], self.final_rows)

    def _cascade(
        self,
        changes: dict[int, torch.Tensor],
        activate_from: int | None,
        plan: dict[int, FullPrecisionUnits] | None,
        removed: tuple[tuple[int, int], ...] = (),
        new_inputs: dict[int, torch.Tensor] | None = None,
    ) -> _Pending:
        """Recompute, in step order, every component that ``changes`` (input deltas by receiver row), ``new_inputs``
        (inputs given whole, by receiver row), newly running steps or a new plan reach, following kept edges; the
        tentative state and metric."""
        given = new_inputs or {}
        pending = _Pending(removed=removed)
        kept_in = self.kept_in
        if removed:
            kept_in = list(self.kept_in)
            for row, s in removed:
                kept_in[row] = kept_in[row] - {s}
        new_from = self.active_from if activate_from is None else min(activate_from, self.active_from)
        plan_changes: dict[int, FullPrecisionUnits] = {}
        if plan is not None:
            pending.plan = plan
            for k in set(plan) | set(self.plan):
                if k >= self.active_from and plan.get(k, FullPrecisionUnits()) != self.plan.get(k, FullPrecisionUnits()):
                    plan_changes[k] = self.plan.get(k, FullPrecisionUnits())
        current_plan = plan if plan is not None else self.plan
        if new_from < self.active_from:
            pending.active_from = new_from
        deltas = _Deltas(lambda sender: self._change(sender, pending.outputs[sender]))
        first = min(
            [self.row_step[r] for r in (*changes, *given) if r != self.final_row]
            + [new_from if new_from < self.active_from else len(self.steps)]
            + list(plan_changes)
        )
        for k in range(first, len(self.steps)):
            activating = new_from <= k < self.active_from
            new_inputs, changed = self._step_inputs(k, changes, given, deltas, kept_in, activating)
            pending.inputs.update(new_inputs)
            step = self.steps[k]
            if step.kind is StepKind.ATTENTION:
                old_units = plan_changes.get(k)
                if not new_inputs and old_units is None:
                    continue
                outputs = self._attention(
                    k, new_inputs, changed, current_plan.get(k, FullPrecisionUnits()), old_units, activating, pending
                )
                pending.outputs.update({s: self.codec.store(out) for s, out in outputs.items()})
                deltas.add_heads(k, list(outputs))
            else:
                if not changed:
                    continue
                x, sender = new_inputs[changed[0]], self.step_senders[k][0]
                pending.recomputed.append(step.name)
                if k in self.rows_only:
                    out = self._row_component(k, x)
                else:
                    out = self._unflat(self._components[k](self._flat(x), *self._aux(step.aux)))
                pending.outputs[sender] = self.codec.store(out)
                deltas.add(sender, self._change(sender, pending.outputs[sender]))
        final_change = changes.get(self.final_row)
        reaching = [s for s in deltas if s in kept_in[self.final_row]]
        if reaching:
            total = sum(self._as_read_by(self.final_row, d, s) for s, d in deltas.terms(reaching))
            final_change = total if final_change is None else final_change + total
        final = given.get(self.final_row)
        if final_change is not None:
            final = self.final + final_change if final is None else final + final_change
        if final is None:
            pending.metric = self.metric
            pending.metrics = [self.metric] * (self._candidates or 1)
        else:
            pending.final = final
            pending.recomputed.append(names.RESID_POST)
            values = self._metric(final) if self._candidates is None else self._final_metric(final)
            pending.metrics = [float(v) for v in values.reshape(-1)]
            pending.metric = pending.metrics[0]
        self.last_recomputed = pending.recomputed
        return pending

    def _step_inputs(
        self,
        k: int,
        changes: dict[int, torch.Tensor],
        given: dict[int, torch.Tensor],
        deltas: _Deltas,
        kept_in: list[set[int]],
        activating: bool,
    ) -> tuple[dict[int, torch.Tensor], list[int]]:
        """New inputs of step k's receivers that ``changes``, ``given`` or upstream deltas reach (all of them when the
        step starts running: their clean read plus the removed edges' corruption), and the rows whose input differs
        from the one the component's current output was computed from."""
        new_inputs, changed = {}, []
        # Receivers whose input is the same sum (same base, same deltas; a step's receivers share one shape) share
        # one tensor: in a dense circuit every q/k/v input of a layer is the same sum, computed and stored once. Bit
        # for bit what each would get alone (same terms, same order); nothing modifies an input in place.
        built: dict[tuple, torch.Tensor] = {}
        for rows in self.step_rows[k].values():
            for row in rows:
                if not self.is_live(row):
                    if activating:
                        new_inputs[row] = self.clean_reads[k]  # a placeholder: nothing reads a dead node
                    continue
                if row in given:  # the investigated receiver of a candidate batch: no delta reaches it from downstream
                    new_inputs[row] = given[row]
                    changed.append(row)
                    continue
                reaching = [s for s in deltas if s in kept_in[row]]
                if activating:
                    removed = tuple(self.removed_from[row])
                    key = ("clean read", removed, *reaching)
                elif reaching or row in changes:
                    removed, key = (), ("state", id(self.inputs[row]), *reaching)
                else:
                    continue
                if row in changes:  # its own change: a sum no other receiver has
                    new_inputs[row] = self._input_sum(k, row, activating, reaching, deltas, changes[row])
                else:
                    if key not in built:
                        built[key] = self._input_sum(k, row, activating, reaching, deltas, None)
                    new_inputs[row] = built[key]
                if removed or reaching or row in changes:
                    changed.append(row)
        return new_inputs, changed

    def _input_sum(
        self, k: int, row: int, activating: bool, reaching: list[int], deltas: _Deltas, change: torch.Tensor | None
    ) -> torch.Tensor:
        """Receiver ``row``'s new input: its base (the clean read plus its removed edges' corruption when step k starts
        running, its state input otherwise), then its own change, then the deltas reaching it (:meth:`_Deltas.terms`), in
        that order."""
        if activating:
            x = self.clean_reads[k]
            for s in self.removed_from[row]:
                x = x + self.codec.load(self.corrupt_minus_clean[s])
        else:
            x = self.inputs[row]
        if change is not None:
            x = x + change
        for s, d in deltas.terms(reaching):
            x = x + self._as_read_by(row, d, s)
        return x

    def _projections(
        self,
        block: AttentionBlock,
        rows: dict[Role, list[int]],
        order: dict[Role, list[int]],
        units: FullPrecisionUnits,
        norm_aux: list[torch.Tensor],
        new_inputs: dict[int, torch.Tensor],
    ) -> list[torch.Tensor]:
        """The listed units' projections, by role, [B, T, units, width]. Receivers often hold one shared input tensor
        (every q/k/v input of a layer in a dense circuit, :meth:`_step_inputs`): each distinct input is normed once
        (the norm acts per position), and a role whose units all read one input projects it with one matrix
        multiply over their stacked weights instead of once per unit on copies of it."""
        slot: dict[int, int] = {}
        distinct: list[torch.Tensor] = []
        slots: dict[Role, list[int]] = {}
        for role in ROLES:
            slots[role] = []
            for u in order[role]:
                x = new_inputs.get(rows[role][u], self.inputs[rows[role][u]])
                if id(x) not in slot:
                    slot[id(x)] = len(distinct)
                    distinct.append(self._flat(x))
                slots[role].append(slot[id(x)])
        stacked = torch.stack(distinct, dim=2) if len(distinct) > 1 else distinct[0].unsqueeze(2)
        normed = block.norm(stacked, *norm_aux)
        parts = []
        for role in ROLES:
            if not order[role]:
                continue
            fp32 = units.query_head if role is Role.QUERY else units.kv_group
            projection = getattr(block, role.value)
            if len(set(slots[role])) == 1:
                parts.append(projection.units(normed[:, :, slots[role][0]], order[role], fp32, shared_input=True))
            else:
                x = normed.index_select(2, torch.tensor(slots[role], device=normed.device))
                parts.append(projection.units(x, order[role], fp32))
        return parts

    def _attention(
        self,
        k: int,
        new_inputs: dict[int, torch.Tensor],
        changed: list[int],
        units: FullPrecisionUnits,
        old_units: FullPrecisionUnits | None,
        activating: bool,
        pending: _Pending,
    ) -> dict[int, torch.Tensor]:
        """Recompute the projections of attention step k that new inputs or a precision change reach (all of them
        when the step starts running), and the outputs of the heads whose value can differ from the state's."""
        block: AttentionBlock = getattr(self.graph, self.steps[k].module)
        layout = self._layouts[k]
        rows = self.step_rows[k]
        dirty: dict[Role, set[int]] = {role: set() for role in ROLES}
        for row in changed:
            dirty[self.row_role[row]].add(self.row_unit[row])
        if old_units is not None:
            for head in {old_units.query_head, units.query_head} - {-1}:
                dirty[Role.QUERY].add(head)
            for group in {old_units.kv_group, units.kv_group} - {-1}:
                dirty[Role.KEY].add(group)
                dirty[Role.VALUE].add(group)
        layer = self.edges.head_graph.layers[block.layer]
        heads = {h for role in ROLES for unit in dirty[role] for h in layer.heads_fed_by(role, unit)}
        if activating:
            # All projections are new to the state; FP32 heads reproduce their clean output exactly.
            dirty = {role: set(range(layout.n_heads if role is Role.QUERY else layout.n_groups)) for role in ROLES}
            if self.low_precision:
                heads = set(range(layout.n_heads))
        senders = self.step_senders[k]
        heads = {h for h in heads if self.kept_out[senders[h]]}  # a dead head's output reaches nothing
        order = {role: sorted(dirty[role]) for role in ROLES}
        aux = self._aux(self.steps[k].aux)
        norm_aux, core_aux = aux[: block.n_norm_aux], aux[block.n_norm_aux :]
        values = torch.cat(
            [part.flatten(-2) for part in self._projections(block, rows, order, units, norm_aux, new_inputs)], dim=-1
        )
        if activating:
            projections = values
        else:
            index = torch.cat([layout.features[role][u] for role in ROLES for u in order[role]])
            projections = self._flat(self.projections[k]).index_copy(-1, index, values)
        pending.projections[k] = self._unflat(projections)
        if not heads:
            return {}
        heads = sorted(heads)
        z = self._cores[k](*block.scatter(projections), *core_aux)
        z_heads = layout.z_of(z, heads)
        out = self._unflat(block.o.units(z_heads, heads, units.query_head))
        pending.recomputed.extend(names.head(block.layer, h) for h in heads)
        return {senders[h]: out.select(-2, i) for i, h in enumerate(heads)}
