"""pahq_fx: per-attention-head quantization (PAHQ) as torch.fx passes, and ACDC circuit discovery on top.

The names below are imported on first use (PEP 562), so that ``import pahq_fx.cli`` does not import torch and
transformers: ``pahq-fx --help`` and a mistyped argument answer at once instead of after two seconds of imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC = {
    "Circuit": ".acdc",
    "Sweep": ".acdc",
    "Task": ".acdc",
    "discover": ".acdc",
    "load_circuit": ".acdc",
    "EdgeScores": ".acdc.scores",
    "edge_scores": ".acdc.scores",
    "load_scores": ".acdc.scores",
    "mib_evaluate": ".acdc.mib",
    "Plan": ".acdc.plan",
    "plan": ".acdc.plan",
    "plan_from_config": ".acdc.plan",
    "sweep": ".acdc",
    "backend": ".compile",
    "CheckpointError": ".errors",
    "CircuitFormatError": ".errors",
    "InvalidHeadError": ".errors",
    "InvalidInputsError": ".errors",
    "NonFiniteError": ".errors",
    "PlanError": ".errors",
    "PahqError": ".errors",
    "QuantizationError": ".errors",
    "TaskError": ".errors",
    "UnsupportedArchitectureError": ".errors",
    "UnsupportedFormatError": ".errors",
    "HeadGraph": ".ir.head_graph",
    "LayerInfo": ".ir.head_graph",
    "Format": ".formats",
    "Granularity": ".passes.precision",
    "PrecisionConfig": ".passes.precision",
    "PahqModel": ".front_door",
    "transform": ".front_door",
}
_SUBMODULES = ("passes",)

__all__ = [
    "CheckpointError",
    "Circuit",
    "CircuitFormatError",
    "EdgeScores",
    "Format",
    "Granularity",
    "HeadGraph",
    "InvalidHeadError",
    "InvalidInputsError",
    "LayerInfo",
    "NonFiniteError",
    "PahqError",
    "PahqModel",
    "Plan",
    "PlanError",
    "PrecisionConfig",
    "QuantizationError",
    "Sweep",
    "Task",
    "TaskError",
    "UnsupportedArchitectureError",
    "UnsupportedFormatError",
    "backend",
    "discover",
    "edge_scores",
    "load_circuit",
    "load_scores",
    "mib_evaluate",
    "passes",
    "plan",
    "plan_from_config",
    "sweep",
    "transform",
]

if TYPE_CHECKING:
    from . import passes
    from .acdc import Circuit, Sweep, Task, discover, load_circuit
    from .acdc.mib import mib_evaluate
    from .acdc.plan import Plan, plan, plan_from_config
    from .acdc.scores import EdgeScores, edge_scores, load_scores
    from .acdc.sweep import sweep
    from .compile import backend
    from .errors import (
        CheckpointError,
        CircuitFormatError,
        InvalidHeadError,
        InvalidInputsError,
        NonFiniteError,
        PahqError,
        PlanError,
        QuantizationError,
        TaskError,
        UnsupportedArchitectureError,
        UnsupportedFormatError,
    )
    from .formats import Format
    from .front_door import PahqModel, transform
    from .ir.head_graph import HeadGraph, LayerInfo
    from .passes.precision import Granularity, PrecisionConfig


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f".{name}", __name__)
    elif name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
