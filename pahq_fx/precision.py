"""Precision plans and the low-precision lowering of per-head projections through torchao.

A :class:`PrecisionConfig` names the low-precision format (``fp8`` = FP8 e4m3, ``fp8_e5m2``, ``bf16``,
``fp16`` or ``fp32`` for none) and the FP8 scaling granularity. :func:`lower_precision` swaps every
:class:`~pahq_fx.split.PerHeadLinear` of a split model for a :class:`LowPrecisionPerHeadLinear`, which
runs all heads in the low-precision format and recomputes the one investigated head in FP32 (written over
its slice with ``torch.where``, so that slice is exactly the FP32 result). :func:`set_head` chooses that head
by writing buffers: no retrace, no recompile.

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

from . import graph_meta
from .errors import InvalidHeadError, QuantizationError, UnsupportedFormatError
from .split import NO_HEAD, AttentionBlock, PerHeadLinear

HeadSpec = tuple[int, int] | None


class Format(enum.Enum):
    """Numeric format of the heads that are not under investigation."""

    FP32 = "fp32"
    FP8_E4M3 = "fp8"
    FP8_E5M2 = "fp8_e5m2"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def is_fp8(self) -> bool:
        return self in (Format.FP8_E4M3, Format.FP8_E5M2)

    @property
    def dtype(self) -> torch.dtype:
        return {
            Format.FP32: torch.float32,
            Format.FP8_E4M3: torch.float8_e4m3fn,
            Format.FP8_E5M2: torch.float8_e5m2,
            Format.BF16: torch.bfloat16,
            Format.FP16: torch.float16,
        }[self]


_ALIASES = {"fp8_e4m3": Format.FP8_E4M3, "e4m3": Format.FP8_E4M3, "e5m2": Format.FP8_E5M2}


class Granularity(enum.Enum):
    """FP8 scaling granularity: one scale per row (output feature / token) or per tensor."""

    PER_ROW = "per_row"
    PER_TENSOR = "per_tensor"


class Kernel(enum.Enum):
    """How the low-precision matmul actually runs; shown in reprs and reports."""

    HALF = "half-precision matmul"
    FP8_SCALED_MM = "torchao Float8Tensor, dynamic FP8 activations, FP8 x FP8 torch._scaled_mm"
    FP8_WEIGHT_ONLY = "torchao Float8Tensor weight-only (FP8 weights dequantized, FP32 activations)"


AUTO = "auto"


def parse_format(value: str | Format) -> Format:
    if isinstance(value, Format):
        return value
    key = str(value).lower()
    if key in _ALIASES:
        return _ALIASES[key]
    try:
        return Format(key)
    except ValueError:
        names = ", ".join(f.value for f in Format)
        raise UnsupportedFormatError(f"unknown low-precision format {value!r}; choose one of {names}") from None


@dataclass(frozen=True)
class PrecisionConfig:
    """What the non-investigated heads run in. Validated and normalised on construction."""

    low_precision: Format | str = Format.FP8_E4M3
    granularity: Granularity | str = Granularity.PER_ROW

    def __post_init__(self) -> None:
        object.__setattr__(self, "low_precision", parse_format(self.low_precision))
        if not isinstance(self.granularity, Granularity):
            try:
                object.__setattr__(self, "granularity", Granularity(str(self.granularity).lower()))
            except ValueError:
                raise UnsupportedFormatError(f"unknown granularity {self.granularity!r}; choose per_row or per_tensor") from None


def fp8_kernel_for(device: torch.device, in_features: int, out_features: int) -> Kernel:
    """The FP8 kernel that can run a matmul of these sizes on ``device``."""
    if in_features < 2:
        raise UnsupportedFormatError(
            f"FP8 needs per-head weights with at least 2 input features (got {in_features}); use bf16, fp16 or fp32"
        )
    if device.type == "cpu":
        return Kernel.FP8_SCALED_MM
    if device.type == "cuda":
        fast = torch.cuda.get_device_capability(device) >= (8, 9)
        aligned = in_features % 16 == 0 and out_features % 16 == 0
        return Kernel.FP8_SCALED_MM if fast and aligned else Kernel.FP8_WEIGHT_ONLY
    raise UnsupportedFormatError(f"FP8 is not available on device type {device.type!r}; use bf16, fp16 or fp32")


# Lower bound on the amax that sets an FP8 scale: an all-zero row (a pruned or dead head, a zero input)
# would otherwise get scale 0 and turn into NaN.
AMAX_FLOOR = 1e-12


def _float8_weight(weight: torch.Tensor, config: PrecisionConfig, kernel: Kernel) -> torch.Tensor:
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    granularity = PerRow() if config.granularity is Granularity.PER_ROW else PerTensor()
    dtype = config.low_precision.dtype
    mm_config = Float8MMConfig(use_fast_accum=True)
    preference = KernelPreference.TORCH if weight.device.type == "cpu" else KernelPreference.AUTO
    activation = None
    if kernel is Kernel.FP8_SCALED_MM:
        activation = QuantizeTensorToFloat8Kwargs(
            float8_dtype=dtype,
            granularity=granularity,
            mm_config=mm_config,
            kernel_preference=preference,
            hp_value_lb=AMAX_FLOOR,
        )
    return Float8Tensor.from_hp(
        weight.contiguous(),
        float8_dtype=dtype,
        granularity=granularity,
        mm_config=mm_config,
        act_quant_kwargs=activation,
        kernel_preference=preference,
        hp_value_lb=AMAX_FLOOR,
    )


def is_float8_tensor(t: torch.Tensor) -> bool:
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    return isinstance(t, Float8Tensor)


class LowPrecisionPerHeadLinear(PerHeadLinear):
    """All heads in a low-precision format; the head named by ``full_precision_head`` recomputed in FP32."""

    def __init__(self, source: PerHeadLinear, config: PrecisionConfig) -> None:
        super().__init__(source.weight, source.bias)
        self.config = config
        self.exact = False
        n, out_features, in_features = self.weight.shape
        self.register_buffer("head_ids", torch.arange(n, device=self.weight.device))
        fmt = config.low_precision
        if fmt.is_fp8:
            self.kernel = fp8_kernel_for(self.weight.device, in_features, out_features)
            # Heads that read one input (the forward's queries, keys and values) take one FP8 matmul over the stacked
            # weights instead of one per head, each quantizing the same input again. With per-row scales every output
            # feature keeps its own scale, so the weights are quantized once, stacked, and each head's are a slice
            # of them (the same values as quantizing it alone); a per-tensor scale over all heads would differ from
            # each head's own, so that granularity is quantized per head and has no stacked matmul.
            self.stacked_low_weight = None
            if config.granularity is Granularity.PER_ROW:
                stacked = _float8_weight(self.weight.flatten(0, 1), config, self.kernel)
                self.stacked_low_weight = nn.Parameter(stacked, requires_grad=False)
                per_head = [stacked[h * out_features : (h + 1) * out_features] for h in range(n)]
            else:
                per_head = [_float8_weight(self.weight[h], config, self.kernel) for h in range(n)]
            self.low_weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in per_head)
        else:
            self.kernel = Kernel.HALF
            self.register_buffer("low_weight", self.weight.detach().to(fmt.dtype))

    def low_precision(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.low_precision.is_fp8:
            y = torch.stack([F.linear(x[..., h, :], w) for h, w in enumerate(self.low_weights)], dim=-2)
        else:
            y = torch.einsum("...hi,hoi->...ho", x.to(self.low_weight.dtype), self.low_weight).to(x.dtype)
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
        if shared_input and len(units) > 1 and self._stacks(units):
            return self._shared_units(x, units, full_precision_unit)
        fp8 = self.config.low_precision.is_fp8
        low = x if fp8 else x.to(self.low_weight.dtype)  # one cast for every listed head
        columns = []
        for i, unit in enumerate(units):
            x_i, low_i = (x, low) if shared_input else (x[..., i, :], low[..., i, :])
            if unit == full_precision_unit:
                columns.append(self.fp32_unit(x_i, unit))
                continue
            y = F.linear(low_i, self.low_weights[unit]) if fp8 else F.linear(low_i, self.low_weight[unit]).to(x.dtype)
            columns.append(y if self.bias is None else y + self.bias[unit])
        return torch.stack(columns, dim=-2)

    def _stacks(self, units: list[int]) -> bool:
        """Whether the listed units' low-precision weights can be one matmul: half formats always (a row selection of
        ``low_weight``), per-row FP8 for all heads (its stacked weights; a row selection of a Float8 tensor is not one)."""
        if not self.config.low_precision.is_fp8:
            return True
        return self.stacked_low_weight is not None and units == list(range(self.n_heads))

    def _shared_units(self, x: torch.Tensor, units: list[int], full_precision_unit: int) -> torch.Tensor:
        """:meth:`units` of one input [..., in] that every listed unit reads, the low-precision ones in one matmul."""
        index = torch.tensor(units, device=self.weight.device)
        if self.config.low_precision.is_fp8:
            low = F.linear(x, self.stacked_low_weight)
        else:
            low = F.linear(x.to(self.low_weight.dtype), self.low_weight.index_select(0, index).flatten(0, 1)).to(x.dtype)
        low = low.unflatten(-1, (len(units), -1))
        if self.bias is not None:
            low = low + self.bias.index_select(0, index)
        if full_precision_unit in units:
            low[..., units.index(full_precision_unit), :] = self.fp32_unit(x, full_precision_unit)
        return low

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Every head reading ``x`` [..., in]: in FP32 when exact, otherwise under the plan, as ``forward`` on copies
        of ``x``, with one low-precision matmul over the stacked weights where the format allows."""
        if self.exact:
            return super().shared(x)
        copies = x.unsqueeze(-2).expand(*x.shape[:-1], self.n_heads, x.shape[-1])
        if self.config.low_precision.is_fp8:
            if self.stacked_low_weight is None:
                return self(copies)
            low = F.linear(x, self.stacked_low_weight)
        else:
            low = F.linear(x.to(self.low_weight.dtype), self.low_weight.flatten(0, 1)).to(x.dtype)
        low = low.unflatten(-1, (self.n_heads, -1))
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
        if self.config.low_precision is Format.FP32:
            return "fp32 (no quantization)"
        kernels = "; ".join(self.kernels)
        text = (
            f"{fmt} {self.config.granularity.value}: {self.quantized_weights}/{self.total_weights} per-head weights via {kernels}"
        )
        return text + "".join(f"; {n}" for n in self.notes)


PROJECTIONS = ("q", "k", "v", "o")


def attention_blocks(gm: nn.Module) -> list[AttentionBlock]:
    blocks = [m for m in gm.modules() if isinstance(m, AttentionBlock)]
    return sorted(blocks, key=lambda b: b.layer)


def lower_precision(
    gm: fx.GraphModule, low_precision: PrecisionConfig | str | Format = "fp8", granularity: str | Granularity = "per_row"
) -> fx.GraphModule:
    """Lower the per-head projections of a split model (in place) and return it.

    ``low_precision`` is a :class:`PrecisionConfig`, or a format with ``granularity`` beside it.
    Raises :class:`QuantizationError` if an FP8 format was asked for and no weight ended up quantized.
    The result's ``meta["precision"]`` is a :class:`PrecisionReport`.
    """
    config = low_precision if isinstance(low_precision, PrecisionConfig) else PrecisionConfig(low_precision, granularity)
    graph_meta.structure(gm)  # a graph split_heads has not run on has no per-head projections to lower
    blocks = attention_blocks(gm)
    kernels: dict[str, None] = {}
    quantized = total = 0
    if config.low_precision is not Format.FP32:
        for block in blocks:
            for name in PROJECTIONS:
                linear = getattr(block, name)
                source = PerHeadLinear(linear.weight, linear.bias) if isinstance(linear, LowPrecisionPerHeadLinear) else linear
                lowered = LowPrecisionPerHeadLinear(source, config)
                setattr(block, name, lowered)
                kernels[lowered.kernel.value] = None
                total += lowered.weight.shape[0]
                if config.low_precision.is_fp8:
                    quantized += sum(is_float8_tensor(w) for w in lowered.low_weights)
                else:
                    quantized += lowered.weight.shape[0]
        if quantized == 0 or quantized != total:
            raise QuantizationError(f"{config.low_precision.value} lowering quantized {quantized} of {total} per-head weights")
    notes = ()
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
