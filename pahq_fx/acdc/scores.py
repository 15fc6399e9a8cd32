"""Exact edge scores: the metric's change when one edge alone is patched from the full model (MIB's exact activation
patching), on the incremental runtime.

The sign rule, for every metric (docs/acdc.md, "Edge scores and faithfulness curves"):
``score(s -> r) = m(full model with s -> r patched) - m(full model)``, with the metric oriented as ACDC's (smaller =
more like the clean model). So a larger score is a more important edge: for ``kl`` the KL increase, for
``logit_diff`` and ``prob_diff`` the drop in the correct answer's logit (probability) lead. This is MIB's
attribution sign (its metric is the negated logit difference).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..atomic import write_text
from ..errors import CircuitFormatError, PahqError
from ..ir import names
from ..metrics import Metric
from ..passes.precision import Format
from .eap_graph import EapLayout, EdgeValues, graph_json, layout_of, read, score_values, values_from_json
from .edges import EdgeGraph
from .run_info import eager_forward_seconds, peak_memory_mb
from .runtime import PatchingRuntime
from .search import Session, prepare
from .speculation import candidate_memory
from .task import Task

FORMAT = "pahq_fx.EdgeScores/1"
MODES = ("exact",)
EAP_FILE = "eap-file"  # the mode of scores read from an EAP-IG / MIB graph file

Edge = tuple[str, str]


@dataclass(frozen=True)
class EdgeScore:
    sender: str
    receiver: str
    score: float


@dataclass(frozen=True)
class ScoreStats:
    """``wall_s`` the whole call, ``setup_s`` of it tracing and caches, ``scoring_s`` the queries;
    ``forward_equivalents`` = seconds per edge / one eager forward of the model on the clean batch."""

    wall_s: float
    setup_s: float
    scoring_s: float
    forward_s: float
    forward_equivalents: float
    passes: int  # batched passes run (one per candidate batch or single query)
    peak_memory_mb: float


@dataclass(frozen=True)
class EdgeScores:
    """A score for every edge of a model's graph, in ACDC's visiting order, with what they were measured on.

    ``full_model`` is the metric of the full model the scores are differences from. ``eap_config`` is what
    EAP-IG's layout needs (layers, heads, parallel attention and MLP, d_model) where the graph fits that layout, and
    ``eap_groups`` each layer's key/value group of every head (None where heads have their own keys and values)."""

    scores: tuple[EdgeScore, ...]
    metric: str
    mode: str = "exact"
    full_model: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    stats: ScoreStats | None = None
    eap_config: dict[str, Any] | None = None
    eap_groups: tuple[tuple[int, ...] | None, ...] | None = None

    def by_edge(self) -> dict[Edge, float]:
        return {(e.sender, e.receiver): e.score for e in self.scores}

    def ranked(self, absolute: bool = False) -> list[EdgeScore]:
        """Most important first: by score, or by its magnitude; ties keep the visiting order."""
        return sorted(self.scores, key=lambda e: -abs(e.score) if absolute else -e.score)

    def table(self, fmt: str = "markdown", limit: int | None = None) -> str:
        """The edges by score, most important first: a Markdown table or TSV (``fmt="tsv"``)."""
        ranked = self.ranked()[:limit]
        header = ["rank", "sender", "receiver", f"score ({self.metric}; larger = more important)"]
        if fmt == "tsv":
            rows = ["\t".join(["rank", "sender", "receiver", "score"])]
            rows += [f"{i}\t{e.sender}\t{e.receiver}\t{e.score!r}" for i, e in enumerate(ranked, 1)]
            return "\n".join(rows) + "\n"
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += [f"| {i} | {e.sender} | {e.receiver} | {e.score:.6g} |" for i, e in enumerate(ranked, 1)]
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        head = (
            f"{len(self.scores)} edges scored ({self.mode}, metric={self.metric}, full model {self.full_model:.4g} as ACDC "
            "orients the metric)"
        )
        s = self.stats
        if s is None:
            return head
        return (
            f"{head} in {s.wall_s:.1f}s ({s.setup_s:.1f}s setup, {s.scoring_s:.1f}s scoring in {s.passes} passes, "
            f"{s.forward_equivalents:.3g} forward-equivalents per edge), peak RSS {s.peak_memory_mb:.0f} MB"
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = [[e.sender, e.receiver, e.score] for e in self.scores]
        data["format"] = FORMAT
        return data

    def save(self, path: str | Path) -> Path:
        return write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    def to_eap_json(self) -> dict[str, Any]:
        """EAP-IG's graph layout (``cfg``, ``nodes``, ``edges`` named ``input->a0.h1<q>``), every edge in the graph:
        what MIB's evaluation reads as ``importances.json``; a key/value group's score is shared among its heads
        (docs/mib.md). Only graphs EAP-IG can express; others raise :class:`PahqError`."""
        if self.eap_config is None:
            raise PahqError(
                "EAP-IG's layout has attention heads and one MLP per layer; this model's graph (post-attention norms or "
                "other components) does not fit it"
            )
        layout = EapLayout.from_cfg(self.eap_config)
        if self.eap_groups is not None:
            layout = dataclasses.replace(layout, groups=tuple(None if g is None else tuple(g) for g in self.eap_groups))
        return graph_json(score_values(self.by_edge(), layout), layout)


def _nodes(scores: tuple[EdgeScore, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for e in scores:
        seen.setdefault(e.sender)
        seen.setdefault(names.node_of(e.receiver))
    return list(seen)


def load_scores(path: str | Path) -> EdgeScores:
    """Scores written by :meth:`EdgeScores.save`, or an EAP-IG/MIB graph file (``.json`` or ``.pt``, read and checked as
    :func:`~pahq_fx.load_circuit` reads one), whose scores are taken in the same sign (MIB attributes the negated logit
    difference: larger = more important). Every score must be a finite number and every edge canonically named."""
    path = Path(path)
    if path.suffix == ".pt":
        return _eap_scores(read(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise PahqError(f"{path} is not a score file (pahq_fx scores or an EAP-IG graph): {error}") from None
    if isinstance(data, dict) and "cfg" in data and "edges" in data:
        return _eap_scores(values_from_json(data, path))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PahqError(f"{path} is not a score file: neither pahq_fx scores ({FORMAT}) nor an EAP-IG graph (cfg, nodes, edges)")
    rows = data.get("scores")
    if not isinstance(rows, list) or not all(isinstance(row, list) and len(row) == 3 for row in rows):
        raise PahqError(f"{path}: scores must be a list of [sender, receiver, score] triples")
    for sender, receiver, value in rows:
        _check_score(sender, receiver, value, path)
    try:
        stats = data.get("stats")
        return EdgeScores(
            scores=tuple(EdgeScore(s, r, float(v)) for s, r, v in rows),
            metric=data["metric"],
            mode=data.get("mode", "exact"),
            full_model=float(data.get("full_model", 0.0)),
            model=data.get("model", {}),
            task=data.get("task", {}),
            stats=ScoreStats(**stats) if stats else None,
            eap_config=data.get("eap_config"),
            eap_groups=data.get("eap_groups"),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise PahqError(f"{path} is not a score file written by pahq_fx: {error}") from None


def _check_score(sender: Any, receiver: Any, value: Any, path: Path) -> None:
    for name in (sender, receiver):
        if not isinstance(name, str):
            raise PahqError(f"{path}: {name!r:.40} is not a node name")
        try:
            names.parse(name)
        except ValueError as error:
            raise PahqError(f"{path}: {error}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PahqError(f"{path}: edge {sender} -> {receiver} has score {value!r:.40}: a score must be a finite number")


def _eap_scores(values: EdgeValues) -> EdgeScores:
    """An EAP-IG file's scores by per-head edge (a key or value input per head, as the file names them); evaluated on a
    model, :func:`~pahq_fx.acdc.mib.edge_rows` sums them onto its key/value groups."""
    scores = tuple(EdgeScore(*names.from_eap_edge(name), score) for name, score in values.scores.items())
    return EdgeScores(scores=scores, metric="logit_diff", mode=EAP_FILE, eap_config=values.cfg)


def eap_layout(edges: EdgeGraph) -> EapLayout | None:
    """The EAP-IG graph of this model, or None where EAP-IG's layout cannot express it (post-attention norms, several
    or no whole components per layer, components before the first layer)."""
    try:
        return layout_of(edges.head_graph)
    except CircuitFormatError:
        return None


def edge_scores(
    model: nn.Module,
    task: Task,
    *,
    metric: str | Metric = "kl",
    mode: str = "exact",
    progress: bool = True,
    allow_weak_task: bool = False,
    batch: bool = True,
) -> EdgeScores:
    """Every edge's score (the sign rule in this module's docstring): the edge alone patched to its corrupted value
    in the full model, in FP32, each query from the full-model state and rolled back. ``batch``: the edges into one
    receiver run as one batched pass where the runtime supports it (:meth:`PatchingRuntime.try_remove_each`), one
    query at a time otherwise; the same scores to round-off."""
    if mode not in MODES:
        raise PahqError(f"unknown score mode {mode!r}; choose one of {', '.join(MODES)}")
    start = time.perf_counter()
    session = prepare(model, task, metric=metric, precision=Format.FP32.value, compile=False, allow_weak_task=allow_weak_task)
    return scores_of_session(session, progress=progress, batch=batch, started=start)


def scores_of_session(session: Session, *, progress: bool = True, batch: bool = True, started: float | None = None) -> EdgeScores:
    """:func:`edge_scores` on a prepared FP32 session (its runtime is reset before and after)."""
    runtime, edges = session.runtime, session.edges
    if runtime.low_precision:
        raise PahqError("exact edge scores are measured in FP32; prepare the session with precision='fp32'")
    begin = time.perf_counter()
    full, values, passes, _ = exact_scores(runtime, edges, progress=progress, batch=batch)
    scoring_s = time.perf_counter() - begin
    after = eager_forward_seconds(session.model, session.task.clean_input_ids, repeats=2, warm_up=False)
    forward_s = statistics.median(session.forward_samples + after)
    n = max(len(values), 1)
    setup_s = session.setup_s
    wall_s = (time.perf_counter() - started) if started is not None else setup_s + scoring_s
    task = session.task
    layout = eap_layout(edges)
    return EdgeScores(
        scores=tuple(
            EdgeScore(edges.senders[s].name, r.name, values[(row, s)]) for row, r in enumerate(edges.receivers) for s in r.senders
        ),
        metric=session.metric.value,
        full_model=full,
        model=session.identity,
        task={
            "name": task.name,
            "fingerprint": task.fingerprint(),
            "examples": task.n_examples,
            "seq_len": task.clean_input_ids.shape[1],
        },
        stats=ScoreStats(
            wall_s, setup_s, scoring_s, forward_s, scoring_s / n / forward_s, passes, peak_memory_mb(runtime.device)
        ),
        eap_config=None if layout is None else layout.cfg,
        eap_groups=None if layout is None else layout.groups,
    )


class ExactRun(NamedTuple):
    """What :func:`exact_scores` measured: the full model's metric, scores by (receiver row, sender), passes run,
    and the seconds each receiver's queries took (the full-model pass before them not included)."""

    full_model: float
    values: dict[tuple[int, int], float]
    passes: int
    seconds: dict[int, float]


@torch.no_grad()
def exact_scores(
    runtime: PatchingRuntime, edges: EdgeGraph, *, progress: bool = True, batch: bool = True, receivers: list[int] | None = None
) -> ExactRun:
    """Scores of the edges into ``receivers`` (rows; default all). Every query starts from the full-model state
    (every step running, FP32) and is rolled back; a receiver's edges go in candidate batches sized to the runtime's
    memory budget (one query at a time without ``batch``, or where the runtime cannot batch)."""
    from tqdm.auto import tqdm

    runtime.reset()
    full = runtime.run_from(0)
    rows = list(range(len(edges.receivers))) if receivers is None else receivers
    batched = batch and runtime.batches_candidates()
    budget = candidate_memory(runtime.device)
    work = [len(r.senders) * runtime.index.cone_steps(row) for row, r in enumerate(edges.receivers)]  # the bar's share
    bar = tqdm(
        total=sum(work[row] for row in rows),
        disable=not progress,
        unit="work",
        desc="scores",
        bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]",
    )
    values: dict[tuple[int, int], float] = {}
    seconds: dict[int, float] = {}
    passes = 0
    try:
        for done, row in enumerate(rows, 1):
            start = time.perf_counter()
            senders = list(edges.receivers[row].senders)
            size = max(1, budget // max(runtime.candidate_bytes(row), 1)) if batched else 1
            for first in range(0, len(senders), size):
                chunk = senders[first : first + size]
                metrics = runtime.try_remove_each(row, chunk, [False] * len(chunk))
                runtime.rollback()
                passes += 1
                for s, m in zip(chunk, metrics, strict=True):
                    values[(row, s)] = m - full
            seconds[row] = time.perf_counter() - start
            bar.set_postfix(receivers=f"{done}/{len(rows)}", edges=len(values), refresh=False)
            bar.update(work[row])
    finally:
        bar.close()
        runtime.reset()
    return ExactRun(full, values, passes, seconds)
