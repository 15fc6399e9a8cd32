"""A query's tentative values and its senders' changes: what the cascade computes before a commit or rollback."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

import torch

from ...passes.precision import FullPrecisionUnits
from ..storage import Stored


def add_terms(x: torch.Tensor | int, terms: Iterable[torch.Tensor], subtract: bool = False) -> torch.Tensor:
    """``x + t0 + t1 + ...`` (with ``subtract``, ``x - t0 - t1 - ...``), left to right, bit for bit what Python's
    operators give, with neither ``x`` nor a term modified: after the first operation the running sum is a tensor of
    its own, and a later term of its shape and dtype goes into it in place, which spares an allocation and a pass
    over memory per term (a dense query adds hundreds of deltas to receiver inputs). ``add_terms(0, terms)`` is
    Python's ``sum(terms)``. Differentiable too: an addition keeps nothing for its backward pass, so adding into the
    running sum in place leaves the gradients as they are (the attribution pass sums its reads with it)."""
    total, owned = x, False
    for t in terms:
        if owned and isinstance(total, torch.Tensor) and t.shape == total.shape and t.dtype == total.dtype:
            total.sub_(t) if subtract else total.add_(t)
        else:
            total, owned = (total - t if subtract else total + t), True
    return cast(torch.Tensor, total)


@dataclass
class Pending:
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


class Deltas:
    """Output changes of one query's recomputed senders (``new - state``), and of the heads of each attention step
    together: a receiver that every recomputed head of a step reaches (every later receiver, in a dense circuit)
    adds their summed change once, computed once per query, instead of one change per head.

    A head's change is computed from its stored new and old outputs when it is first needed, and kept only where a
    receiver adds it alone: a dense query then holds one summed change per layer, not one change per head (on a
    large model, most of what a query holds). With ``keep_heads=False`` (receiver inputs recomputed: a sparse query
    could otherwise keep one change per head of its cone) it is computed again, bit for bit, each time it is added."""

    def __init__(self, change: Callable[[int], torch.Tensor], keep_heads: bool = True) -> None:
        self._change = change  # sender -> its change, from the stored outputs
        self._keep_heads = keep_heads
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

    @property
    def held(self) -> list[int]:
        """The senders whose own change is held: a dense query holds none of its heads' (a memory figure)."""
        return [s for s, change in self._changes.items() if change is not None]

    def __iter__(self) -> Iterator[int]:
        return iter(self._changes)

    def change(self, sender: int) -> torch.Tensor:
        """One sender's change, kept once computed (a head's, where heads' changes are kept)."""
        change = self._changes[sender]
        if change is None:
            change = self._change(sender)
            if self._keep_heads:
                self._changes[sender] = change
        return change

    def terms(self, reaching: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(a sender standing for the term, change) for each term a receiver reached by ``reaching`` adds, in
        ``reaching``'s order, one at a time: a step's summed change where all of its recomputed heads reach, single
        changes otherwise."""
        reached, done = set(reaching), set()
        for s in reaching:
            step = self._group_of.get(s)
            if step is None:
                yield s, self.change(s)
            elif step not in done and reached.issuperset(self._groups[step]):
                done.add(step)
                yield s, self._sum(step)
            elif step not in done:
                yield s, self.change(s)

    def _sum(self, step: int) -> torch.Tensor:
        """The step's heads' summed change; a head's change not kept already is computed for the sum and dropped."""
        if step not in self._sums:
            kept = self._changes
            parts = (c if (c := kept[s]) is not None else self._change(s) for s in self._groups[step])
            self._sums[step] = add_terms(next(parts), parts)
        return self._sums[step]
