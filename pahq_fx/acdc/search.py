"""ACDC's greedy edge search (docs/acdc.md) over the patching runtime, with checkpoint/resume and progress."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import names
from ..errors import CheckpointError, NonFiniteError
from ..head_graph import HeadGraph
from ..precision import AUTO, Format, auto_format, parse_format
from ..split import check_finite_weights, check_float32_weights, wide_weights_note
from .checkpoint import Checkpoint, replay
from .circuit import Circuit, CircuitEdge, RunStats
from .edges import EdgeGraph, Receiver
from .evaluation import TaskCheck, WeakTaskError, check_task, evaluate_edges
from .metrics import Metric
from .run_info import eager_forward_seconds, library_versions, model_identity, peak_memory_mb
from .runtime import PatchingRuntime
from .setup import build_runtime, check_threshold, check_vocabulary, parse_metric, resolve_compile
from .task import Task


@dataclass(frozen=True)
class ReceiverDone:
    """Passed to ``discover``'s callback after each receiver: where the run stands."""

    receiver: str
    index: int
    total: int
    edges_kept: int
    queries: int


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
    allow_weak_task: bool = False,
    faithfulness: bool = False,
    save_to: str | Path | None = None,
) -> Circuit:
    """ACDC circuit discovery where every edge query runs the PAHQ-transformed graph.

    ``precision``: ``auto`` (the format measured fastest per query on the device: FP32 on CPUs and on an H100,
    see :func:`~pahq_fx.precision.auto_format`), ``fp32``, ``fp8`` (e4m3), ``fp8_e5m2``, ``bf16`` or ``fp16``; for
    every query the receiver's head runs in FP32 and the other heads in that format. ``compile``: ``auto`` runs
    eagerly (compilation was not repaid on a CPU or an H100), ``True`` forces it. See docs/acdc.md for the algorithm, docs/runtime.md for
    the runtime.

    Before searching, :func:`~pahq_fx.acdc.evaluation.check_task` measures the metric clean and with every edge
    patched (and the clean accuracy where the task has answers): where the corrupted prompts barely move the
    metric the circuit would mean nothing, and a :class:`WeakTaskError` stops the run, unless ``allow_weak_task`` (then a warning
    goes to stderr and the circuit's ``task_check`` carries it). With ``checkpoint=path`` the decisions are
    written after receivers (as often as keeps writing under 2% of the run); a run with the same arguments resumes from them, and the file is removed when
    the run has finished: once the circuit is saved to ``save_to`` where that is given (right after the search,
    before the faithfulness pass), otherwise once this function returns the circuit. With ``faithfulness``, the
    circuit alone is measured afterwards on the same runtime (no second trace, but a full patched pass on top of
    the caches: more peak memory than the search), in ``Circuit.faithfulness`` (and saved again to ``save_to``).
    """
    threshold = check_threshold(threshold)

    def fingerprint_of(identity: dict[str, Any], parsed_metric: Metric, fmt: Format) -> dict[str, Any]:
        return {"model": identity["fingerprint"], "task": task.fingerprint(), "threshold": threshold,
                "metric": parsed_metric.value, "precision": fmt.value, "granularity": granularity, "abs": abs_threshold}

    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():  # another run's checkpoint is refused before the setup (minutes on a large model)
        fmt = auto_format(task.clean_input_ids.device)[0] if precision == AUTO else parse_format(precision)
        Checkpoint(path, fingerprint_of(model_identity(model), parse_metric(metric, task), fmt)).load()
    session = prepare(model, task, metric=metric, precision=precision, granularity=granularity, compile=compile,
                      allow_weak_task=allow_weak_task)
    store = Checkpoint(path, fingerprint_of(session.identity, session.metric, session.format))
    try:
        circuit = search(session, threshold, abs_threshold=abs_threshold, store=store, progress=progress, callback=callback)
    except CheckpointError as error:  # the replay's checks know the decisions, not the file: name it
        raise CheckpointError(error if str(path) in str(error) else f"checkpoint {path}: {error}") from None
    # The search is the run's cost; what follows (faithfulness: the run's peak memory) may fail. So the circuit is
    # on disk first, and the checkpoint goes only once it is: a run that dies from here on loses nothing.
    if save_to is not None:
        circuit.save(save_to)
        store.finish()
    if faithfulness:
        circuit = dataclasses.replace(
            circuit, faithfulness=evaluate_edges(session.runtime, session.edges, circuit.edge_set()))
        if save_to is not None:
            circuit.save(save_to)
    store.finish()
    return circuit


@dataclass
class Session:
    """Everything a search needs that does not depend on the threshold: checked arguments, the task check, the
    runtime with its caches. :func:`discover` prepares one per run; a sweep prepares one for all thresholds."""

    model: nn.Module
    task: Task
    metric: Metric
    format: Format
    precision_note: str
    execution: str
    runtime: PatchingRuntime
    edges: EdgeGraph
    identity: dict[str, Any]
    task_check: TaskCheck
    forward_samples: list[float]
    setup_s: float


def prepare(
    model: nn.Module,
    task: Task,
    *,
    metric: str | Metric = "kl",
    precision: str = AUTO,
    granularity: str = "per_row",
    compile: bool | str = AUTO,
    allow_weak_task: bool = False,
) -> Session:
    """Check the arguments and the task (:class:`WeakTaskError` unless ``allow_weak_task``), time one eager
    forward, and build the runtime: trace, split, lower, clean and corrupted caches."""
    parsed_metric = parse_metric(metric, task)
    check_float32_weights(model.parameters())  # before the task check and the trace
    check_finite_weights(model)
    device = task.clean_input_ids.device
    fmt, precision_note = auto_format(device) if precision == AUTO else (parse_format(precision), "")
    precision_note = "; ".join(n for n in (precision_note, wide_weights_note(model.parameters())) if n)
    compiled, execution = resolve_compile(compile, device)
    check_vocabulary(model, task)
    task_check = check_task(model, task, parsed_metric)
    for value, where in ((task_check.full_model, "of the clean model"), (task_check.every_edge_patched, "with every edge patched")):
        if not math.isfinite(value):
            raise NonFiniteError(f"the metric ({parsed_metric.value}) {where} is {value} on this task: the model's "
                                 "logits overflow or are not numbers on these prompts")
    if task_check.weak:
        if not allow_weak_task:
            raise WeakTaskError(task_check.warning() + " Pass allow_weak_task=True (--allow-weak-task) to search anyway.")
        warnings.warn(task_check.warning(), stacklevel=3)
    forward_samples = eager_forward_seconds(model, task.clean_input_ids, repeats=3, warm_up=False)  # check_task warmed it
    start = time.perf_counter()
    runtime, edges = build_runtime(model, task, parsed_metric, fmt, granularity, compiled)
    return Session(model, task, parsed_metric, fmt, precision_note, execution, runtime, edges, model_identity(model),
                   task_check, forward_samples, time.perf_counter() - start)


def search(
    session: Session,
    threshold: float,
    *,
    abs_threshold: bool = False,
    store: Checkpoint | None = None,
    progress: bool = True,
    callback: Callable[[ReceiverDone], None] | None = None,
) -> Circuit:
    """ACDC's greedy search at one threshold, from the runtime's current state (a fresh or reset runtime, or the
    state ``store`` holds), to a :class:`Circuit`."""
    from tqdm.auto import tqdm

    runtime, edges = session.runtime, session.edges
    store = store or Checkpoint(None, {})
    effects: dict[tuple[int, int], float] = {}
    done: list[str] = []
    start_time = time.perf_counter()
    state = store.load()
    if state is not None:
        done = list(state["done"])
        effects = {(r, s): e for r, s, e in state["effects"]}
        replay(runtime, edges, done, {(r, s) for r, s in state["removed"]}, effects)
        runtime.queries = int(state["queries"])
    resume_s = time.perf_counter() - start_time
    bar = tqdm(total=len(edges.receivers), initial=len(done), disable=not progress, unit="receiver", desc="ACDC")
    loop_start, loop_queries = time.perf_counter(), runtime.queries
    finished_queries = runtime.queries
    unfinished: int | None = None
    try:
        for r_index, receiver in enumerate(edges.receivers):
            if receiver.name in done:
                continue
            unfinished = r_index
            _search_receiver(runtime, r_index, receiver, threshold, abs_threshold, effects)
            done.append(receiver.name)
            unfinished, finished_queries = None, runtime.queries
            if store.due():
                _save(store, runtime, done, effects, finished_queries, None)
            kept = runtime.kept_edges
            rate = (runtime.queries - loop_queries) / max(time.perf_counter() - loop_start, 1e-9)
            bar.set_postfix(edges_kept=kept, queries_per_s=f"{rate:.1f}", refresh=False)  # drawn at tqdm's own pace
            bar.update(1)
            if callback is not None:
                callback(ReceiverDone(receiver.name, len(done), len(edges.receivers), kept, runtime.queries))
    except BaseException:
        # Interrupted (Ctrl-C, a callback's exception): keep every finished receiver, whatever the write budget said.
        _save(store, runtime, done, effects, finished_queries, unfinished)
        raise
    bar.close()
    search_s = time.perf_counter() - loop_start
    setup = session.setup_s + resume_s
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
    per_query = search_s / max(queries - loop_queries, 1)
    # Forwards timed before and after the search (five in all): the machine's speed may drift during a long run.
    after = eager_forward_seconds(session.model, session.task.clean_input_ids, repeats=2, warm_up=False)
    forward_s = statistics.median(session.forward_samples + after)
    task = session.task
    return Circuit(
        edges=kept_edges,
        threshold=threshold,
        metric=session.metric.value,
        precision=session.format.value,
        abs_threshold=abs_threshold,
        model=session.identity,
        task={"name": task.name, "fingerprint": task.fingerprint(), "examples": task.n_examples,
              "seq_len": int(task.clean_input_ids.shape[1])},
        stats=RunStats(setup + search_s, queries, (queries - loop_queries) / max(search_s, 1e-9), peak_memory_mb(runtime.device),
                       runtime.compilations, setup, compile_s=runtime.compile_seconds, forward_s=forward_s,
                       forward_equivalents=per_query / forward_s, state_bytes=runtime.state_bytes(), execution=session.execution),
        total_edges=runtime.total_edges,
        versions=library_versions(),
        removed=removed_edges,
        groups=_kv_groups(edges),
        precision_note=session.precision_note,
        task_check=session.task_check.to_json(),
        architecture=_architecture(edges.head_graph),
    )


def _architecture(head_graph: HeadGraph) -> tuple[dict[str, Any], ...]:
    """Per attention layer, what the circuit file records for drawing it: heads, key/value groups, post-attention
    norm, the number of whole components after it (``mlp``: any), and on the first layer those before it."""
    layers = tuple({"heads": layer.n_heads, "kv_groups": layer.n_kv_groups, "mlp": layer.has_mlp,
                    "components": len(layer.components), "output_norm": layer.has_output_norm}
                   for layer in head_graph.layers)
    if head_graph.leading:
        layers[0]["leading"] = len(head_graph.leading)
    return layers


def _search_receiver(runtime: PatchingRuntime, r_index: int, receiver: Receiver, threshold: float, abs_threshold: bool,
                     effects: dict[tuple[int, int], float]) -> None:
    """ACDC at one receiver: prune it if its node sends nothing any more, otherwise test its edges in order and keep
    each removal whose effect stays under the threshold."""
    if not runtime.is_live(r_index):
        runtime.remove(r_index, receiver.senders)
        return
    baseline = runtime.investigate(receiver)
    for s in receiver.senders:
        effect = runtime.try_remove(r_index, [s]) - baseline
        effects[(r_index, s)] = effect
        if (abs(effect) if abs_threshold else effect) < threshold:
            baseline = runtime.commit()
        else:
            runtime.rollback()


def _save(store: Checkpoint, runtime: PatchingRuntime, done: list[str], effects: dict[tuple[int, int], float],
          queries: int, unfinished: int | None) -> None:
    """The state after the last finished receiver: the decisions of ``unfinished`` (the receiver being searched, whose
    removals all go into its own row) are left out, to be taken again on resume."""
    removed = sorted((row, s) for row, s in runtime.removed if row != unfinished)
    store.save(done, removed, {k: e for k, e in effects.items() if k[0] != unfinished}, queries)


def _kv_groups(edges: EdgeGraph) -> dict[str, list[str]]:
    """Under grouped-query attention: each key/value group node and the query heads it feeds."""
    groups = {}
    for layer in edges.head_graph.layers:
        if layer.grouped:
            for g in range(layer.n_kv_groups):
                heads = [layer.head_name(h) for h in range(layer.n_heads) if layer.kv_group_of_head[h] == g]
                groups[names.kv_group(layer.index, g)] = heads
    return groups
