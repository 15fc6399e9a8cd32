"""Threshold sweeps: one setup (trace, split, caches) for every threshold, a circuit per threshold, its
faithfulness, and ROC/AUC against a reference circuit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import write_text
from ..errors import PahqError
from ..metrics import Metric
from ..passes.precision import AUTO, Format
from .circuit import Circuit
from .evaluation import Faithfulness, evaluate_edges
from .mib import MibResult, acdc_curve
from .roc import RocPoint, jaccard, roc_auc, roc_point
from .search import Session, prepare, resolve_storage, search
from .setup import check_threshold
from .storage import Storage
from .task import Task

Reference = Circuit | set[tuple[str, str]] | str | None
FP32_REFERENCE = "fp32"


@dataclass(frozen=True)
class SweepPoint:
    """One threshold of a sweep: the circuit found (with its faithfulness alone, FP32) and its ROC point."""

    threshold: float
    circuit: Circuit
    roc: RocPoint | None = None

    @property
    def faithfulness(self) -> Faithfulness:
        """The circuit's faithfulness: a sweep evaluates every circuit it finds."""
        return self.circuit.measured_faithfulness()

    def row(self) -> dict[str, Any]:
        c, f = self.circuit, self.faithfulness
        out = {
            "threshold": self.threshold,
            "edges": len(c.edges),
            "nodes": len(c.nodes),
            "queries": c.stats.queries,
            "search_s": round(c.stats.wall_s - c.stats.setup_s, 4),
            "metric_of_circuit": f.circuit,
            "normalised_faithfulness": f.normalised,
        }
        if self.roc is not None:
            out.update(tpr=self.roc.true_positive_rate, fpr=self.roc.false_positive_rate)
        return out


@dataclass(frozen=True)
class Sweep:
    """The circuits of one model and task across thresholds. ``reference_name`` says what ROC was scored against;
    with ``reference="fp32"`` the FP32 sweep is ``fp32`` and ``agreement`` the edge Jaccard per threshold."""

    precision: str
    metric: str
    points: tuple[SweepPoint, ...]
    setup_s: float
    reference_name: str = ""
    reference_edges: int = 0
    fp32: Sweep | None = None
    agreement: tuple[float, ...] = field(default_factory=tuple)

    @property
    def mib(self) -> MibResult:
        """MIB's CPR and CMD of the sweep's circuits as one step curve on MIB's edge fractions
        (:func:`~pahq_fx.acdc.mib.acdc_curve`)."""
        points = [(len(p.circuit.edges), p.faithfulness) for p in self.points]
        return acdc_curve(points, self.points[0].circuit.total_edges)

    @property
    def auc(self) -> float | None:
        rocs = [p.roc for p in self.points if p.roc is not None]
        return roc_auc(rocs) if rocs else None

    def table(self) -> str:
        """A Markdown table of the sweep (and of the FP32 reference sweep, side by side, where there is one)."""
        header = ["threshold", "edges", "nodes", "queries", "search s", f"{self.metric} of circuit", "faithfulness"]
        if self.reference_name:
            header += ["TPR", "FPR"]
        if self.fp32 is not None:
            header += ["FP32 edges", "Jaccard with FP32"]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for i, p in enumerate(self.points):
            r = p.row()
            cells = [
                repr(p.threshold),
                str(r["edges"]),
                str(r["nodes"]),
                str(r["queries"]),
                f"{r['search_s']:.3f}",
                f"{r['metric_of_circuit']:.4g}",
                f"{r['normalised_faithfulness']:.3f}",
            ]
            if self.reference_name:
                cells += [f"{r['tpr']:.3f}", f"{r['fpr']:.4f}"]
            if self.fp32 is not None:
                cells += [str(len(self.fp32.points[i].circuit.edges)), f"{self.agreement[i]:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"precision {self.precision}, metric {self.metric}, setup {self.setup_s:.2f} s once for all thresholds"]
        notes.append(f"MIB's CPR {self.mib.cpr:.4f}, CMD {self.mib.cmd:.4f} over these circuits")
        if self.auc is not None:
            notes.append(f"AUC {self.auc:.4f} against {self.reference_name} ({self.reference_edges} edges)")
        if self.fp32 is not None and self.fp32.auc is not None:
            notes.append(f"FP32 sweep AUC {self.fp32.auc:.4f}")
        return "\n".join(lines) + "\n\n" + "; ".join(notes) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "metric": self.metric,
            "setup_s": self.setup_s,
            "auc": self.auc,
            "mib": self.mib.to_json(),
            "reference": self.reference_name,
            "reference_edges": self.reference_edges,
            "points": [p.row() for p in self.points],
            "fp32": None if self.fp32 is None else self.fp32.to_json(),
            "agreement_jaccard": list(self.agreement),
        }

    def save(self, folder: str | Path) -> list[Path]:
        """``folder/tau=<t>/circuit.json`` per threshold (:func:`threshold_folder`), ``summary.md`` and
        ``summary.json``; returns what it wrote."""
        folder = Path(folder)
        names = [threshold_folder(p.threshold) for p in self.points]
        if len(set(names)) != len(names):
            raise PahqError(f"two thresholds of the sweep would share a folder: {sorted(names)}")
        written = []
        for name, p in zip(names, self.points, strict=True):
            target = folder / name / "circuit.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            p.circuit.save(target)
            written.append(target)
        write_text(folder / "summary.md", self.table())
        write_text(folder / "summary.json", json.dumps(self.to_json(), indent=2) + "\n")
        return [*written, folder / "summary.md", folder / "summary.json"]


def threshold_folder(threshold: float) -> str:
    """``tau=<t>``, ``t`` the shortest text that reads back as exactly this float (``repr``): distinct thresholds
    get distinct folders (``%g`` wrote 0.1 and 0.1000001 both as ``tau=0.1``)."""
    return f"tau={float(threshold)!r}"


def sweep(
    model: nn.Module,
    task: Task,
    thresholds: Sequence[float],
    *,
    metric: str | Metric = "kl",
    precision: str = AUTO,
    reference: Reference = None,
    granularity: str = "per_row",
    compile: bool | str = AUTO,
    progress: bool = True,
    allow_weak_task: bool = False,
    save_to: str | Path | None = None,
    storage: str | Storage = "fp32",
    receiver_inputs: str | None = None,
) -> Sweep:
    """ACDC at every threshold, from one setup: each circuit is the one ``discover`` finds at that threshold.

    ``reference``: a :class:`Circuit` or a set of (sender, receiver) edges to score ROC/AUC against, or ``"fp32"``:
    sweep again in FP32 (unless ``precision`` is FP32 already) and score both sweeps against the FP32 circuit at
    the lowest threshold, with the edge Jaccard between the two per threshold. ``save_to``: a folder where each
    circuit is written as ``tau=<t>/circuit.json`` as soon as its search ends (without its faithfulness, which
    :meth:`Sweep.save` adds), so that a sweep that dies keeps the thresholds it finished. ``storage`` and
    ``receiver_inputs``: see :func:`~pahq_fx.acdc.search.discover`; the ``"fp32"`` reference sweep stores in FP32,
    its receiver inputs as the sweep's.
    """
    values = sorted({check_threshold(t) for t in thresholds})
    if not values:
        raise PahqError("a sweep needs at least one threshold")
    stored, inputs, storage_note = resolve_storage(storage, receiver_inputs, model, task)
    session = prepare(
        model,
        task,
        metric=metric,
        precision=precision,
        granularity=granularity,
        compile=compile,
        allow_weak_task=allow_weak_task,
        storage=stored,
        receiver_inputs=inputs,
    )
    session.precision_note = "; ".join(n for n in (session.precision_note, storage_note) if n)
    circuits = _search_all(session, values, progress, None if save_to is None else Path(save_to))
    if reference != FP32_REFERENCE:
        return _result(session, circuits, *_reference_edges(reference))
    name = f"the FP32 circuit at threshold {values[0]:g}"
    if session.format is Format.FP32 and session.runtime.storage is Storage.FP32:
        return _result(session, circuits, circuits[0].edge_set(), name)
    fp32_session = prepare(
        model,
        task,
        metric=metric,
        precision=Format.FP32.value,
        granularity=granularity,
        compile=compile,
        allow_weak_task=True,
        receiver_inputs=inputs,
    )
    fp32_circuits = _search_all(fp32_session, values, progress)
    reference_edges = fp32_circuits[0].edge_set()
    agreement = tuple(jaccard(a.edge_set(), b.edge_set()) for a, b in zip(circuits, fp32_circuits, strict=True))
    return dataclasses.replace(
        _result(session, circuits, reference_edges, name),
        agreement=agreement,
        fp32=_result(fp32_session, fp32_circuits, reference_edges, name),
    )


def _search_all(session: Session, thresholds: Iterable[float], progress: bool, folder: Path | None = None) -> list[Circuit]:
    circuits = []
    for threshold in thresholds:
        session.runtime.reset()
        circuits.append(search(session, threshold, progress=progress))
        if folder is not None:
            target = folder / threshold_folder(threshold) / "circuit.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            circuits[-1].save(target)
    return circuits


def _reference_edges(reference: Reference) -> tuple[set[tuple[str, str]] | None, str]:
    if reference is None:
        return None, ""
    if isinstance(reference, Circuit):
        return reference.edge_set(), f"a {reference.precision} circuit at threshold {reference.threshold:g}"
    if isinstance(reference, str):
        path = Path(reference)
        if not path.is_file():
            raise PahqError(f"reference {reference!r} is neither 'fp32' nor a circuit file")
        loaded = Circuit.load(path)
        return loaded.edge_set(), f"{path} ({loaded.precision}, threshold {loaded.threshold:g})"
    return set(reference), "the given edge set"


def _result(session: Session, circuits: list[Circuit], reference: set[tuple[str, str]] | None, name: str) -> Sweep:
    """Faithfulness of every circuit (FP32, on the session's runtime) and its ROC point."""
    total = session.runtime.total_edges
    points = []
    for circuit in circuits:
        faithfulness = evaluate_edges(session.runtime, session.edges, circuit.edge_set())
        roc = None if reference is None else roc_point(circuit.edge_set(), reference, total)
        points.append(SweepPoint(circuit.threshold, dataclasses.replace(circuit, faithfulness=faithfulness), roc))
    return Sweep(
        session.format.value,
        session.metric.value,
        tuple(points),
        session.setup_s,
        name,
        0 if reference is None else len(reference),
    )
