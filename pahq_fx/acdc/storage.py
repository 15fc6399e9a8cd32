"""How the patching runtime stores its stream-sized caches and sender outputs: FP32, bf16, or FP8 (e4m3) with one
FP32 scale per row. Lower storage is what lets the state of a large model fit (docs/runtime.md, "Memory").

The runtime computes in FP32 (or in the precision plan's formats) and rounds a sender's output when it stores it;
it reads stored values back as FP32. Every change it propagates is a difference of two *stored* values
(``load(store(new)) - load(old)``), so a receiver's FP32 input is the exact sum of stored terms and rounding never
accumulates over a search's commits: the state is always the patched pass in which every sender's output is rounded
to the storage format, whatever the order of the removals. Inputs, projections, clean reads and the final read stay
FP32: they are summed into or overwritten in place, and rounding them would drift.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import PahqError

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


class Storage(enum.Enum):
    """The element format of stored caches and sender outputs."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"

    @classmethod
    def parse(cls, value: str | Storage) -> Storage:
        try:
            return value if isinstance(value, Storage) else cls(str(value).lower())
        except ValueError:
            raise PahqError(f"unknown state storage {value!r}; choose one of {', '.join(s.value for s in cls)}") from None


@dataclass(frozen=True)
class ScaledFp8:
    """An FP8 (e4m3) tensor with one FP32 scale per row of its last dimension: ``value = data * scale``."""

    data: torch.Tensor
    scale: torch.Tensor


Stored = torch.Tensor | ScaledFp8


class Codec(Protocol):
    """Stores FP32 tensors in one format and reads them back."""

    def store(self, x: torch.Tensor) -> Stored: ...

    def load(self, stored: Stored) -> torch.Tensor: ...

    def select_rows(self, stored: Stored, index: torch.Tensor) -> Stored:
        """Rows ``index`` of a stored [..., B, T, d] tensor as [..., rows, d], without reading it back."""
        ...

    def tensors(self, stored: Stored) -> tuple[torch.Tensor, ...]:
        """The tensors that hold ``stored`` (to count bytes)."""
        ...


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.flatten(-3, -2).index_select(-2, index)


class _Identity:
    """FP32: stored as is, so a run with FP32 storage is the exact runtime, bit for bit."""

    def store(self, x: torch.Tensor) -> Stored:
        return x

    def load(self, stored: Stored) -> torch.Tensor:
        assert isinstance(stored, torch.Tensor)
        return stored

    def select_rows(self, stored: Stored, index: torch.Tensor) -> Stored:
        assert isinstance(stored, torch.Tensor)
        return _rows(stored, index)

    def tensors(self, stored: Stored) -> tuple[torch.Tensor, ...]:
        assert isinstance(stored, torch.Tensor)
        return (stored,)


class _Cast(_Identity):
    """A narrower floating-point dtype (bf16: FP32's range, 8 significant bits)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def store(self, x: torch.Tensor) -> Stored:
        return x.to(self.dtype)

    def load(self, stored: Stored) -> torch.Tensor:
        assert isinstance(stored, torch.Tensor)
        return stored.float()


class _RowScaledFp8:
    """FP8 e4m3 with a per-row scale (the row's largest magnitude maps to e4m3's largest value), as torchao scales
    activations per row: 4 significant bits relative to each row's largest element."""

    def store(self, x: torch.Tensor) -> Stored:
        amax = x.abs().amax(dim=-1, keepdim=True).float()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return ScaledFp8((x / scale).to(torch.float8_e4m3fn), scale)

    def load(self, stored: Stored) -> torch.Tensor:
        assert isinstance(stored, ScaledFp8)
        return stored.data.float() * stored.scale

    def select_rows(self, stored: Stored, index: torch.Tensor) -> Stored:
        assert isinstance(stored, ScaledFp8)
        data = _rows(stored.data.view(torch.uint8), index).view(torch.float8_e4m3fn)  # index_select on the bytes
        return ScaledFp8(data, _rows(stored.scale, index))

    def tensors(self, stored: Stored) -> tuple[torch.Tensor, ...]:
        assert isinstance(stored, ScaledFp8)
        return (stored.data, stored.scale)


CODECS: dict[Storage, Codec] = {
    Storage.FP32: _Identity(),
    Storage.BF16: _Cast(torch.bfloat16),
    Storage.FP8: _RowScaledFp8(),
}


def codec(storage: Storage) -> Codec:
    return CODECS[storage]
