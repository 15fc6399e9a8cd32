"""How the patching runtime stores its stream-sized caches and sender outputs: FP32, bf16, or FP8 (e4m3) with one
FP32 scale per row. Lower storage is what lets the state of a large model fit (docs/runtime.md, "Memory").

The runtime computes in FP32 (or in the precision plan's formats) and rounds a sender's output when it stores it;
it reads stored values back as FP32. Every change it propagates is a difference of two *stored* values
(``load(store(new)) - load(old)``), so a receiver's FP32 input is the exact sum of stored terms and rounding never
accumulates over a search's commits: the state is always the patched pass in which every sender's output is rounded
to the storage format, whatever the order of the removals. Inputs, projections and the final read stay FP32: they
are summed into or overwritten in place, and rounding them would drift (a stored input still equal to its step's
clean read is that read, below).

Each step's clean read, the base every receiver's input is built on, is held in :func:`read_storage`'s format, and
setup computes the clean and corrupted runs from the rounded reads: a step that starts running with nothing removed
then gives its stored clean outputs again, bit for bit, so the state stays the patched pass of one model (the one
whose reads are rounded). FP8 storage holds its reads in bf16: FP8's 4 significant bits on the whole stream would
move the runs themselves, where bf16 moves them as bf16 storage moves each sender's output.
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

    def replace_rows(self, stored: Stored, index: torch.Tensor, rows: Stored, copies: int | None) -> Stored:
        """A stored [B, T, d] tensor with rows ``index`` (of its B * T) replaced by the stored rows [len(index), d]; with
        ``copies``, the stored tensor repeated that many times first ([copies, B, T, d], rows of copies * B * T). Stored
        values are never read back and stored again: every other row keeps its stored bits."""
        ...


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.flatten(-3, -2).index_select(-2, index)


def _put_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, copies: int | None) -> torch.Tensor:
    """:meth:`Codec.replace_rows` on one tensor [B, T, c] (FP8 as its bytes: index_copy has no FP8 kernel)."""
    raw = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x
    flat = raw.flatten(0, 1)
    flat = flat.repeat(copies, 1) if copies else flat.clone()
    flat.index_copy_(0, index, rows.view(raw.dtype) if rows.dtype != raw.dtype else rows)
    out = flat.view(-1, *x.shape) if copies else flat.view(x.shape)
    return out.view(x.dtype)


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

    def replace_rows(self, stored: Stored, index: torch.Tensor, rows: Stored, copies: int | None) -> Stored:
        assert isinstance(stored, torch.Tensor) and isinstance(rows, torch.Tensor)
        return _put_rows(stored, index, rows, copies)


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

    def replace_rows(self, stored: Stored, index: torch.Tensor, rows: Stored, copies: int | None) -> Stored:
        assert isinstance(stored, ScaledFp8) and isinstance(rows, ScaledFp8)
        return ScaledFp8(_put_rows(stored.data, index, rows.data, copies), _put_rows(stored.scale, index, rows.scale, copies))


CODECS: dict[Storage, Codec] = {
    Storage.FP32: _Identity(),
    Storage.BF16: _Cast(torch.bfloat16),
    Storage.FP8: _RowScaledFp8(),
}


def codec(storage: Storage) -> Codec:
    return CODECS[storage]


READ_STORAGE: dict[Storage, Storage] = {Storage.FP32: Storage.FP32, Storage.BF16: Storage.BF16, Storage.FP8: Storage.BF16}


def read_storage(storage: Storage) -> Storage:
    """The format the clean reads are held in when senders are stored in ``storage`` (module docstring)."""
    return READ_STORAGE[storage]
