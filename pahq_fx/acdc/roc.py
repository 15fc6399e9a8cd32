"""Edge-level ROC against a reference circuit, as the ACDC paper scores circuit discovery.

Positives are the reference's edges, negatives every other edge of the model's graph (the full edge set, not only
the edges some run tested). A circuit found at one threshold is one point (false positive rate, true positive
rate); a sweep of thresholds traces the curve, closed by (0, 0) and (1, 1), and its area is by the trapezoid rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

Edge = tuple[str, str]


@dataclass(frozen=True)
class RocPoint:
    true_positive_rate: float
    false_positive_rate: float


def roc_point(found: Iterable[Edge], reference: Iterable[Edge], total_edges: int) -> RocPoint:
    """TPR = |found & reference| / |reference|, FPR = |found - reference| / (total_edges - |reference|)."""
    found, reference = set(found), set(reference)
    negatives = total_edges - len(reference)
    if not reference or negatives <= 0:
        raise ValueError(f"a reference of {len(reference)} of {total_edges} edges has no positives or no negatives to score against")
    if len(found | reference) > total_edges:
        raise ValueError(f"{len(found | reference)} distinct edges named, but the graph has {total_edges}")
    return RocPoint(len(found & reference) / len(reference), len(found - reference) / negatives)


def roc_curve(points: Iterable[RocPoint]) -> list[tuple[float, float]]:
    """(FPR, TPR) pairs of ``points`` with the corners (0, 0) and (1, 1), sorted: the curve to draw and integrate."""
    return sorted({(0.0, 0.0), (1.0, 1.0), *((p.false_positive_rate, p.true_positive_rate) for p in points)})


def roc_auc(points: Iterable[RocPoint]) -> float:
    """Area under :func:`roc_curve`, by the trapezoid rule."""
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(roc_curve(points)))


def jaccard(a: Iterable[Edge], b: Iterable[Edge]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0
