"""Precision plans and the low-precision lowering of per-head projections through torchao.

A :class:`PrecisionConfig` names the low-precision format (a registered :class:`~pahq_fx.formats.Format`: ``fp8`` =
FP8 e4m3, ``fp8_e5m2``, ``bf16``, ``fp16`` or ``fp32`` for none) and the FP8 scaling granularity.
:func:`lower_precision` swaps every :class:`~pahq_fx.ir.modules.PerHeadLinear` of a split model for a
:class:`LowPrecisionPerHeadLinear`, which runs all heads in the low-precision format (the :class:`LoweredHeads`
its format made) and recomputes the one investigated head in FP32 (written over its slice with ``torch.where``, so
that slice is exactly the FP32 result). :func:`set_head` chooses that head by writing buffers: no retrace, no recompile.

FP8 uses torchao's ``Float8Tensor`` with real scaling (per row or per tensor), never an unscaled cast. With
dynamic activation quantization the matmul is an FP8 x FP8 ``torch._scaled_mm`` (emulated on CPU, FP8 tensor
cores on CUDA sm >= 8.9). On CUDA below sm 8.9, or where a head's dimensions are not multiples of 16 (the
CUDA kernel's requirement), the weight-only FP8 path is used instead, and the report says so.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..deprecated import renamed
from ..errors import InvalidHeadError, QuantizationError, UnsupportedFormatError
from ..formats import AUTO as AUTO  # re-exported: discover's callers and the planner name it from here
from ..formats import Cast, Float8, Format, Kernel, parse_format, register_lowering
from ..ir import graph_meta
from ..ir.modules import NO_HEAD, AttentionBlock, PerHeadLinear

HeadSpec = tuple[int, int] | None


class Granularity(enum.Enum):
    """FP8 scaling granularity: one scale per row (output feature / token) or per tensor."""

    PER_ROW = "per_row"
    PER_TENSOR = "per_tensor"


def parse_granularity(value: Granularity | str) -> Granularity:
    """The granularity named ``value`` (any case)."""
    if isinstance(value, Granularity):
        return value
    try:
        return Granularity(str(value).lower())
    except ValueError:
        raise UnsupportedFormatError(f"unknown granularity {value!r}; choose per_row or per_tensor") from None


@dataclass(frozen=True, init=False)
class PrecisionConfig:
    """What the non-investigated heads run in. Built from names or parsed values; the fields hold parsed values."""

    low_precision: Format
    granularity: Granularity

    def __init__(
        self, low_precision: Format | str = Format.FP8_E4M3, granularity: Granularity | str = Granularity.PER_ROW
    ) -> None:
        # a frozen dataclass sets its fields this way in its generated __init__ too; here the names are parsed first
        object.__setattr__(self, "low_precision", parse_format(low_precision))
        object.__setattr__(self, "granularity", parse_granularity(granularity))


# Lower bound on the amax that sets an FP8 scale: an all-zero row (a pruned or dead head, a zero input)
# would otherwise get scale 0 and turn into NaN.
AMAX_FLOOR = 1e-12


class LoweredHeads(nn.Module):
    """A projection's per-head weights ``[heads, out, in]`` in one low-precision format, and the matmuls that read
    them (no bias): what :meth:`~pahq_fx.formats.Format.lower` returns, so that the per-head linear never asks which
    kind of format it holds."""

    kernel: Kernel

    def quantized(self) -> int:
        """How many heads' weights really are in the format (the lowering's check)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every head on its own input: [..., heads, in] -> [..., heads, out]."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as :meth:`head` reads it, converted once for several heads."""
        return x

    def head(self, prepared: torch.Tensor, h: int, dtype: torch.dtype) -> torch.Tensor:
        """Head ``h`` on a :meth:`prepare` d input [..., in] -> [..., out] in ``dtype``."""
        raise NotImplementedError

    def stacks(self, units: list[int] | None) -> bool:
        """Whether the listed heads (``None``: all) can be one matmul on a shared input."""
        raise NotImplementedError

    def stacked(self, x: torch.Tensor, units: list[int] | None) -> torch.Tensor:
        """The listed heads (``None``: all) on one input [..., in] in one matmul: [..., len(units) * out]."""
        raise NotImplementedError


class CastHeads(LoweredHeads):
    """The weights cast to a dtype that torch multiplies in directly (bf16, fp16)."""

    kernel = Kernel.HALF
    low_weight: torch.Tensor  # a buffer

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("low_weight", weight.to(dtype))

    def quantized(self) -> int:
        return self.low_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hi,hoi->...ho", x.to(self.low_weight.dtype), self.low_weight).to(x.dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.low_weight.dtype)

    def head(self, prepared: torch.Tensor, h: int, dtype: torch.dtype) -> torch.Tensor:
        return F.linear(prepared, self.low_weight[h]).to(dtype)

    def stacks(self, units: list[int] | None) -> bool:
        return True  # any rows of ``low_weight``

    def stacked(self, x: torch.Tensor, units: list[int] | None) -> torch.Tensor:
        weight = self.low_weight if units is None else self.low_weight.index_select(0, torch.tensor(units, device=x.device))
        return F.linear(x.to(self.low_weight.dtype), weight.flatten(0, 1)).to(x.dtype)


class Float8Heads(LoweredHeads):
    """FP8 weights as torchao ``Float8Tensor`` s, each head's matmul one FP8 ``F.linear``.

    Heads that read one input (the forward's queries, keys and values) take one FP8 matmul over the stacked weights
    instead of one per head, each quantizing the same input again. With per-row scales every output feature keeps its
    own scale, so the weights are quantized once, stacked, and each head's are a slice of them (the same values as
    quantizing it alone); a per-tensor scale over all heads would differ from each head's own, so that granularity
    is quantized per head and has no stacked matmul."""

    def __init__(self, weight: torch.Tensor, fmt: Format, granularity: Granularity, kernel: Kernel) -> None:
        super().__init__()
        self.kernel = kernel
        n, out_features, _ = weight.shape
        self.stacked_weight: nn.Parameter | None = None
        if granularity is Granularity.PER_ROW:
            stacked = _float8_weight(weight.flatten(0, 1), fmt, granularity, kernel)
            self.stacked_weight = nn.Parameter(stacked, requires_grad=False)
            per_head = [stacked[h * out_features : (h + 1) * out_features] for h in range(n)]
        else:
            per_head = [_float8_weight(weight[h], fmt, granularity, kernel) for h in range(n)]
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in per_head)

    def quantized(self) -> int:
        from torchao.quantization import Float8Tensor

        return sum(isinstance(w, Float8Tensor) for w in self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.linear(x[..., h, :], w) for h, w in enumerate(self.weights)], dim=-2)

    def head(self, prepared: torch.Tensor, h: int, dtype: torch.dtype) -> torch.Tensor:
        return F.linear(prepared, self.weights[h])  # torchao returns the input's dtype

    def stacks(self, units: list[int] | None) -> bool:
        # a row selection of a Float8 tensor is not one: all heads, per-row scaled, or none
        return self.stacked_weight is not None and (units is None or units == list(range(len(self.weights))))

    def stacked(self, x: torch.Tensor, units: list[int] | None) -> torch.Tensor:
        assert self.stacked_weight is not None, "no stacked weights: callers ask stacks() first"
        return F.linear(x, self.stacked_weight)


def _float8_weight(weight: torch.Tensor, fmt: Format, granularity: Granularity, kernel: Kernel) -> torch.Tensor:
    # torchao's exported names only: its top-level package, and its quantize_ packages' __all__
    from torchao.quantization import Float8MMConfig, Float8Tensor, PerRow, PerTensor
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    scaling = PerRow() if granularity is Granularity.PER_ROW else PerTensor()
    mm_config = Float8MMConfig(use_fast_accum=True)
    preference = KernelPreference.TORCH if weight.device.type == "cpu" else KernelPreference.AUTO
    activation = None
    if kernel is Kernel.FP8_SCALED_MM:
        activation = QuantizeTensorToFloat8Kwargs(
            float8_dtype=fmt.dtype,
            granularity=scaling,
            mm_config=mm_config,
            kernel_preference=preference,
            hp_value_lb=AMAX_FLOOR,
        )
    return Float8Tensor.from_hp(
        weight.contiguous(),
        float8_dtype=fmt.dtype,
        granularity=scaling,
        mm_config=mm_config,
        act_quant_kwargs=activation,
        kernel_preference=preference,
        hp_value_lb=AMAX_FLOOR,
    )


def _lower_float8(fmt: Format, weight: torch.Tensor, granularity: Granularity) -> LoweredHeads:
    assert isinstance(fmt, Float8)
    _, out_features, in_features = weight.shape
    return Float8Heads(weight, fmt, granularity, fmt.kernel_for(weight.device, in_features, out_features))


register_lowering(Cast, lambda fmt, weight, granularity: CastHeads(weight, fmt.dtype))
register_lowering(Float8, _lower_float8)


class LowPrecisionPerHeadLinear(PerHeadLinear):
    """All heads in a low-precision format; the head named by ``full_precision_head`` recomputed in FP32."""

    head_ids: torch.Tensor  # a buffer

    def __init__(self, source: PerHeadLinear, config: PrecisionConfig) -> None:
        super().__init__(source.weight, source.bias)
        self.config = config
        self.exact = False
        self.register_buffer("head_ids", torch.arange(self.weight.shape[0], device=self.weight.device))
        self.lowered = config.low_precision.lower(self.weight.detach(), config.granularity)

    @property
    def kernel(self) -> Kernel:
        return self.lowered.kernel

    def low_precision(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lowered(x)
        return y if self.bias is None else y + self.bias

    def full_precision(self, x: torch.Tensor) -> torch.Tensor:
        """The FP32 result of the selected head alone: ``F.linear(x_h, W_h, b_h)``, shape [..., 1, out]."""
        index = self.full_precision_head.clamp(min=0).view(1)
        x_h = x.index_select(-2, index).squeeze(-2)
        w_h = self.weight.index_select(0, index).squeeze(0)
        b_h = None if self.bias is None else self.bias.index_select(0, index).squeeze(0)
        return F.linear(x_h, w_h, b_h).unsqueeze(-2)

    def units(
        self, x: torch.Tensor, units: list[int], full_precision_unit: int = NO_HEAD, shared_input: bool = False
    ) -> torch.Tensor:
        """The listed heads only, [..., len(units), in] -> [..., len(units), out] (with ``shared_input``, one input
        [..., in] that every listed head reads): ``full_precision_unit`` in FP32 (``F.linear``, the same computation
        as :meth:`full_precision`), every other listed head in the format."""
        if self.exact:
            return super().units(x, units, full_precision_unit, shared_input)
        if shared_input and len(units) > 1 and self.lowered.stacks(units):
            return self._shared_units(x, units, full_precision_unit)
        low = self.lowered.prepare(x)  # one conversion for every listed head
        columns = []
        for i, unit in enumerate(units):
            x_i, low_i = (x, low) if shared_input else (x[..., i, :], low[..., i, :])
            if unit == full_precision_unit:
                columns.append(self.fp32_unit(x_i, unit))
                continue
            y = self.lowered.head(low_i, unit, x.dtype)
            columns.append(y if self.bias is None else y + self.bias[unit])
        return torch.stack(columns, dim=-2)

    def _shared_units(self, x: torch.Tensor, units: list[int], full_precision_unit: int) -> torch.Tensor:
        """:meth:`units` of one input [..., in] that every listed unit reads, the low-precision ones in one matmul."""
        low = self.lowered.stacked(x, units).unflatten(-1, (len(units), -1))
        if self.bias is not None:
            low = low + self.bias.index_select(0, torch.tensor(units, device=self.weight.device))
        if full_precision_unit in units:
            low[..., units.index(full_precision_unit), :] = self.fp32_unit(x, full_precision_unit)
        return low

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Every head reading ``x`` [..., in]: in FP32 when exact, otherwise under the plan, as ``forward`` on copies
        of ``x``, with one low-precision matmul over the stacked weights where the format allows."""
        if self.exact:
            return super().shared(x)
        copies = x.unsqueeze(-2).expand(*x.shape[:-1], self.n_heads, x.shape[-1])
        if not self.lowered.stacks(None):
            return self(copies)
        low = self.lowered.stacked(x, None).unflatten(-1, (self.n_heads, -1))
        return self._under_plan(copies, low if self.bias is None else low + self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return super().forward(x)
        return self._under_plan(x, self.low_precision(x))

    def _under_plan(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Every head's ``low``-precision output, but the selected head's recomputed in FP32 from ``x`` [..., heads, in]."""
        selected = (self.head_ids == self.full_precision_head).unsqueeze(-1)
        return torch.where(selected, self.full_precision(x), low)

    def extra_repr(self) -> str:
        h, o, i = self.weight.shape
        return (
            f"heads={h}, in={i}, out={o}, format={self.config.low_precision.value}, "
            f"granularity={self.config.granularity.value}, kernel={self.kernel.name}"
        )


@dataclass(frozen=True)
class PrecisionReport:
    """What the lowering did: format, kernels used, how many per-head weights were quantized."""

    config: PrecisionConfig
    kernels: tuple[str, ...]
    quantized_weights: int
    total_weights: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        fmt = self.config.low_precision.value
        if not self.config.low_precision.quantizes:
            return f"{fmt} (no quantization)"
        kernels = "; ".join(self.kernels)
        text = (
            f"{fmt} {self.config.granularity.value}: {self.quantized_weights}/{self.total_weights} per-head weights via {kernels}"
        )
        return text + "".join(f"; {n}" for n in self.notes)


PROJECTIONS = ("q", "k", "v", "o")


def attention_blocks(gm: nn.Module) -> list[AttentionBlock]:
    blocks = [m for m in gm.modules() if isinstance(m, AttentionBlock)]
    return sorted(blocks, key=lambda b: b.layer)


@renamed("low_precision", "precision")
def lower_precision(
    gm: fx.GraphModule, precision: PrecisionConfig | str | Format = "fp8", granularity: str | Granularity = "per_row"
) -> fx.GraphModule:
    """Lower the per-head projections of a split model (in place) and return it.

    ``precision`` is a :class:`PrecisionConfig`, or a format with ``granularity`` beside it.
    Raises :class:`QuantizationError` if a format was asked for and not every per-head weight ended up in it.
    The result's ``meta["precision"]`` is a :class:`PrecisionReport`.
    """
    config = precision if isinstance(precision, PrecisionConfig) else PrecisionConfig(precision, granularity)
    graph_meta.structure(gm)  # a graph split_heads has not run on has no per-head projections to lower
    blocks = attention_blocks(gm)
    kernels: dict[str, None] = {}
    quantized = total = 0
    if config.low_precision.quantizes:
        for block in blocks:
            for name in PROJECTIONS:
                linear = getattr(block, name)
                source = PerHeadLinear(linear.weight, linear.bias) if isinstance(linear, LowPrecisionPerHeadLinear) else linear
                lowered = LowPrecisionPerHeadLinear(source, config)
                setattr(block, name, lowered)
                kernels[lowered.kernel.value] = None
                total += lowered.weight.shape[0]
                quantized += lowered.lowered.quantized()
        if quantized == 0 or quantized != total:
            raise QuantizationError(f"{config.low_precision.value} lowering quantized {quantized} of {total} per-head weights")
    notes: tuple[str, ...] = ()
    if Kernel.FP8_WEIGHT_ONLY.value in kernels:
        notes = ("dynamic FP8 needs CUDA sm >= 8.9 and dims that are multiples of 16; weight-only FP8 used where not",)
    gm.meta[graph_meta.PRECISION] = PrecisionReport(config, tuple(kernels), quantized, total, notes)
    return gm


@contextlib.contextmanager
def all_heads_fp32(gm: nn.Module) -> Iterator[None]:
    """Run every lowered projection in FP32 inside the block (for caches that must be exact)."""
    lowered = [m for m in gm.modules() if isinstance(m, LowPrecisionPerHeadLinear)]
    for m in lowered:
        m.exact = True
    try:
        yield
    finally:
        for m in lowered:
            m.exact = False


def check_head(gm: nn.Module, head: HeadSpec) -> None:
    """Raise :class:`InvalidHeadError` unless ``head`` is None or an existing (layer, head) pair."""
    if head is None:
        return
    blocks = attention_blocks(gm)
    if not (
        isinstance(head, tuple | list) and len(head) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in head)
    ):
        raise InvalidHeadError(f"head must be a (layer, head) pair of ints or None, got {head!r}")
    layer, index = head
    if not 0 <= layer < len(blocks):
        raise InvalidHeadError(f"layer {layer} out of range: the model has {len(blocks)} attention layers (0..{len(blocks) - 1})")
    n = blocks[layer].n_heads
    if not 0 <= index < n:
        raise InvalidHeadError(f"head {index} out of range: layer {layer} has {n} heads (0..{n - 1})")


@dataclass(frozen=True)
class FullPrecisionUnits:
    """Which units of one layer run in FP32: a query head (with its output) and a key/value group."""

    query_head: int = NO_HEAD
    kv_group: int = NO_HEAD


def set_plan(gm: nn.Module, plan: Callable[[AttentionBlock], FullPrecisionUnits]) -> None:
    """Write, for every attention block, which units run in FP32 (buffers only: no recompilation)."""
    with torch.no_grad():
        for block in attention_blocks(gm):
            units = plan(block)
            values = (units.query_head, units.kv_group, units.kv_group, units.query_head)
            for name, value in zip(PROJECTIONS, values, strict=True):
                getattr(block, name).full_precision_head.fill_(value)


def set_head(gm: nn.Module, head: HeadSpec) -> None:
    """Keep head ``(layer, head)`` (its query, its key/value group and its output) in FP32; ``None``: no head."""
    check_head(gm, head)

    def plan(block: AttentionBlock) -> FullPrecisionUnits:
        if head is None or block.layer != head[0]:
            return FullPrecisionUnits()
        return FullPrecisionUnits(head[1], block.kv_group_of_head[head[1]])

    set_plan(gm, plan)
