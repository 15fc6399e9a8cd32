"""Edge attribution: a first-order estimate of every edge's effect from a few gradients, on the runtime's own split.

The search decides every edge exactly; what it cannot know in advance is which edges it will keep, and with them how
much of the model later queries recompute. The progress bar needs that guess (acdc/eta.py). Attribution gives it
at the price of a few backward passes: the effect of removing edge ``s -> r`` is estimated as
``(corrupted_s - output_s) . dmetric/dinput_r``, averaged over points of the path from the clean run to the corrupted
one (every edge removed a fraction ``alpha``), as EAP-IG does. At the clean run alone the gradient of a KL metric is
zero, hence the path. An estimate, never a decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from ..ir import names
from ..ir.structure import StepKind
from .edges import EdgeGraph
from .runtime import PatchingRuntime
from .runtime.deltas import add_terms

STEPS = 2  # points on the path from clean to corrupted: midpoints of equal intervals
# The pass holds about this many stream-sized FP32 tensors per receiver and per sender (the senders' corrupted
# differences, the activations the backward pass keeps, a layer's per-head input gradients; measured 1.4-2.4 on
# GPT-2 and Llama shapes), besides each attention layer's scores and probabilities and the metric rows' logits. An
# estimate (within 1.5x of the peak, tests/test_cone_estimate.py), hence the margin: the pass is skipped where it is
# more than MEMORY_SHARE of the memory that is free.
STREAMS_PER_NODE = 3
LOGITS_COPIES = 4
MEMORY_SHARE = 0.25


def attribution_bytes(runtime: PatchingRuntime, edges: EdgeGraph) -> int:
    """An estimate of what :func:`edge_attribution` holds at its peak: :data:`STREAMS_PER_NODE` stream-sized tensors
    per node, each attention layer's FP32 scores and probabilities ([batch, heads, seq, seq] each) kept for the backward
    pass, and :data:`LOGITS_COPIES` of the metric rows' logits ([rows, vocab]: log-probabilities and gradients)."""
    read = runtime.clean_read(0)
    stream = read.numel() * 4
    batch, seq = read.shape[0], read.shape[1]
    attention = sum(2 * 4 * batch * layer.n_heads * seq * seq for layer in edges.head_graph.layers)
    logits = LOGITS_COPIES * 4 * runtime.clean_distribution.logprobs.numel()
    return STREAMS_PER_NODE * (len(edges.receivers) + len(edges.senders)) * stream + attention + logits


def edge_attribution(runtime: PatchingRuntime, edges: EdgeGraph, steps: int = STEPS) -> list[torch.Tensor] | None:
    """Per receiver row, the estimated metric change of removing each of its edges, in the order of its senders.
    ``None`` where a component has no gradient (a low-precision kernel without one): the caller falls back."""
    scores = [torch.zeros(len(r.senders), dtype=torch.float64) for r in edges.receivers]
    try:
        with torch.enable_grad():
            for i in range(steps):
                _path_point(runtime, edges, (i + 0.5) / steps, scores)
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return [s / steps for s in scores]


def _path_point(runtime: PatchingRuntime, edges: EdgeGraph, alpha: float, scores: list[torch.Tensor]) -> None:
    """Add to ``scores`` the attribution at one point: every receiver reads ``(1 - alpha)`` of its senders' outputs
    in this pass and ``alpha`` of their corrupted outputs. Each sender's corrupted output is rebuilt from the caches
    where it is used, and only its difference from this pass's output is kept (one stream per sender)."""
    index = runtime.index
    embed_senders = [s for s, k in enumerate(index.sender_step) if k < 0]
    diffs: list[torch.Tensor | None] = [None] * len(edges.senders)  # corrupted minus this pass's output, per sender
    for s in embed_senders:
        diffs[s] = corrupted(runtime, s) - load_clean(runtime, s)
    embed = (1 - alpha) * load_clean(runtime, embed_senders[0]) + alpha * corrupted(runtime, embed_senders[0])
    totals = {names.EMBED: embed.requires_grad_()}  # every read below then has a gradient
    hooks: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []

    def score(rows: list[tuple[int, int]]) -> Callable[[torch.Tensor], None]:
        """A hook adding the scores of ``rows`` (row, unit along dimension 2, or -1 for the whole read)."""
        by_senders: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # rows that share their senders share a product
        for row, unit in rows:
            by_senders.setdefault(edges.receivers[row].senders, []).append((row, unit))

        def add(grad: torch.Tensor) -> None:
            for senders, group in by_senders.items():
                g = torch.stack([(grad if unit < 0 else grad[:, :, unit]).flatten() for _, unit in group])
                by_sender = torch.stack([g @ cast(torch.Tensor, diffs[s]).flatten() for s in senders], 1)  # no copy of all
                for (row, _), values in zip(group, by_sender.cpu().double(), strict=True):  # the scores: CPU FP64
                    scores[row] += values

        return add

    for k, step in enumerate(runtime.steps):
        read = add_terms(0, (totals[c] for c in step.reads))
        block = getattr(runtime.graph, step.module)
        aux = runtime._aux(step.aux)
        rows = index.step_rows[k]
        if step.kind is StepKind.ATTENTION:
            layout = {role: units for role, units in rows.items() if isinstance(role, names.Role)}
            inputs = {}
            for role in names.Role:
                width = block.n_heads if role is names.Role.QUERY else block.n_kv_groups
                x = read.unsqueeze(2).expand(-1, -1, width, -1)
                inputs[role] = x
                units = [(row, unit) for unit, row in enumerate(layout.get(role, [])) if row >= 0]
                if units:
                    hooks.append((x, score(units)))
            heads = block(inputs[names.Role.QUERY], inputs[names.Role.KEY], inputs[names.Role.VALUE], *aux)
            senders = index.step_senders[k]
            corrupted_heads = torch.stack([corrupted(runtime, s) for s in senders], 2)
            for s, diff in zip(senders, (corrupted_heads - heads.detach()).movedim(2, 0).contiguous(), strict=True):
                diffs[s] = diff
            totals[step.name] = block.combine((1 - alpha) * heads + alpha * corrupted_heads)
        else:
            x = read.view_as(read)
            units = [(row, -1) for units in rows.values() for row in units if row >= 0]
            if units:
                hooks.append((x, score(units)))
            out = block(x, *aux)
            s = index.step_senders[k][0]
            sender_corrupted = corrupted(runtime, s)
            diffs[s] = sender_corrupted - out.detach()
            totals[step.name] = (1 - alpha) * out + alpha * sender_corrupted
    final = add_terms(0, (totals[c] for c in runtime.structure.final_reads)).view_as(totals[runtime.structure.final_reads[0]])
    hooks.append((final, score([(index.final_row, -1)])))
    for tensor, hook in hooks:
        tensor.register_hook(hook)
    runtime._final_metric(runtime.final_rows_of(final)).backward()


def load_clean(runtime: PatchingRuntime, sender: int) -> torch.Tensor:
    return runtime.codec.load(runtime.clean[sender])


def corrupted(runtime: PatchingRuntime, sender: int) -> torch.Tensor:
    """The sender's output in the corrupted run, from the stored caches."""
    return load_clean(runtime, sender) + runtime.codec.load(runtime.corrupt_minus_clean[sender])
