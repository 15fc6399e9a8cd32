"""pahq_fx: per-attention-head quantization (PAHQ) as torch.fx passes, and ACDC circuit discovery on top."""

from . import passes
from .compile import backend
from .errors import (
    InvalidHeadError,
    PahqError,
    QuantizationError,
    TaskError,
    UnsupportedArchitectureError,
    UnsupportedFormatError,
)
from .head_graph import HeadGraph, LayerInfo
from .precision import Format, Granularity, PrecisionConfig
from .transform import PahqModel, transform

__version__ = "0.1.0"

__all__ = [
    "transform",
    "backend",
    "passes",
    "PahqModel",
    "HeadGraph",
    "LayerInfo",
    "Format",
    "Granularity",
    "PrecisionConfig",
    "PahqError",
    "InvalidHeadError",
    "UnsupportedArchitectureError",
    "UnsupportedFormatError",
    "QuantizationError",
    "TaskError",
]
