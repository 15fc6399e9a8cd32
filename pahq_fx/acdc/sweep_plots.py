"""The plots researchers read a sweep by (matplotlib, PNG): circuit size against threshold, faithfulness against
circuit size, and the ROC curve(s) with their AUC."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_bytes
from .roc import roc_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .sweep import Sweep


def plot_sweep(result: Sweep, folder: str | Path) -> list[Path]:
    """Write ``edges_vs_threshold.png``, ``faithfulness_vs_edges.png`` and (with a reference) ``roc.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sweeps = [result] if result.fp32 is None else [result, result.fp32]
    written = [
        _save(folder / "edges_vs_threshold.png", lambda axes: _edges_vs_threshold(axes, sweeps)),
        _save(folder / "faithfulness_vs_edges.png", lambda axes: _faithfulness_vs_edges(axes, sweeps)),
    ]
    if result.auc is not None:
        written.append(_save(folder / "roc.png", lambda axes: _roc(axes, sweeps, result.reference_name), square=True))
    return written


def _save(path: Path, draw: Callable[[Axes], None], square: bool = False) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8, 4.4) if square else (5.6, 3.8))
    axes = figure.add_subplot()
    draw(axes)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=150)
    return write_bytes(path, picture.getvalue())


def _label(s: Sweep) -> str:
    return s.precision


def _edges_vs_threshold(axes: Axes, sweeps: list[Sweep]) -> None:
    for s in sweeps:
        thresholds = [p.threshold for p in s.points]
        axes.plot(thresholds, [len(p.circuit.edges) for p in s.points], marker="o", label=_label(s))
    if all(p.threshold > 0 for s in sweeps for p in s.points):
        axes.set_xscale("log")
    total = sweeps[0].points[0].circuit.total_edges
    axes.set(xlabel="threshold", ylabel=f"edges kept (of {total})", title="circuit size")
    axes.legend(fontsize=8)


def _faithfulness_vs_edges(axes: Axes, sweeps: list[Sweep]) -> None:
    for s in sweeps:
        points = sorted(s.points, key=lambda p: len(p.circuit.edges))
        axes.plot(
            [len(p.circuit.edges) for p in points], [p.faithfulness.normalised for p in points], marker="o", label=_label(s)
        )
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    axes.set(
        xlabel="edges kept",
        ylabel="normalised faithfulness",
        title=f"faithfulness ({sweeps[0].metric}; 1 = full model, 0 = empty)",
    )
    axes.legend(fontsize=8)


def _roc(axes: Axes, sweeps: list[Sweep], reference: str) -> None:
    for s in sweeps:
        if s.auc is None:
            continue
        rocs = [p.roc for p in s.points if p.roc is not None]  # every point's, where the sweep has an AUC
        curve = roc_curve(rocs)
        axes.step([x for x, _ in curve], [y for _, y in curve], where="post", label=f"{_label(s)} (AUC {s.auc:.3f})")
        axes.plot(
            [r.false_positive_rate for r in rocs],
            [r.true_positive_rate for r in rocs],
            "o",
            markersize=3,
            color=axes.lines[-1].get_color(),
        )
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title="edge ROC")
    axes.text(0.98, 0.02, f"reference: {reference}", ha="right", va="bottom", fontsize=6.5, transform=axes.transAxes, wrap=True)
    axes.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.08))
