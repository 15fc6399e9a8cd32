"""Checked arguments and the patching runtime of a run: what ``discover``, ``sweep`` and evaluation share."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import PahqError, TaskError
from ..ir import graph_meta
from ..metrics import Metric, metric_named
from ..model_io import max_positions
from ..passes.pipeline import lower_split
from ..passes.precision import AUTO, Format, PrecisionConfig
from ..passes.trace import trace
from .edges import EdgeGraph
from .runtime import PatchingRuntime, ReceiverInputs
from .storage import Storage
from .task import Task


def parse_metric(metric: str | Metric, task: Task) -> Metric:
    """The registered metric ``metric``, checked against what ``task`` holds."""
    parsed = metric_named(metric)
    if parsed.needs_answers and not task.has_answers:
        raise TaskError(f"metric {parsed.value} needs correct_ids and incorrect_ids in the task")
    return parsed


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold) or threshold < 0:
        raise PahqError(f"threshold must be a finite non-negative number, got {threshold!r}")
    return float(threshold)


def resolve_compile(compile: bool | str, device: torch.device) -> tuple[bool, str]:
    """Whether to compile, and the sentence the report shows. ``"auto"`` runs eagerly on every device measured so
    far: on a CPU compiling is never repaid, and on an H100 the compile time outweighed what compiled queries
    saved (a query is many small kernels, bound by their launches). The measurements: docs/performance.md,
    "On a GPU"."""
    if compile == AUTO:
        where = "on an H100" if device.type == "cuda" else f"on {device.type}"
        return False, f"eager (compile='auto': {where} compilation is not repaid)"
    if not isinstance(compile, bool):
        raise PahqError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile, "compiled (compile=True)" if compile else "eager (compile=False)"


def check_vocabulary(model: nn.Module, task: Task) -> None:
    """The task's token ids are in the model's vocabulary and its prompts within the model's positions."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None:
        task.validate_vocab(int(vocab), max_positions(model))


def _trace_for(model: nn.Module, input_ids: torch.Tensor) -> torch.fx.GraphModule:
    """The traced model, traced and probed on two prompts (the split's probes cost in proportion to the example)
    with a dynamic batch, unless the batch came out static, in which case it is traced at the task's own shape.
    The sequence length stays the task's: every query runs it, and a fixed length halves the export."""
    small = trace(model, example_inputs=input_ids[:2], dynamic_shapes="batch")
    if graph_meta.dynamic_dims(small) or input_ids.shape[0] <= 2:
        return small
    return trace(model, example_inputs=input_ids, dynamic_shapes=False)


def build_runtime(
    model: nn.Module,
    task: Task,
    metric: Metric,
    precision: Format,
    granularity: str,
    compile: bool,
    storage: Storage = Storage.FP32,
    receiver_inputs: ReceiverInputs = ReceiverInputs.STORED,
) -> tuple[PatchingRuntime, EdgeGraph]:
    """Trace, split and lower the model; return the runtime (its caches and state stored in ``storage``, its receiver
    inputs stored or recomputed) and its edge graph."""
    check_vocabulary(model, task)
    graph = lower_split(_trace_for(model, task.clean_input_ids), PrecisionConfig(precision, granularity))
    edges = EdgeGraph(graph_meta.head_graph(graph))
    runtime = PatchingRuntime(graph, edges, task, metric, compile=compile, storage=storage, receiver_inputs=receiver_inputs)
    return runtime, edges
