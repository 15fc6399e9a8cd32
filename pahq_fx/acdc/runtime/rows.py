"""The rows a query's change can reach. Where a query changes nothing (in a task whose clean and corrupted prompts
share a prefix, every position before the first difference), a causal model's later components compute what they
computed before, so the per-token work of its cone (projections, MLPs) runs on the reached rows only."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..row_batch import RowBatch


@dataclass(frozen=True)
class ReachedRows:
    """Rows of the flattened [..., batch * seq] stream at or after a changed position of their sequence: causal
    attention carries a change at position t to positions t and later only, every other component acts per token."""

    index: torch.Tensor  # sorted
    batch: RowBatch  # the rows packed as a batch the traced graph takes

    @classmethod
    def of(cls, changed: list[torch.Tensor], packed_seq: int) -> ReachedRows | None:
        """The rows reached from ``changed`` ([..., B, T] masks, True where a change is nonzero); None where that is
        every row (or none: a change of zero, which the full pass handles as any other)."""
        mask = functools.reduce(torch.logical_or, changed)
        reached = mask.cumsum(-1) > 0
        index = reached.flatten().nonzero().flatten()
        if index.numel() in (0, reached.numel()):
            return None
        return cls(index, RowBatch(index.numel(), packed_seq))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The reached rows of ``x`` [B, T, ...], as [rows, ...]."""
        return x.flatten(0, 1).index_select(0, self.index)
