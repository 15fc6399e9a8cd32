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

from ..errors import CheckpointError, NonFiniteError, PahqError
from ..ir import names
from ..ir.head_graph import HeadGraph
from ..metrics import Metric
from ..passes.precision import AUTO, Format, parse_format
from ..passes.weights import check_finite_weights, check_float32_weights, wide_weights_note
from .calibration import (
    Calibration,
    choose,
    estimated_search_seconds,
    formats_to_try,
    probe_receiver,
    seconds_per_query,
    unmeasured_note,
    worth_measuring,
)
from .checkpoint import Checkpoint, resume
from .circuit import Circuit, CircuitEdge, RunStats
from .edges import EdgeGraph, Receiver
from .eta import Eta
from .evaluation import TaskCheck, WeakTaskError, check_task, evaluate_edges
from .plan import AUTO_STORAGE, choose_storage
from .run_info import eager_forward_seconds, library_versions, model_identity, peak_memory_mb
from .runtime import PatchingRuntime, ReceiverInputs
from .setup import build_runtime, check_threshold, check_vocabulary, parse_metric, resolve_compile
from .speculation import OFF, Predictor, candidate_memory, check_speculation, search_receiver
from .storage import Storage
from .task import Task


@dataclass(frozen=True)
class ReceiverDone:
    """Passed to ``discover``'s callback after each receiver: where the run stands."""

    receiver: str
    index: int
    total: int
    edges_kept: int
    queries: int
    eta_s: float | None = None  # predicted seconds of search left, as the bar shows them (None before any is measured)


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
    speculation: str | Predictor = OFF,
    storage: str = "fp32",
    receiver_inputs: str | None = None,
) -> Circuit:
    """ACDC circuit discovery where every edge query runs the PAHQ-transformed graph.

    ``precision``: ``auto`` (the format measured fastest per query at the start of the run, FP32 unless another is
    clearly faster: :mod:`~pahq_fx.acdc.calibration`), ``fp32``, ``fp8`` (e4m3), ``fp8_e5m2``, ``bf16`` or ``fp16``; for
    every query the receiver's head runs in FP32 and the other heads in that format. ``compile``: ``auto`` runs
    eagerly (compilation was not repaid on a CPU or an H100), ``True`` forces it. ``speculation``: how the edges into
    a receiver are batched (:mod:`~pahq_fx.acdc.speculation`): ``adaptive``, ``kept`` or ``removed``
    predict the decisions and evaluate several queries in one pass, the same circuit as ``off`` (one query at a
    time, the default); a :class:`~pahq_fx.acdc.speculation.Predictor` of one's own works too. See docs/acdc.md for
    the algorithm, docs/runtime.md for the runtime. ``storage``: how the runtime stores its caches and the senders'
    outputs (:mod:`~pahq_fx.acdc.storage`): ``fp32`` (exact, the default), ``bf16`` (half the bytes) or ``fp8``
    (a quarter, with a scale per row); the rounding is the stored outputs', never accumulated over the search.
    ``auto`` takes the most exact one whose planned peak at any threshold fits the device's free memory
    (:func:`~pahq_fx.acdc.plan.choose_storage`; ``precision_note`` says what was planned). ``receiver_inputs``:
    ``stored`` (every receiver's FP32 input kept in the state, the default) or ``recomputed`` (rebuilt from the
    removed and kept edges when a query reaches it: a smaller state, the same circuit to round-off); under
    ``storage="auto"`` left unset, the plan chooses it with the storage.

    Before searching, :func:`~pahq_fx.acdc.evaluation.check_task` measures the metric clean and with every edge
    patched (and the clean accuracy where the task has answers): where the corrupted prompts barely move the
    metric the circuit would mean nothing, and a :class:`WeakTaskError` stops the run, unless ``allow_weak_task`` (then a warning
    goes to stderr and the circuit's ``task_check`` carries it). With ``checkpoint=path`` the decisions are
    written after receivers (as often as keeps writing under 2% of the run), and the runtime's state beside them
    (:meth:`Checkpoint.save_state`, under the same budget); a run with the same arguments loads the state, replays
    the decisions taken after it and resumes, and both files are removed when
    the run has finished: once the circuit is saved to ``save_to`` where that is given (right after the search,
    before the faithfulness pass), otherwise once this function returns the circuit. With ``faithfulness``, the
    circuit alone is measured afterwards on the same runtime (no second trace, but a full patched pass on top of
    the caches: more peak memory than the search), in ``Circuit.faithfulness`` (and saved again to ``save_to``).
    """
    threshold = check_threshold(threshold)
    check_speculation(speculation)
    stored, inputs, storage_note = resolve_storage(storage, receiver_inputs, model, task, speculation != OFF)
    requested = AUTO if precision == AUTO else parse_format(precision).value

    def fingerprint_of(identity: dict[str, Any], parsed_metric: Metric) -> dict[str, Any]:
        return {
            "model": identity["fingerprint"],
            "task": task.fingerprint(),
            "threshold": threshold,
            "metric": parsed_metric.value,
            "precision": requested,
            "granularity": granularity,
            "abs": abs_threshold,
            **({"storage": stored.value} if stored is not Storage.FP32 else {}),
            **({"receiver_inputs": inputs.value} if inputs is not ReceiverInputs.STORED else {}),
        }

    path = Path(checkpoint) if checkpoint is not None else None
    identity = None  # hashing every weight is costly on a large model: once per run
    if path is not None and path.exists():  # another run's checkpoint is refused before the setup (minutes on a large model)
        identity = model_identity(model)
        saved = Checkpoint(path, fingerprint_of(identity, parse_metric(metric, task))).load()
        if saved is not None and precision == AUTO and "chosen_precision" in saved:
            precision = saved["chosen_precision"]  # a resumed run keeps the format its start measured
    session = prepare(
        model,
        task,
        metric=metric,
        precision=precision,
        granularity=granularity,
        compile=compile,
        allow_weak_task=allow_weak_task,
        identity=identity,
        storage=stored,
        receiver_inputs=inputs,
    )
    if requested == AUTO and not session.precision_note.startswith("auto:"):
        resumed = f"auto: {session.format.value}, as measured when this run started (resumed from {path})"
        session.precision_note = "; ".join(n for n in (resumed, session.precision_note) if n)
    session.precision_note = "; ".join(n for n in (session.precision_note, storage_note) if n)
    store = Checkpoint(path, fingerprint_of(session.identity, session.metric), chosen_precision=session.format.value)
    try:
        circuit = search(
            session,
            threshold,
            abs_threshold=abs_threshold,
            store=store,
            progress=progress,
            callback=callback,
            speculation=speculation,
        )
    except CheckpointError as error:  # the replay's checks know the decisions, not the file: name it
        raise CheckpointError(error if str(path) in str(error) else f"checkpoint {path}: {error}") from None
    # The search is the run's cost; what follows (faithfulness: the run's peak memory) may fail. So the circuit is
    # on disk first, and the checkpoint goes only once it is: a run that dies from here on loses nothing.
    if save_to is not None:
        circuit.save(save_to)
        store.finish()
    if faithfulness:
        circuit = dataclasses.replace(circuit, faithfulness=evaluate_edges(session.runtime, session.edges, circuit.edge_set()))
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
    identity: dict[str, Any] | None = None,
    storage: str | Storage = Storage.FP32,
    receiver_inputs: str | ReceiverInputs = ReceiverInputs.STORED,
) -> Session:
    """Check the arguments and the task (:class:`WeakTaskError` unless ``allow_weak_task``), time one eager
    forward, and build the runtime: trace, split, lower, clean and corrupted caches. ``identity``: the model's
    :func:`~pahq_fx.acdc.run_info.model_identity` where the caller has computed it already."""
    parsed_metric = parse_metric(metric, task)
    stored = Storage.parse(storage)
    inputs = ReceiverInputs.parse(receiver_inputs)
    check_float32_weights(model.parameters())  # before the task check and the trace
    check_finite_weights(model)
    device = task.clean_input_ids.device
    fmt = None if precision == AUTO else parse_format(precision)
    compiled, execution = resolve_compile(compile, device)
    check_vocabulary(model, task)
    task_check = check_task(model, task, parsed_metric)
    for value, where in (
        (task_check.full_model, "of the clean model"),
        (task_check.every_edge_patched, "with every edge patched"),
    ):
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the metric ({parsed_metric.value}) {where} is {value} on this task: the model's "
                "logits overflow or are not numbers on these prompts"
            )
    if task_check.weak:
        if not allow_weak_task:
            raise WeakTaskError(task_check.warning() + " Pass allow_weak_task=True (--allow-weak-task) to search anyway.")
        warnings.warn(task_check.warning(), stacklevel=3)
    forward_samples = eager_forward_seconds(model, task.clean_input_ids, repeats=3, warm_up=False)  # check_task warmed it
    start = time.perf_counter()
    if fmt is None:
        runtime, edges = build_runtime(model, task, parsed_metric, Format.FP32, granularity, compiled, stored, inputs)
        build_s = time.perf_counter() - start
        search_s = estimated_search_seconds(runtime.total_edges, statistics.median(forward_samples))
        if worth_measuring(build_s, search_s):
            runtime, edges, calibration = _calibrated_runtime(
                model, task, parsed_metric, granularity, compiled, (runtime, edges), stored, inputs
            )
            fmt, precision_note = calibration.chosen, calibration.note()
        else:
            fmt, precision_note = Format.FP32, unmeasured_note(build_s, search_s)
    else:
        runtime, edges = build_runtime(model, task, parsed_metric, fmt, granularity, compiled, stored, inputs)
        precision_note = ""
    precision_note = "; ".join(n for n in (precision_note, wide_weights_note(model.parameters())) if n)
    return Session(
        model,
        task,
        parsed_metric,
        fmt,
        precision_note,
        execution,
        runtime,
        edges,
        identity if identity is not None else model_identity(model),
        task_check,
        forward_samples,
        time.perf_counter() - start,
    )


def _calibrated_runtime(
    model: nn.Module,
    task: Task,
    metric: Metric,
    granularity: str,
    compiled: bool,
    fp32: tuple[PatchingRuntime, EdgeGraph],
    storage: Storage,
    inputs: ReceiverInputs,
) -> tuple[PatchingRuntime, EdgeGraph, Calibration]:
    """``precision="auto"``: a runtime in each format the device may run fast (``fp32``'s already built), a few
    queries timed in each (:mod:`~pahq_fx.acdc.calibration`); the chosen one's runtime. At most two runtimes are held
    at once, FP32's and one other, so a low-precision winner is built again unless it was the last one tried (on a
    CPU, bf16 is the only one: its probed runtime, reset by the probe, is the one that searches)."""
    receiver = probe_receiver(fp32[1])
    seconds = {Format.FP32: seconds_per_query(fp32[0], receiver)}
    failed: dict[Format, str] = {}
    last: tuple[Format, PatchingRuntime, EdgeGraph] | None = None

    def probed(fmt: Format) -> tuple[Format, PatchingRuntime, EdgeGraph]:
        runtime, edges = build_runtime(model, task, metric, fmt, granularity, compiled, storage, inputs)
        seconds[fmt] = seconds_per_query(runtime, probe_receiver(edges))
        return fmt, runtime, edges

    for fmt in formats_to_try(task.clean_input_ids.device)[1:]:
        last = None  # released before the next format's is built: each holds caches of its own
        try:
            last = probed(fmt)
        except (PahqError, RuntimeError) as error:  # a format this model or device cannot run: not a candidate
            failed[fmt] = str(error).splitlines()[0]
    calibration = Calibration(receiver.name, seconds, choose(seconds), failed)
    if calibration.chosen is Format.FP32:
        return (*fp32, calibration)
    if last is not None and last[0] is calibration.chosen:
        return last[1], last[2], calibration
    return (*build_runtime(model, task, metric, calibration.chosen, granularity, compiled, storage, inputs), calibration)


def resolve_storage(
    storage: str | Storage,
    receiver_inputs: str | ReceiverInputs | None,
    model: nn.Module,
    task: Task,
    speculation: bool = False,
) -> tuple[Storage, ReceiverInputs, str]:
    """``storage`` and ``receiver_inputs`` parsed (inputs stored where not given), or under ``auto`` chosen by the plan
    (:func:`~pahq_fx.acdc.plan.choose_storage`, inputs too where not given; ``speculation``: the run batches candidate
    queries), and the line that says why ("" where both were given)."""
    inputs = None if receiver_inputs is None else ReceiverInputs.parse(receiver_inputs)
    if isinstance(storage, str) and storage.lower() == AUTO_STORAGE:
        given = None if inputs is None else inputs.value
        chosen, chosen_inputs, note = choose_storage(model, task, receiver_inputs=given, speculation=speculation)
        return Storage(chosen), ReceiverInputs(chosen_inputs), note
    return Storage.parse(storage), inputs or ReceiverInputs.STORED, ""


def search(
    session: Session,
    threshold: float,
    *,
    abs_threshold: bool = False,
    store: Checkpoint | None = None,
    progress: bool = True,
    callback: Callable[[ReceiverDone], None] | None = None,
    speculation: str | Predictor = OFF,
) -> Circuit:
    """ACDC's greedy search at one threshold, from the runtime's current state (a fresh or reset runtime, or the
    state ``store`` holds), to a :class:`Circuit`. ``speculation``: see :func:`discover`."""
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
    predictor = speculation if isinstance(speculation, Predictor) else None
    kind = check_speculation(speculation)
    if predictor is None and kind is not None:
        predictor = Predictor(kind)
    if predictor is not None and not runtime.batches_candidates():
        predictor = None
    if state is not None:
        resume(runtime, edges, store, state)
        runtime.queries = int(state["queries"])
        runtime.evaluated = int(state.get("evaluated", state["queries"]))
        if predictor is not None and "predictor" in state:
            predictor.restore(state["predictor"])
    snapshot = None if predictor is None else predictor.state()
    resume_s = time.perf_counter() - start_time
    memory_limit = candidate_memory(runtime.device)
    eta = Eta(runtime, edges, statistics.median(session.forward_samples), attribute=progress or callback is not None)
    for row in range(len(done)):
        eta.finish(row, runtime.is_live(row), None)  # searched at its turn: its node's out-edges were decided before it
    bar = tqdm(
        total=eta.seconds_left(len(done)) or 0.0,
        disable=not progress,
        unit="s",
        desc="ACDC",
        smoothing=0,  # the bar counts predicted seconds of work (acdc/eta.py): its ETA is the predicted seconds left
        bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]",
    )
    loop_start, loop_queries = time.perf_counter(), runtime.queries
    finished_queries, finished_evaluated = runtime.queries, runtime.evaluated
    unfinished: int | None = None
    try:
        for r_index, receiver in enumerate(edges.receivers):
            if receiver.name in done:
                continue
            unfinished, receiver_start = r_index, time.perf_counter()
            searched = runtime.is_live(r_index)
            if predictor is None or not searched:
                _search_receiver(runtime, r_index, receiver, threshold, abs_threshold, effects)
            else:
                search_receiver(runtime, r_index, receiver, threshold, abs_threshold, effects, predictor, memory_limit)
            receiver_s = time.perf_counter() - receiver_start
            done.append(receiver.name)
            unfinished, finished_queries, finished_evaluated = None, runtime.queries, runtime.evaluated
            snapshot = None if predictor is None else predictor.state()
            if store.state_due():  # the state first, then the decisions that name it
                store.save_state(runtime, len(done))
                _save(store, runtime, done, effects, (finished_queries, finished_evaluated), None, snapshot)
            elif store.due():
                _save(store, runtime, done, effects, (finished_queries, finished_evaluated), None, snapshot)
            kept = runtime.kept_edges
            rate = (runtime.queries - loop_queries) / max(time.perf_counter() - loop_start - eta.attribution_s, 1e-9)
            bar.set_postfix(
                receivers=f"{len(done)}/{len(edges.receivers)}", edges_kept=kept, queries_per_s=f"{rate:.1f}", refresh=False
            )  # drawn at tqdm's own pace
            attributed = eta.attribution_s
            eta.finish(r_index, searched, receiver_s)
            if not bar.disable:  # tqdm's rate is search seconds over its elapsed time: the pass is not search
                bar.start_t += eta.attribution_s - attributed
                bar.last_print_t += eta.attribution_s - attributed  # (tqdm draws nothing at close if it precedes start)
            left = eta.seconds_left(r_index + 1)
            bar.initial = eta.restored_seconds()  # not this run's pace: tqdm's rate leaves it out
            bar.total = bar.initial + eta.seconds + (left or 0.0)
            bar.update(bar.initial + eta.seconds - bar.n)
            if callback is not None:
                callback(ReceiverDone(receiver.name, len(done), len(edges.receivers), kept, runtime.queries, left))
    except BaseException:
        # Interrupted (Ctrl-C, a callback's exception): keep every finished receiver, whatever the write budget said.
        _save(store, runtime, done, effects, (finished_queries, finished_evaluated), unfinished, snapshot)
        raise
    bar.close()
    search_s = time.perf_counter() - loop_start - eta.attribution_s
    setup = session.setup_s + resume_s + eta.attribution_s
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
        task={
            "name": task.name,
            "fingerprint": task.fingerprint(),
            "examples": task.n_examples,
            "seq_len": int(task.clean_input_ids.shape[1]),
        },
        stats=RunStats(
            setup + search_s,
            queries,
            (queries - loop_queries) / max(search_s, 1e-9),
            peak_memory_mb(runtime.device),
            runtime.compilations,
            setup,
            compile_s=runtime.compile_seconds,
            forward_s=forward_s,
            forward_equivalents=per_query / forward_s,
            state_bytes=runtime.state_bytes(),
            execution=session.execution,
            speculation=_speculation_note(speculation, predictor, runtime),
            evaluated=runtime.evaluated,
            hit_rate=None if predictor is None or not predictor.decided else predictor.hit_rate,
            candidates_per_batch=None if predictor is None else predictor.evaluated / max(predictor.batches, 1),
            near_threshold=None if predictor is None else predictor.near_threshold,
            storage=runtime.storage.value,
            receiver_inputs=runtime.receiver_inputs.value,
        ),
        total_edges=runtime.total_edges,
        versions=library_versions(),
        removed=removed_edges,
        groups=_kv_groups(edges),
        precision_note=session.precision_note,
        task_check=session.task_check.to_json(),
        architecture=_architecture(edges.head_graph),
    )


def _speculation_note(speculation: str | Predictor, predictor: Predictor | None, runtime: PatchingRuntime) -> str:
    """What the report says about batching: the predictor, or why queries ran one at a time."""
    if predictor is not None:
        return f"{predictor.kind.value} (up to {predictor.max_candidates} candidates per batch)"
    if speculation == OFF:
        return "off (one query at a time)"
    return f"off: candidate batches unavailable ({runtime.candidate_refusal})"


def _architecture(head_graph: HeadGraph) -> tuple[dict[str, Any], ...]:
    """Per attention layer, what the circuit file records for drawing it and for writing it as an EAP-IG graph:
    heads, key/value groups, post-attention norm, the number of whole components after it (``mlp``: any), whether
    the first of them reads the layer's attention (``parallel``: it does not, as in GPT-NeoX), and on the first
    layer those before it and the residual stream's width."""
    layers = tuple(
        {
            "heads": layer.n_heads,
            "kv_groups": layer.n_kv_groups,
            "mlp": layer.has_mlp,
            "components": len(layer.components),
            "output_norm": layer.has_output_norm,
            "parallel": layer.has_mlp
            and not {names.attention(layer.index), layer.output_norm_name} & set(layer.components[0].reads),
        }
        for layer in head_graph.layers
    )
    if layers:
        layers[0]["d_model"] = head_graph.d_model
    if head_graph.leading:
        layers[0]["leading"] = len(head_graph.leading)
    return layers


def _search_receiver(
    runtime: PatchingRuntime,
    r_index: int,
    receiver: Receiver,
    threshold: float,
    abs_threshold: bool,
    effects: dict[tuple[int, int], float],
) -> None:
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


def _save(
    store: Checkpoint,
    runtime: PatchingRuntime,
    done: list[str],
    effects: dict[tuple[int, int], float],
    counts: tuple[int, int],
    unfinished: int | None,
    predictor: dict[str, Any] | None,
) -> None:
    """The state after the last finished receiver: the decisions of ``unfinished`` (the receiver being searched, whose
    removals all go into its own row) are left out, to be taken again on resume; ``predictor`` is the predictor's
    state after that receiver."""
    removed = sorted((row, s) for row, s in runtime.removed if row != unfinished)
    queries, evaluated = counts  # queries decided and evaluated after that receiver
    store.save(done, removed, {k: e for k, e in effects.items() if k[0] != unfinished}, queries, evaluated, predictor)


def _kv_groups(edges: EdgeGraph) -> dict[str, list[str]]:
    """Under grouped-query attention: each key/value group node and the query heads it feeds."""
    groups = {}
    for layer in edges.head_graph.layers:
        if layer.grouped:
            for g in range(layer.n_kv_groups):
                heads = [layer.head_name(h) for h in range(layer.n_heads) if layer.kv_group_of_head[h] == g]
                groups[names.kv_group(layer.index, g)] = heads
    return groups
