"""The metric's rows as a batch the traced graph accepts, so that token-wise components run on those rows alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowBatch:
    """``rows`` stream rows ([rows, d]) laid out as a [batch, seq, d] input of the traced graph.

    Where the trace kept the sequence length dynamic, each row is a sequence of one token. Where it fixed the
    length (ACDC traces with a dynamic batch only), rows are packed into sequences of that length and the last
    sequence is padded with copies of the last row: a token-wise component maps each row on its own, so the
    padding's outputs are simply dropped, and a copy of a real row is an input the component is known to take.
    """

    rows: int
    seq: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.seq < 1:
            raise ValueError(f"a row batch needs at least one row and one position, got rows={self.rows}, seq={self.seq}")

    @classmethod
    def for_trace(cls, rows: int, dynamic_dims: tuple[int, ...], traced_seq: int) -> RowBatch:
        return cls(rows, 1 if 1 in dynamic_dims else traced_seq)

    @property
    def shape(self) -> tuple[int, int]:
        """The [batch, seq] of the packed input."""
        return -(-self.rows // self.seq), self.seq

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, d] -> [batch, seq, d]."""
        batch, seq = self.shape
        padding = batch * seq - self.rows
        if padding:
            x = torch.cat([x, x[-1:].expand(padding, -1)])
        return x.view(batch, seq, -1)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> [rows, ...]: the packed rows' outputs, padding dropped."""
        return y.flatten(0, 1)[: self.rows]
