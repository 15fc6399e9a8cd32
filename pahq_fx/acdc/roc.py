"""Edge-level ROC against a reference circuit, as the ACDC paper scores circuit discovery.

Positives are the reference's edges, negatives every other edge of the model's graph (the full edge set, not only
the edges some run tested). A circuit found at one threshold is one point (false positive rate, true positive
rate). Circuits of different thresholds need not be nested, so the points need not lie on a monotone curve; as in
the ACDC paper's code, the curve is the pessimistic staircase from (0, 0): at each false positive rate, the best
true positive rate reached at or below it, with no interpolation between points, and the area is under that
staircase up to a false positive rate of 1.
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
        raise ValueError(
            f"a reference of {len(reference)} of {total_edges} edges has no positives or no negatives to score against"
        )
    if len(found | reference) > total_edges:
        raise ValueError(f"{len(found | reference)} distinct edges named, but the graph has {total_edges}")
    return RocPoint(len(found & reference) / len(reference), len(found - reference) / negatives)


def roc_curve(points: Iterable[RocPoint]) -> list[tuple[float, float]]:
    """The staircase's corners (FPR, TPR), from (0, 0) to FPR 1: draw it with steps taken after each corner."""
    corners = [(0.0, 0.0)]
    for fpr, tpr in sorted((p.false_positive_rate, p.true_positive_rate) for p in points):
        if tpr > corners[-1][1]:
            corners.append((fpr, tpr) if fpr > corners[-1][0] else (corners.pop()[0], tpr))
    if corners[-1][0] < 1.0:
        corners.append((1.0, corners[-1][1]))
    return corners


def roc_auc(points: Iterable[RocPoint]) -> float:
    """Area under :func:`roc_curve`'s staircase (each TPR holds from its corner to the next)."""
    return sum((x1 - x0) * y0 for (x0, y0), (x1, _) in itertools.pairwise(roc_curve(points)))


def jaccard(a: Iterable[Edge], b: Iterable[Edge]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0
