"""The formats the heads not under investigation run in: a registry of strategy objects.

Each :class:`Format` knows its name and aliases, its torch dtype, whether it goes through torchao's float8 path,
which kernel can run it on a device, and how to lower a projection's per-head weights. Adding a format is one
:func:`register_format` call in this module (or in a user's own code); nothing else branches on a format's kind.
The module imports no torch when it is imported: the command line offers the registered names without loading it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .errors import UnsupportedFormatError

if TYPE_CHECKING:
    import torch

    from .passes.precision import Granularity, LoweredHeads


class Kernel(enum.Enum):
    """How the low-precision matmul actually runs; shown in reprs and reports."""

    HALF = "half-precision matmul"
    FP8_SCALED_MM = "torchao Float8Tensor, dynamic FP8 activations, FP8 x FP8 torch._scaled_mm"
    FP8_WEIGHT_ONLY = "torchao Float8Tensor weight-only (FP8 weights dequantized, FP32 activations)"


@dataclass(frozen=True, eq=False)
class Format:
    """A numeric format for the heads that are not under investigation. One object per name: compare with ``is``."""

    value: str  # the name users pass (``precision="bf16"``)
    dtype_name: str  # the torch dtype's attribute, resolved on use so that importing the registry imports no torch
    aliases: tuple[str, ...] = ()

    float8: ClassVar[bool] = False  # lowered through torchao's float8 path (scaled FP8 weights and activations)
    quantizes: ClassVar[bool] = True  # whether lowering changes the weights at all (FP32 does not)

    FP32: ClassVar[Format]
    FP8_E4M3: ClassVar[Format]
    FP8_E5M2: ClassVar[Format]
    BF16: ClassVar[Format]
    FP16: ClassVar[Format]

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    def fast_on(self, device: torch.device) -> bool:
        """Whether ``device`` has kernels that can make this format faster than FP32 (``precision="auto"``'s candidates)."""
        return True

    def lower(self, weight: torch.Tensor, granularity: Granularity) -> LoweredHeads:
        """Per-head weights ``[heads, out, in]`` in this format, with the matmuls that read them and the kernel they run
        (an :class:`UnsupportedFormatError` where the weights' device cannot run the format): the lowering registered
        for this kind of format (:func:`register_lowering`)."""
        for kind in type(self).__mro__:
            if kind in _LOWERINGS:
                return _LOWERINGS[kind](self, weight, granularity)
        raise UnsupportedFormatError(f"{self.value} keeps the weights as they are: there is nothing to lower")

    def __reduce__(self) -> tuple:
        return parse_format, (self.value,)  # unpickled as the registered object itself, so ``is`` keeps working

    def __repr__(self) -> str:
        return f"Format({self.value!r})"


class FullPrecision(Format):
    """FP32: no lowering at all."""

    quantizes: ClassVar[bool] = False


class Cast(Format):
    """A narrower floating-point dtype that torch multiplies in directly (bf16, fp16)."""


class Float8(Format):
    """FP8 through torchao's ``Float8Tensor`` with real scaling (per row or per tensor), never an unscaled cast."""

    float8: ClassVar[bool] = True

    def fast_on(self, device: torch.device) -> bool:
        """FP8 tensor cores: CUDA sm >= 8.9."""
        import torch

        return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)

    def kernel_for(self, device: torch.device, in_features: int, out_features: int) -> Kernel:
        """Dynamic FP8 activations (``torch._scaled_mm``: emulated on a CPU, tensor cores on CUDA sm >= 8.9 with dimensions
        that are multiples of 16); the weight-only path on other CUDA devices."""
        if in_features < 2:
            raise UnsupportedFormatError(
                f"FP8 needs per-head weights with at least 2 input features (got {in_features}); use bf16, fp16 or fp32"
            )
        if device.type == "cpu":
            return Kernel.FP8_SCALED_MM
        if device.type == "cuda":
            aligned = in_features % 16 == 0 and out_features % 16 == 0
            return Kernel.FP8_SCALED_MM if self.fast_on(device) and aligned else Kernel.FP8_WEIGHT_ONLY
        raise UnsupportedFormatError(f"FP8 is not available on device type {device.type!r}; use bf16, fp16 or fp32")


# How each kind of format lowers per-head weights. The modules that do it need torch and live in pahq_fx.passes.precision,
# which registers them when it is imported (the per-head projection that calls ``lower`` lives there too).
Lowering = Callable[[Format, "torch.Tensor", "Granularity"], "LoweredHeads"]
_LOWERINGS: dict[type[Format], Lowering] = {}


def register_lowering(kind: type[Format], lowering: Lowering) -> None:
    """``lowering(fmt, weight, granularity)`` lowers per-head weights for every format of class ``kind``."""
    _LOWERINGS[kind] = lowering


FORMATS: dict[str, Format] = {}
_ALIASES: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the registry under its name and aliases (each must be new) and return it."""
    for key in (fmt.value, *fmt.aliases):
        if key == AUTO or key in FORMATS or key in _ALIASES:
            raise ValueError(f"format name {key!r} is taken")
    FORMATS[fmt.value] = fmt
    _ALIASES.update(dict.fromkeys(fmt.aliases, fmt))
    return fmt


AUTO = "auto"  # discover's and sweep's choice by measurement; not a format

Format.FP32 = register_format(FullPrecision("fp32", "float32"))
Format.FP8_E4M3 = register_format(Float8("fp8", "float8_e4m3fn", ("fp8_e4m3", "e4m3")))
Format.FP8_E5M2 = register_format(Float8("fp8_e5m2", "float8_e5m2", ("e5m2",)))
Format.BF16 = register_format(Cast("bf16", "bfloat16"))
Format.FP16 = register_format(Cast("fp16", "float16"))


def parse_format(value: str | Format) -> Format:
    """The registered format named ``value`` (its name or an alias, any case)."""
    if isinstance(value, Format):
        return value
    key = str(value).lower()
    fmt = FORMATS.get(key) or _ALIASES.get(key)
    if fmt is None:
        raise UnsupportedFormatError(f"unknown low-precision format {value!r}; choose one of {', '.join(FORMATS)}")
    return fmt
