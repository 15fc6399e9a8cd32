"""ACDC's greedy edge search (docs/acdc.md) over the patching runtime, with checkpoint/resume and progress."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, PahqError, TaskError
from ..precision import AUTO, Format, auto_format, lower_precision, parse_format
from ..split import split_heads
from ..trace import trace
from .circuit import Circuit, CircuitEdge, RunStats
from .edges import EdgeGraph
from .metrics import Metric
from .runtime import PatchingRuntime
from .task import Task

CHECKPOINT_FORMAT = "pahq_fx.acdc.checkpoint/1"


@dataclass(frozen=True)
class ReceiverDone:
    """Passed to ``discover``'s callback after each receiver: where the run stands."""

    receiver: str
    index: int
    total: int
    edges_kept: int
    queries: int


def _parse_metric(metric: str | Metric, task: Task) -> Metric:
    try:
        parsed = metric if isinstance(metric, Metric) else Metric(str(metric).lower())
    except ValueError:
        raise PahqError(f"unknown metric {metric!r}; choose one of {', '.join(m.value for m in Metric)}") from None
    if parsed.needs_answers and not task.has_answers:
        raise TaskError(f"metric {parsed.value} needs correct_ids and incorrect_ids in the task")
    return parsed


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold) or threshold < 0:
        raise PahqError(f"threshold must be a non-negative number, got {threshold!r}")
    return float(threshold)


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Class, name and a fingerprint of the weights (to recognise the model in checkpoints and reports)."""
    digest = hashlib.sha256()
    n_params = 0
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            digest.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}{float(p.double().abs().sum()):.10e}".encode())
            n_params += p.numel()
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "parameters": n_params,
        "fingerprint": digest.hexdigest()[:16],
    }


def library_versions() -> dict[str, str]:
    import torchao
    import transformers

    from .. import __version__

    return {"pahq_fx": __version__, "torch": torch.__version__, "torchao": torchao.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _resolve_compile(compile: bool | str, device: torch.device) -> tuple[bool, str]:
    """Whether to compile, and the sentence the report shows."""
    if compile == AUTO:
        if device.type == "cuda":
            return True, "compiled (compile='auto' on CUDA)"
        return False, f"eager (compile='auto': on {device.type} compilation is not repaid)"
    if not isinstance(compile, bool):
        raise PahqError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile, "compiled (compile=True)" if compile else "eager (compile=False)"


@torch.no_grad()
def eager_forward_seconds(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5) -> list[float]:
    """Times of ``repeats`` eager forwards of the original model on ``input_ids`` (after one warm-up): the unit of
    forward-equivalents is their median."""
    times = []
    for _ in range(repeats + 1):
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        times.append(time.perf_counter() - start)
    return times[1:]


def _check_vocabulary(model: nn.Module, task: Task) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        task.validate_vocab(int(vocab))


def _trace_for(model: nn.Module, input_ids: torch.Tensor) -> torch.fx.GraphModule:
    """The traced model, traced and probed on two prompts (the split's probes cost in proportion to the example)
    unless its shapes came out static, in which case it is traced at the task's own shape."""
    small = trace(model, example_inputs=input_ids[:2])
    if small.meta["dynamic_shapes"] or input_ids.shape[0] <= 2:
        return small
    return trace(model, example_inputs=input_ids)


def build_runtime(model: nn.Module, task: Task, metric: Metric, precision: Format, granularity: str, compile: bool):
    """Trace, split and lower the model; return the runtime and its edge graph."""
    _check_vocabulary(model, task)
    graph = split_heads(_trace_for(model, task.clean_input_ids))
    graph = lower_precision(graph, precision, granularity)
    edges = EdgeGraph(graph.meta["head_graph"])
    return PatchingRuntime(graph, edges, task, metric, compile=compile), edges


class _Checkpoint:
    def __init__(self, path: Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint {self.path} is unreadable: {error}") from None
        if data.get("format") != CHECKPOINT_FORMAT or data.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {self.path} belongs to a run with other arguments (model, task, threshold, metric or "
                "precision); delete it or choose another path"
            )
        return data

    def save(self, done: list[str], removed: list[tuple[int, int]], effects: dict[tuple[int, int], float], queries: int) -> None:
        if self.path is None:
            return
        data = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "done": done,
            "removed": [list(edge) for edge in removed],
            "effects": [[r, s, e] for (r, s), e in sorted(effects.items())],
            "queries": queries,
        }
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def discover(
    model: nn.Module,
    task: Task,
    *,
    threshold: float,
    metric: str | Metric = "kl",
    precision: str = AUTO,
    abs_threshold: bool = False,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    granularity: str = "per_row",
    compile: bool | str = AUTO,
    callback: Callable[[ReceiverDone], None] | None = None,
) -> Circuit:
    """ACDC circuit discovery where every edge query runs the PAHQ-transformed graph.

    ``precision``: ``auto`` (FP8 on CUDA sm >= 8.9, bf16 where matmuls are natively bf16, else FP32), ``fp32``,
    ``fp8`` (e4m3), ``fp8_e5m2``, ``bf16`` or ``fp16``; for every query the receiver's head runs in FP32 and the
    other heads in that format. ``compile``: ``auto`` compiles on CUDA and runs eagerly elsewhere (on a CPU the
    compile time is not repaid), ``True`` forces it. See docs/acdc.md for the algorithm, docs/runtime.md for
    the runtime.
    """
    threshold = _check_threshold(threshold)
    parsed_metric = _parse_metric(metric, task)
    device = task.clean_input_ids.device
    fmt, precision_note = auto_format(device) if precision == AUTO else (parse_format(precision), "")
    compiled, execution = _resolve_compile(compile, device)
    _check_vocabulary(model, task)
    forward_samples = eager_forward_seconds(model, task.clean_input_ids)
    start_time = time.perf_counter()
    runtime, edges = build_runtime(model, task, parsed_metric, fmt, granularity, compiled)
    identity = model_identity(model)
    fingerprint = {
        "model": identity["fingerprint"], "task": task.fingerprint(), "threshold": threshold,
        "metric": parsed_metric.value, "precision": fmt.value, "granularity": granularity, "abs": abs_threshold,
    }
    store = _Checkpoint(Path(checkpoint) if checkpoint is not None else None, fingerprint)
    effects: dict[tuple[int, int], float] = {}
    done: list[str] = []
    state = store.load()
    if state is not None:
        done = list(state["done"])
        effects = {(r, s): e for r, s, e in state["effects"]}
        _replay(runtime, edges, done, {(r, s) for r, s in state["removed"]}, effects)
        runtime.queries = int(state["queries"])

    from tqdm.auto import tqdm

    setup = time.perf_counter() - start_time
    bar = tqdm(total=len(edges.receivers), initial=len(done), disable=not progress, unit="receiver", desc="ACDC")
    loop_start, loop_queries = time.perf_counter(), runtime.queries
    for r_index, receiver in enumerate(edges.receivers):
        if receiver.name in done:
            continue
        if not runtime.is_live(r_index):
            runtime.remove(r_index, receiver.senders)
        else:
            baseline = runtime.investigate(receiver)
            for s in receiver.senders:
                value = runtime.try_remove(r_index, [s])
                effect = value - baseline
                effects[(r_index, s)] = effect
                if (abs(effect) if abs_threshold else effect) < threshold:
                    baseline = runtime.commit()
                else:
                    runtime.rollback()
        done.append(receiver.name)
        store.save(done, sorted(runtime.removed), effects, runtime.queries)
        kept = runtime.kept_edges
        rate = (runtime.queries - loop_queries) / max(time.perf_counter() - loop_start, 1e-9)
        bar.set_postfix(edges_kept=kept, queries_per_s=f"{rate:.1f}")
        bar.update(1)
        if callback is not None:
            callback(ReceiverDone(receiver.name, len(done), len(edges.receivers), kept, runtime.queries))
    bar.close()
    wall = time.perf_counter() - start_time
    kept_edges = tuple(
        CircuitEdge(edges.senders[s].name, r.name, effects.get((i, s), float("nan")))
        for i, r in enumerate(edges.receivers)
        for s in r.senders
        if runtime.is_kept(i, s)
    )
    removed_edges = tuple(
        CircuitEdge(edges.senders[s].name, edges.receivers[i].name, e)
        for (i, s), e in sorted(effects.items())
        if not runtime.is_kept(i, s)
    )
    queries = runtime.queries
    search_s = time.perf_counter() - loop_start
    per_query = search_s / max(queries - loop_queries, 1)
    # Forwards timed before and after the search: the machine's speed may drift during a long run.
    forward_s = statistics.median(forward_samples + eager_forward_seconds(model, task.clean_input_ids))
    return Circuit(
        edges=kept_edges,
        threshold=threshold,
        metric=parsed_metric.value,
        precision=fmt.value,
        abs_threshold=abs_threshold,
        model=identity,
        task={"name": task.name, "fingerprint": task.fingerprint(), "examples": task.n_examples,
              "seq_len": int(task.clean_input_ids.shape[1])},
        stats=RunStats(wall, queries, (queries - loop_queries) / max(search_s, 1e-9), peak_memory_mb(runtime.device),
                       runtime.compilations, setup, compile_s=runtime.compile_seconds, forward_s=forward_s,
                       forward_equivalents=per_query / forward_s, state_bytes=runtime.state_bytes(), execution=execution),
        total_edges=runtime.total_edges,
        versions=library_versions(),
        removed=removed_edges,
        groups=_kv_groups(edges),
        precision_note=precision_note,
    )


def _replay(runtime: PatchingRuntime, edges: EdgeGraph, done: list[str], removed: set[tuple[int, int]],
            effects: dict[tuple[int, int], float]) -> None:
    """Rebuild the state of a checkpointed run by repeating its state changes in order (bit for bit the same
    state as the uninterrupted run; no edge is measured again). A receiver without measured effects was pruned."""
    for name in done:
        row = edges.receiver_index[name]
        receiver = edges.receivers[row]
        if not any((row, s) in effects for s in receiver.senders):
            runtime.remove(row, receiver.senders)
            continue
        runtime.investigate(receiver)
        for s in receiver.senders:
            if (row, s) in removed:
                runtime.try_remove(row, [s])
                runtime.commit()


def _kv_groups(edges: EdgeGraph) -> dict[str, list[str]]:
    """Under grouped-query attention: each key/value group node and the query heads it feeds."""
    groups = {}
    for layer in edges.head_graph.layers:
        if layer.grouped:
            for g in range(layer.n_kv_groups):
                heads = [layer.head_name(h) for h in range(layer.n_heads) if layer.kv_group_of_head[h] == g]
                groups[f"a{layer.index}.g{g}"] = heads
    return groups


@dataclass(frozen=True)
class Faithfulness:
    """Metric of the circuit alone (every other edge patched) next to the full model's, both in FP32."""

    metric: str
    circuit: float
    full_model: float
    empty_circuit: float

    def describe(self) -> str:
        return (f"{self.metric}: circuit {self.circuit:.4g}, full model {self.full_model:.4g}, "
                f"every edge patched {self.empty_circuit:.4g}")


def evaluate_circuit(kept: set[tuple[str, str]], model: nn.Module, task: Task, metric: str | Metric = "kl") -> Faithfulness:
    """Run the circuit given by its kept (sender, receiver) edges alone in FP32, and compare with the full model
    and with nothing kept."""
    metric = _parse_metric(metric, task)
    runtime, edges = build_runtime(model, task, metric, Format.FP32, "per_row", compile=False)
    names = [(edges.senders[s].name, r.name) for r in edges.receivers for s in r.senders]
    unknown = kept - set(names)
    if unknown:
        raise PahqError(f"the circuit has edges this model does not: {sorted(unknown)[:5]}")
    full_model = runtime.run_from(0)
    every_edge = {i: list(r.senders) for i, r in enumerate(edges.receivers)}
    outside = {i: [s for s in senders if (edges.senders[s].name, edges.receivers[i].name) not in kept]
               for i, senders in every_edge.items()}
    circuit_value = runtime.try_remove_edges({i: s for i, s in outside.items() if s})
    runtime.rollback()
    empty = runtime.try_remove_edges(every_edge)
    runtime.rollback()
    return Faithfulness(metric=metric.value, circuit=circuit_value, full_model=full_model, empty_circuit=empty)
