"""MIB's faithfulness curves and their areas, CPR and CMD (the definitions: docs/acdc.md, "Faithfulness curves").

From edge scores: at each of MIB's edge fractions the top ``int(fraction * edges)`` edges by score form a circuit,
pruned as MIB prunes it (nodes without an incoming or an outgoing edge go, with their edges, until nothing
changes); the circuit is evaluated exactly (every edge outside it patched) and normalised,
``(m(C) - m(empty)) / (m(full) - m(empty))``. CPR is the trapezoid area under that curve over the fraction axis
with edges ranked by signed score; CMD the trapezoid area between the curve and 1, ``|1 - f|``, with edges ranked
by absolute score (MIB reports CPR from signed rankings and CMD from absolute ones).
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import write_bytes, write_text
from ..errors import PahqError
from ..metrics import Metric
from .eap_graph import check_cfg, group, layout_of
from .edges import EdgeGraph
from .evaluation import Faithfulness, evaluate_edge_sets
from .runtime import PatchingRuntime
from .scores import EAP_FILE, EdgeScores, scores_of_session
from .search import prepare
from .task import Task

# MIB's edge fractions: 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50 and 100 % of the graph's edges.
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SIGNED, ABSOLUTE, ACDC = "signed", "absolute", "acdc"

Edge = tuple[str, str]


@dataclass(frozen=True)
class CurvePoint:
    """One circuit of a curve: ``requested`` edges at ``fraction``, ``edges`` of them left after pruning."""

    fraction: float
    requested: int
    edges: int
    metric: float
    faithfulness: float


def trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The trapezoid rule over consecutive points, on the x values as given (MIB's linear fraction axis)."""
    return sum((x2 - x1) * (y1 + y2) / 2 for x1, x2, y1, y2 in zip(xs, xs[1:], ys, ys[1:], strict=False))


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness at each edge fraction; ``ranking``: ``signed`` or ``absolute`` scores, or ``acdc`` (a sweep's
    circuits)."""

    ranking: str
    points: tuple[CurvePoint, ...]

    @property
    def area_under(self) -> float:
        """CPR: the area under the curve."""
        return trapezoid([p.fraction for p in self.points], [p.faithfulness for p in self.points])

    @property
    def area_from_one(self) -> float:
        """CMD: the area between the curve and 1."""
        return trapezoid([p.fraction for p in self.points], [abs(1 - p.faithfulness) for p in self.points])

    def to_json(self) -> dict[str, Any]:
        return {
            "ranking": self.ranking,
            "area_under": self.area_under,
            "area_from_1": self.area_from_one,
            "points": [asdict(p) for p in self.points],
        }


@dataclass(frozen=True)
class MibResult:
    """CPR (``signed`` curve) and CMD (``absolute`` curve) of one set of edge scores, or both from one ``acdc``
    curve, with the metric of the full and the empty model the curves are normalised by."""

    metric: str
    full_model: float
    empty_circuit: float
    total_edges: int
    curves: tuple[FaithfulnessCurve, ...]
    source: str = ""

    def curve(self, ranking: str) -> FaithfulnessCurve:
        return next(c for c in self.curves if c.ranking == ranking)

    @property
    def cpr(self) -> float:
        return self.curve(ACDC if len(self.curves) == 1 else SIGNED).area_under

    @property
    def cmd(self) -> float:
        return self.curve(ACDC if len(self.curves) == 1 else ABSOLUTE).area_from_one

    def describe(self) -> str:
        return (
            f"CPR {self.cpr:.4f} (higher is better), CMD {self.cmd:.4f} (lower is better); "
            f"metric {self.metric}, {self.total_edges} edges"
        )

    def table(self) -> str:
        """A Markdown table: per fraction and ranking, the edges requested and kept and the faithfulness."""
        header = [
            "edge fraction",
            "ranking",
            "edges requested",
            "edges after pruning",
            f"{self.metric} of circuit",
            "faithfulness",
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for curve in self.curves:
            for p in curve.points:
                cells = [f"{p.fraction * 100:g}%", curve.ranking, str(p.requested), str(p.edges)]
                lines.append("| " + " | ".join([*cells, f"{p.metric:.4g}", f"{p.faithfulness:.4f}"]) + " |")
        notes = [self.describe(), f"full model {self.full_model:.4g}, every edge patched {self.empty_circuit:.4g}"]
        if self.source:
            notes.append(f"scores: {self.source}")
        return "\n".join(lines) + "\n\n" + "; ".join(notes) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "full_model": self.full_model,
            "every_edge_patched": self.empty_circuit,
            "total_edges": self.total_edges,
            "source": self.source,
            "curves": [c.to_json() for c in self.curves],
        }

    def save(self, folder: str | Path) -> list[Path]:
        """``curve.md``, ``curve.json`` and ``curve.png`` (matplotlib, imported only here) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [write_text(folder / "curve.md", self.table())]
        written.append(write_text(folder / "curve.json", json.dumps(self.to_json(), indent=2) + "\n"))
        written.append(self.plot(folder / "curve.png"))
        return written

    def plot(self, path: str | Path) -> Path:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5.6, 3.8))
        axes = figure.add_subplot()
        for curve in self.curves:
            label = {SIGNED: f"signed scores (CPR {self.cpr:.3f})", ABSOLUTE: f"absolute scores (CMD {self.cmd:.3f})"}
            axes.plot(
                [p.fraction * 100 for p in curve.points],
                [p.faithfulness for p in curve.points],
                marker="o",
                label=label.get(curve.ranking, f"ACDC circuits (CPR {self.cpr:.3f}, CMD {self.cmd:.3f})"),
            )
        axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        axes.set_xscale("log")
        axes.set(
            xlabel="edges kept (% of the graph)", ylabel="normalised faithfulness", title=f"faithfulness curve ({self.metric})"
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        picture = io.BytesIO()
        figure.savefig(picture, format="png", dpi=150)
        return write_bytes(path, picture.getvalue())


def check_fractions(fractions: Sequence[float]) -> None:
    """MIB's edge fractions as a curve needs them: at least one, each in (0, 1], increasing (the trapezoid areas are
    taken in that order)."""
    values = list(fractions) if isinstance(fractions, Sequence) and not isinstance(fractions, str) else None
    if not values or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in values):
        raise PahqError(f"fractions must be a non-empty list of edge fractions in (0, 1], got {fractions!r:.80}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise PahqError(f"fractions must increase (the curve's areas are taken in that order), got {values!r:.80}")


def prune(edges: EdgeGraph, kept: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """MIB's pruning of a chosen edge set ((receiver row, sender) pairs): a node stays while it has an outgoing and an
    incoming edge (the embedding needs no incoming one, the final read is always there); edges from or into a node
    that went are removed; repeated until nothing changes."""
    feeds = [edges.feeding_senders(r) for r in edges.receivers]
    fed = {s for senders in feeds for s in senders}
    final = {i for i, r in enumerate(edges.receivers) if not feeds[i]}
    kept = set(kept)
    while True:
        outgoing = {s for _, s in kept}
        incoming = {s for row, _ in kept for s in feeds[row]}
        nodes = {s for s in outgoing if s in incoming or s not in fed}
        pruned = {(row, s) for row, s in kept if s in nodes and (row in final or any(x in nodes for x in feeds[row]))}
        if pruned == kept:
            return kept
        kept = pruned


def edge_rows(edges: EdgeGraph, scores: EdgeScores) -> dict[tuple[int, int], float]:
    """Scores by (receiver row, sender) of this graph; a score file must name exactly this graph's edges."""
    ours = {(edges.senders[s].name, r.name): (row, s) for row, r in enumerate(edges.receivers) for s in r.senders}
    given = scores.by_edge()
    if scores.mode == EAP_FILE:  # a key and a value input per head, as EAP-IG names them: summed onto the model's groups
        layout = layout_of(edges.head_graph)
        check_cfg(scores.eap_config or {}, layout, "the score file")
        given = group(given, layout, math.fsum)
    unknown, missing = sorted(set(given) - set(ours)), sorted(set(ours) - set(given))
    if unknown or missing:
        problem = f"{len(unknown)} edges this model lacks (first {unknown[:3]})" if unknown else ""
        if missing:
            problem += ("; " if problem else "") + f"no score for {len(missing)} of its edges (first {missing[:3]})"
        raise PahqError(f"the scores do not match this model's graph: {problem}")
    return {ours[edge]: value for edge, value in given.items()}


def top_circuits(
    edges: EdgeGraph, scores: dict[tuple[int, int], float], fractions: Iterable[float], absolute: bool
) -> list[tuple[float, int, set]]:
    """(fraction, requested, pruned edge set) per fraction: the top ``int(fraction * edges)`` edges by score (by
    magnitude with ``absolute``; ties in ACDC's visiting order), pruned."""
    ranked = sorted(scores, key=lambda e: -abs(scores[e]) if absolute else -scores[e])
    out = []
    for fraction in fractions:
        n = int(fraction * len(ranked))
        out.append((fraction, n, prune(edges, set(ranked[:n]))))
    return out


def mib_curves(
    runtime: PatchingRuntime,
    edges: EdgeGraph,
    scores: EdgeScores,
    fractions: Sequence[float] = MIB_FRACTIONS,
    source: str = "",
) -> MibResult:
    """The signed and the absolute curve of ``scores`` on this runtime (reset; FP32 evaluation), CPR and CMD."""
    by_row = edge_rows(edges, scores)
    plans = {ranking: top_circuits(edges, by_row, fractions, ranking == ABSOLUTE) for ranking in (SIGNED, ABSOLUTE)}
    named = [
        {(edges.senders[s].name, edges.receivers[row].name) for row, s in kept} for plan in plans.values() for _, _, kept in plan
    ]
    evaluated = evaluate_edge_sets(runtime, edges, named, circuit="the scored circuit")
    if not evaluated:
        raise PahqError("MIB's curves need at least one edge fraction")
    results = iter(evaluated)
    curves = []
    for ranking, plan in plans.items():
        points = []
        for fraction, requested, kept in plan:
            f = next(results)
            points.append(CurvePoint(fraction, requested, len(kept), f.circuit, f.normalised))
        curves.append(FaithfulnessCurve(ranking, tuple(points)))
    first = evaluated[0]  # every evaluation shares the full model's and the empty circuit's metric
    return MibResult(runtime.metric_kind.value, first.full_model, first.empty_circuit, len(by_row), tuple(curves), source)


def mib_evaluate(
    model: nn.Module,
    task: Task,
    scores: EdgeScores | None = None,
    *,
    metric: str | Metric | None = None,
    progress: bool = True,
    allow_weak_task: bool = False,
    fractions: Sequence[float] = MIB_FRACTIONS,
    source: str = "",
) -> tuple[MibResult, EdgeScores]:
    """MIB's curves, CPR and CMD for ``scores`` (default: exact edge scores computed here on the same runtime),
    evaluated under ``metric`` (default: the scores' own metric, ``kl`` for a file that names none)."""
    check_fractions(fractions)
    metric = metric or (scores.metric if scores is not None and scores.mode != EAP_FILE else "kl")
    session = prepare(model, task, metric=metric, precision="fp32", compile=False, allow_weak_task=allow_weak_task)
    if scores is None:
        scores = scores_of_session(session, progress=progress)
        source = source or f"exact edge scores ({scores.metric}), computed for this run"
    return mib_curves(session.runtime, session.edges, scores, fractions, source), scores


def acdc_curve(
    circuits: Sequence[tuple[int, Faithfulness]], total_edges: int, fractions: Sequence[float] = MIB_FRACTIONS
) -> MibResult:
    """The curve of ACDC circuits found at several thresholds, given as (edges, faithfulness): at each fraction, the
    largest circuit with at most ``int(fraction * total_edges)`` edges (the more faithful of circuits of one size),
    the empty circuit (faithfulness 0) where none fits, the full model (1) at 100%. CPR and CMD are that step
    curve's trapezoid areas on MIB's grid, so that they compare with the figures of methods that score edges."""
    if not circuits:
        raise PahqError("a faithfulness curve needs at least one circuit")
    first = circuits[0][1]
    full, empty = first.full_model, first.empty_circuit
    candidates = [(size, f.normalised, f.circuit) for size, f in circuits]
    points = []
    for fraction in fractions:
        n = int(fraction * total_edges)
        fits = [c for c in candidates if c[0] <= n] + [(0, 0.0, empty)] + ([(total_edges, 1.0, full)] if n >= total_edges else [])
        size, normalised, value = max(fits, key=lambda c: (c[0], c[1]))
        points.append(CurvePoint(fraction, n, size, value, normalised))
    return MibResult(first.metric, full, empty, total_edges, (FaithfulnessCurve(ACDC, tuple(points)),))
