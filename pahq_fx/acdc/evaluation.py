"""How good a circuit is, and whether a task exercises the model at all (both in FP32, on the original weights)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PahqError, TaskError
from ..metrics import CleanDistribution, Metric, metric_value
from ..model_io import model_logits
from ..passes.precision import Format, all_heads_fp32
from ..passes.weights import check_finite_weights
from .edges import EdgeGraph
from .runtime import PatchingRuntime
from .setup import build_runtime, parse_metric
from .task import Task

# Below this a metric's movement is numerical noise (KL in nats, logit or probability differences): nothing to explain.
MIN_MOVEMENT = 1e-3


@dataclass(frozen=True)
class Faithfulness:
    """Metric of the circuit alone (every other edge patched) next to the full model's, both in FP32."""

    metric: str
    circuit: float
    full_model: float
    empty_circuit: float

    @property
    def normalised(self) -> float:
        """The circuit's share of the full model's behaviour: 1 as good as the full model, 0 as the empty circuit."""
        return normalised_faithfulness(self.circuit, self.full_model, self.empty_circuit)

    def describe(self) -> str:
        return (
            f"{self.metric}: circuit {self.circuit:.4g}, full model {self.full_model:.4g}, "
            f"every edge patched {self.empty_circuit:.4g} (normalised faithfulness {self.normalised:.3f})"
        )


def evaluate_circuit(
    kept: set[tuple[str, str]], model: nn.Module, task: Task, metric: str | Metric = "kl", found_on: dict[str, Any] | None = None
) -> Faithfulness:
    """Run the circuit given by its kept (sender, receiver) edges alone in FP32, and compare with the full model
    and with nothing kept. ``found_on`` (a :class:`Circuit`'s ``model``) names where the circuit came from in the
    error that edges this model lacks raise; for a circuit read from an EAP-IG file it holds the file's cfg, which
    must be this model's."""
    metric = parse_metric(metric, task)
    check_finite_weights(model)
    runtime, edges = build_runtime(model, task, metric, Format.FP32, "per_row", compile=False)
    known = found_on or {}
    if "eap_cfg" in known:  # read from an EAP-IG file: checked against this model, key/value edges onto its groups
        from .eap_graph import fit_to_model

        kept = fit_to_model(kept, known, edges.head_graph)
    this = f"this model ({_described(type(model).__name__, getattr(getattr(model, 'config', None), '_name_or_path', ''))})"
    circuit = (
        f"the circuit (found on {_described(known['class'], known.get('name', ''))})" if known.get("class") else "the circuit"
    )
    return evaluate_edges(runtime, edges, kept, circuit=circuit, model=this)


def _described(cls: str, name: str) -> str:
    return f"{cls} {name!r}" if name and name != cls else cls


def evaluate_edges(
    runtime: PatchingRuntime,
    edges: EdgeGraph,
    kept: set[tuple[str, str]],
    *,
    circuit: str = "the circuit",
    model: str = "this model",
) -> Faithfulness:
    """:func:`evaluate_circuit` on an existing runtime, which it resets; every head in FP32 whatever its format."""
    return evaluate_edge_sets(runtime, edges, [kept], circuit=circuit, model=model)[0]


def evaluate_edge_sets(
    runtime: PatchingRuntime,
    edges: EdgeGraph,
    circuits: Sequence[set[tuple[str, str]]],
    *,
    circuit: str = "the circuit",
    model: str = "this model",
) -> list[Faithfulness]:
    """:func:`evaluate_edges` for several circuits from one full-model state (a faithfulness curve's circuits): each
    is one patched pass, every edge outside it removed, rolled back before the next."""
    names = [(edges.senders[s].name, r.name) for r in edges.receivers for s in r.senders]
    for kept in circuits:
        unknown = kept - set(names)
        if unknown:
            count = f"{len(unknown)} edge" + ("s" if len(unknown) > 1 else "")
            raise PahqError(f"{circuit} has {count} that {model} does not have: {sorted(unknown)[:5]}")
    with torch.no_grad(), all_heads_fp32(runtime.graph):
        runtime.reset()
        full_model = runtime.run_from(0)
        every_edge = {i: list(r.senders) for i, r in enumerate(edges.receivers)}
        values = []
        for kept in circuits:
            outside = {
                i: [s for s in senders if (edges.senders[s].name, edges.receivers[i].name) not in kept]
                for i, senders in every_edge.items()
            }
            values.append(runtime.try_remove_edges({i: s for i, s in outside.items() if s}))
            runtime.rollback()
        empty = runtime.try_remove_edges(every_edge)
        runtime.rollback()
        runtime.reset()
    metric = runtime.metric_kind.value
    return [Faithfulness(metric=metric, circuit=v, full_model=full_model, empty_circuit=empty) for v in values]


def normalised_faithfulness(circuit: float, full_model: float, empty_circuit: float) -> float:
    """``(m(C) - m(empty)) / (m(full) - m(empty))``: 1 for the full model, 0 for the empty circuit, whichever way the
    metric points (NaN when full and empty agree, where there is nothing to normalise by)."""
    span = full_model - empty_circuit
    return (circuit - empty_circuit) / span if span != 0 else float("nan")


class WeakTaskError(TaskError):
    """The corrupted prompts barely move the metric (or the model cannot do the task): a circuit would mean nothing."""


@dataclass(frozen=True)
class TaskCheck:
    """The metric with nothing patched and with every edge patched (the corrupted run), and, where the task has
    answers, the fraction of examples where the clean model prefers the correct answer to the incorrect one."""

    metric: str
    full_model: float
    every_edge_patched: float
    clean_accuracy: float | None

    @property
    def movement(self) -> float:
        """How far patching everything moves the metric: the most any circuit search can explain."""
        return self.every_edge_patched - self.full_model

    @property
    def problems(self) -> list[str]:
        """Why a circuit on this task would mean nothing (empty when the task is fine)."""
        if abs(self.movement) >= MIN_MOVEMENT:
            return []
        accuracy = (
            ""
            if self.clean_accuracy is None
            else f" (the clean model prefers the correct answer in {self.clean_accuracy:.0%} of the examples)"
        )
        problem = (
            f"the corrupted prompts barely move the metric: {self.metric} goes from {self.full_model:.4g} (clean) to "
            f"{self.every_edge_patched:.4g} with every edge patched, a change of {self.movement:.3g}, smaller than "
            f"{MIN_MOVEMENT:g}{accuracy}"
        )
        return [problem]

    @property
    def weak(self) -> bool:
        return bool(self.problems)

    def describe(self) -> str:
        accuracy = "" if self.clean_accuracy is None else f", clean accuracy {self.clean_accuracy:.0%}"
        return f"{self.metric}: clean {self.full_model:.4g}, every edge patched {self.every_edge_patched:.4g}{accuracy}"

    def warning(self) -> str:
        return (
            "this task does not exercise the model, so the circuit would be meaningless: "
            + "; ".join(self.problems)
            + ". Check that the model can do the task and that the corrupted prompts change what it must compute."
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "movement": self.movement, "problems": self.problems}


@torch.no_grad()
def check_task(model: nn.Module, task: Task, metric: str | Metric) -> TaskCheck:
    """Two eager forwards of the original model: clean and corrupted (every edge patched is the corrupted run)."""
    metric = parse_metric(metric, task)
    mask = task.metric_mask
    clean = model_logits(model, task.clean_input_ids)[mask].float()
    corrupted = model_logits(model, task.corrupted_input_ids)[mask].float()
    correct, incorrect = task.answers_at_metric_positions()
    reference = CleanDistribution.of(clean)
    accuracy = None
    if correct is not None and incorrect is not None:
        preferred = clean.gather(-1, correct.view(-1, 1)) > clean.gather(-1, incorrect.view(-1, 1))
        accuracy = float(preferred.float().mean())
    return TaskCheck(
        metric=metric.value,
        full_model=float(metric_value(metric, clean, reference, correct, incorrect)),
        every_edge_patched=float(metric_value(metric, corrupted, reference, correct, incorrect)),
        clean_accuracy=accuracy,
    )
