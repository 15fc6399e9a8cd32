"""pahq_fx: per-attention-head quantization (PAHQ) as torch.fx passes, and ACDC circuit discovery on top."""

from . import passes
from .acdc import Circuit, Sweep, Task, discover, sweep
from .compile import backend
from .errors import (
    CheckpointError,
    InvalidHeadError,
    InvalidInputsError,
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
    "CheckpointError",
    "Circuit",
    "Format",
    "Granularity",
    "HeadGraph",
    "InvalidHeadError",
    "InvalidInputsError",
    "LayerInfo",
    "PahqError",
    "PahqModel",
    "PrecisionConfig",
    "QuantizationError",
    "Sweep",
    "Task",
    "TaskError",
    "UnsupportedArchitectureError",
    "UnsupportedFormatError",
    "backend",
    "discover",
    "passes",
    "sweep",
    "transform",
]
