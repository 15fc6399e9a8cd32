"""The patching runtime: answers "metric with these edges removed" for ACDC, fast and exactly.

For a receiver ``r`` reading contributions upstream of it, with removed-edge mask ``removed[r, s]``::

    input_r = clean_read_r + sum_s removed[r, s] * (corrupt_s - clean_s) + sum_{s recomputed} kept[r, s] * (current_s - clean_s)

which is ``resid_r + sum over removed s of (corrupt_out_s - current_out_s)`` of docs/acdc.md rewritten
around the clean caches: senders below the receiver's layer output their clean value (every edge into them is
still present), so a query runs only from the receiver's component upwards. Caches are FP32; only the
positions the metric reads go through the final norm and unembedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..compile import CountingBackend
from ..errors import UnsupportedArchitectureError
from ..precision import all_heads_fp32
from ..split import Step
from .edges import EdgeGraph, Receiver, ReceiverKind
from .metrics import Metric, metric_value
from .task import Task


@dataclass(frozen=True)
class _StepPlan:
    step: Step
    first_sender: int
    n_senders: int
    rows: dict[str, torch.Tensor]  # receiver rows of the removed-mask for this step's inputs


class PatchingRuntime:
    """Clean/corrupted caches of a split model on a task, and the per-query forward from a given step."""

    def __init__(self, graph: fx.GraphModule, edges: EdgeGraph, task: Task, metric: Metric, compile: bool = True) -> None:
        self.graph = graph
        self.edges = edges
        self.metric = metric
        self.structure = graph.meta["structure"]
        self.device = task.clean_input_ids.device
        # Flat indices of the metric positions: index_select keeps shapes static (a bool mask would not).
        self.positions = task.metric_mask.flatten().nonzero().flatten()
        self.queries = 0
        self.counter = CountingBackend("inductor") if compile else None
        self._plans = self._step_plans()
        self._final_rows = torch.tensor([edges.receiver_index["resid_post"]], device=self.device)
        n_receivers, n_senders = len(edges.receivers), len(edges.senders)
        self.upstream = torch.zeros(n_receivers, n_senders, device=self.device)
        for i, r in enumerate(edges.receivers):
            self.upstream[i, list(r.senders)] = 1.0
        with torch.no_grad(), all_heads_fp32(graph):
            prelude = graph.prelude(task.clean_input_ids)
            self.aux = tuple(prelude[1:])
            self._final_aux = [self.aux[i] for i in self.structure.final_aux]
            clean, self.clean_reads, clean_final = self._full_run(prelude[0])
            corrupted, _, _ = self._full_run(graph.prelude(task.corrupted_input_ids)[0])
            self.clean = clean
            self.corrupt_minus_clean = corrupted - clean
            self._deviation = torch.zeros_like(clean)
            self.clean_final = clean_final
            full = self._unembed_all(clean_final)
            self.unembed_positions_only = self._positions_only_works(clean_final, full)
            self.clean_logprobs = torch.log_softmax(full.float(), dim=-1)
        if metric.needs_answers:
            rows = torch.div(self.positions, task.metric_mask.shape[1], rounding_mode="floor")
            self.correct, self.incorrect = task.correct_ids[rows], task.incorrect_ids[rows]
        else:
            self.correct = self.incorrect = None
        self._attention = self._compiled(self._attention_step)
        self._mlp = self._compiled(self._mlp_step)
        self._final = self._compiled(self._final_step)

    @property
    def compilations(self) -> int:
        return 0 if self.counter is None else self.counter.compilations

    def _compiled(self, fn):
        return fn if self.counter is None else torch.compile(fn, backend=self.counter, dynamic=False)

    def _step_plans(self) -> list[_StepPlan]:
        plans, expected = [], 0
        for step in self.structure.steps:
            senders = [s for s in self.edges.senders if s.component == step.name]
            if not senders or senders[0].index != expected + 1:
                raise UnsupportedArchitectureError(f"component {step.name} runs out of its senders' topological order")
            expected = senders[-1].index
            rows = {}
            for r_index, r in enumerate(self.edges.receivers):
                if r.layer is not None and self._step_of(r) is step:
                    rows.setdefault(r.kind.value, []).append((r.unit if r.unit is not None else 0, r_index))
            indices = {k: torch.tensor([i for _, i in sorted(v)], device=self.device) for k, v in rows.items()}
            if step.kind == "attention":
                indices["qkv"] = torch.cat([indices["q"], indices["k"], indices["v"]])
            plans.append(_StepPlan(step, senders[0].index, len(senders), indices))
        return plans

    def _step_of(self, receiver: Receiver) -> Step:
        name = receiver.name if receiver.kind is ReceiverKind.MLP else f"a{receiver.layer}"
        return next(s for s in self.structure.steps if s.name == name)

    def start_of(self, receiver: Receiver) -> int:
        """Index of the first step a query for this receiver must recompute (len(steps): only the unembedding)."""
        if receiver.kind is ReceiverKind.RESID_POST:
            return len(self._plans)
        return self.structure.steps.index(self._step_of(receiver))

    def _aux(self, step: Step) -> list:
        return [self.aux[i] for i in step.aux]

    def _unembed_all(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding of the whole [B, T, d] residual, logits at the metric positions [P, vocab]."""
        logits = self.graph.unembed(x, *self._final_aux)
        return logits.flatten(0, 1).index_select(0, self.positions)

    def _unembed_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding of only the metric positions of a [B, T, d] residual -> [P, vocab]."""
        rows = x.flatten(0, 1).index_select(0, self.positions).unsqueeze(0)
        return self.graph.unembed(rows, *self._final_aux).squeeze(0)

    def _positions_only_works(self, x: torch.Tensor, full: torch.Tensor) -> bool:
        """Whether the unembedding is token-wise, so that only metric positions need to go through it."""
        try:
            return bool(torch.allclose(self._unembed_positions(x), full, rtol=1e-5, atol=1e-5))
        except RuntimeError:
            return False

    def _full_run(self, embed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Every sender's output [S, B, T, d], every step's read, and the final read."""
        outputs = [embed.unsqueeze(0)]
        totals = {"embed": embed}
        reads = []
        for plan in self._plans:
            step = plan.step
            read = sum(totals[c] for c in step.reads)
            reads.append(read)
            block = getattr(self.graph, step.name)
            if step.kind == "attention":
                heads = block.from_stream(read, *self._aux(step))
                outputs.append(heads.permute(2, 0, 1, 3))
                totals[step.name] = block.combine(heads)
            else:
                out = block(read, *self._aux(step))
                outputs.append(out.unsqueeze(0))
                totals[step.name] = out
        final = sum(totals[c] for c in self.structure.final_reads)
        return torch.cat(outputs), reads, final

    def _patched(self, base: torch.Tensor, removed: torch.Tensor, rows: torch.Tensor, deviation: torch.Tensor, upto: int) -> torch.Tensor:
        """Inputs [R, B, T, d] of receiver rows: base + removed @ (corrupt - clean) + kept @ (current - clean).

        Only senders ``[0, upto)`` can feed these receivers (those upstream of the step), a slice that is fixed
        per step, so it costs no recompilation and skips the columns that are always zero.
        """
        r = removed.index_select(0, rows)[:, :upto]
        kept = self.upstream.index_select(0, rows)[:, :upto] - r
        return (
            base.unsqueeze(0)
            + torch.einsum("rs,sbtd->rbtd", r, self.corrupt_minus_clean[:upto])
            + torch.einsum("rs,sbtd->rbtd", kept, deviation[:upto])
        )

    def _attention_step(self, k: int, removed: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
        plan = self._plans[k]
        block = getattr(self.graph, plan.step.name)
        inputs = self._patched(self.clean_reads[k], removed, plan.rows["qkv"], deviation, plan.first_sender)
        q, kk, v = (x.permute(1, 2, 0, 3) for x in inputs.split([len(plan.rows[r]) for r in "qkv"]))
        heads = block(q, kk, v, *self._aux(plan.step)).permute(2, 0, 1, 3)
        return heads - self.clean[plan.first_sender : plan.first_sender + plan.n_senders]

    def _mlp_step(self, k: int, removed: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
        plan = self._plans[k]
        x = self._patched(self.clean_reads[k], removed, plan.rows["mlp"], deviation, plan.first_sender).squeeze(0)
        out = getattr(self.graph, plan.step.name)(x, *self._aux(plan.step))
        return out.unsqueeze(0) - self.clean[plan.first_sender : plan.first_sender + 1]

    def _final_step(self, removed: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
        x = self._patched(self.clean_final, removed, self._final_rows, deviation, deviation.shape[0]).squeeze(0)
        logits = self._unembed_positions(x) if self.unembed_positions_only else self._unembed_all(x)
        return metric_value(self.metric, logits, self.clean_logprobs, self.correct, self.incorrect)

    @torch.no_grad()
    def evaluate(self, start: int, removed: torch.Tensor) -> float:
        """The metric with ``removed`` edges patched, recomputing steps ``start..`` (earlier ones are clean).

        Every step sees the same [S, B, T, d] deviation buffer (current minus clean output of each sender,
        zero for senders that are not recomputed), so each step compiles to one graph whatever the start.
        """
        self.queries += 1
        deviation = self._deviation
        deviation.zero_()
        # One compiled graph per step: allow as many recompilations of the step functions as there are steps.
        with torch._dynamo.config.patch(recompile_limit=len(self._plans) + 8):
            for k in range(start, len(self._plans)):
                plan = self._plans[k]
                step = self._attention if plan.step.kind == "attention" else self._mlp
                deviation[plan.first_sender : plan.first_sender + plan.n_senders] = step(k, removed, deviation)
            return float(self._final(removed, deviation))
