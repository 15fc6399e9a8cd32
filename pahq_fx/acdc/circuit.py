"""The result of circuit discovery: edges with their measured effect, the run's settings and measurements."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import CircuitFormatError, PahqError
from ..ir.head_graph import HeadGraph
from ..ir.names import NodeKind, identifier, node_of, parse
from .circuit_file import check_circuit_data
from .evaluation import Faithfulness, evaluate_circuit


@dataclass(frozen=True)
class CircuitEdge:
    """An edge kept in the circuit: the metric rose by ``effect`` when it was patched."""

    sender: str
    receiver: str
    effect: float


@dataclass(frozen=True)
class RunStats:
    """``wall_s`` is the whole call; ``setup_s`` of it went to tracing, splitting, lowering and the clean and
    corrupted caches; ``queries_per_second`` counts only the search (wall minus setup)."""

    wall_s: float
    queries: int
    queries_per_second: float
    peak_memory_mb: float
    compilations: int
    setup_s: float = 0.0
    compile_s: float = 0.0  # time spent inside torch.compile (part of the search when compiled)
    forward_s: float = 0.0  # one eager forward of the original model on the clean batch, measured in the same run
    forward_equivalents: float = 0.0  # (search seconds per query) / forward_s: docs/runtime.md's measure
    state_bytes: int = 0  # bytes of the runtime's caches and state
    execution: str = ""  # eager or compiled, and why
    speculation: str = ""  # how edge queries were batched (the predictor), or why they were not
    evaluated: int = 0  # queries computed: ``queries`` (decided) plus speculative candidates whose result was dropped
    hit_rate: float | None = None  # share of the predictor's guesses that the decisions confirmed
    candidates_per_batch: float | None = None
    near_threshold: int | None = None  # decisions within round-off of the threshold (either way under round-off)
    storage: str = "fp32"  # how the caches and the senders' outputs were stored (pahq_fx.acdc.storage)
    receiver_inputs: str = "stored"  # receivers' inputs stored, or recomputed when reached (pahq_fx.acdc.runtime.inputs)


@dataclass(frozen=True)
class Circuit:
    edges: tuple[CircuitEdge, ...]
    threshold: float
    metric: str
    precision: str
    abs_threshold: bool
    model: dict[str, Any]
    task: dict[str, Any]
    stats: RunStats
    total_edges: int
    versions: dict[str, str] = field(default_factory=dict)
    removed: tuple[CircuitEdge, ...] = ()  # edges tested and removed, with their effect (pruned ones are not tested)
    groups: dict[str, list[str]] = field(default_factory=dict)  # key/value group node -> the heads it feeds (GQA)
    precision_note: str = ""  # why this precision (the device's choice under precision="auto")
    task_check: dict[str, Any] = field(default_factory=dict)  # metric clean / all patched, accuracy, problems found
    # Per attention layer: {"heads": n, "kv_groups": g, "mlp": bool, "output_norm": bool}, so a drawing can show the
    # whole model.
    architecture: tuple[dict[str, Any], ...] = ()
    # The circuit alone (every other edge patched, all heads FP32) next to the full and the empty model, measured on
    # the run's own runtime after the search (discover(faithfulness=True), sweeps; not part of the run's timings).
    faithfulness: Faithfulness | None = None

    @property
    def nodes(self) -> list[str]:
        """Node names the circuit uses (senders, receivers folded onto their node, heads fed by a used
        key/value group), sorted."""
        used = {e.sender for e in self.edges} | {node_of(e.receiver) for e in self.edges}
        for group, heads in self.groups.items():
            if group in used:
                used |= set(heads)
        return sorted(used)

    def measured_faithfulness(self) -> Faithfulness:
        """``faithfulness`` where the caller needs it measured (``discover(faithfulness=True)``, a sweep's circuits)."""
        if self.faithfulness is None:
            raise PahqError("this circuit's faithfulness was not measured (discover(..., faithfulness=True) measures it)")
        return self.faithfulness

    def edge_set(self) -> set[tuple[str, str]]:
        return {(e.sender, e.receiver) for e in self.edges}

    def jaccard(self, other: Circuit) -> float:
        """Edge-set agreement with another circuit (1.0 when both are empty)."""
        a, b = self.edge_set(), other.edge_set()
        return 1.0 if not a | b else len(a & b) / len(a | b)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["edges"] = [asdict(e) for e in self.edges]
        data["removed"] = [asdict(e) for e in self.removed]
        data["format"] = "pahq_fx.Circuit/1"
        return data

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """A circuit written by :meth:`save`; a file that is not one (a field missing or of the wrong type, a node
        name that is not canonical, a node outside the recorded architecture) is a one-line
        :class:`CircuitFormatError` naming the field."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as error:
            raise CircuitFormatError(f"{path} is not a circuit file written by pahq_fx: {error}") from None
        check_circuit_data(data, str(path))
        try:
            return cls(
                edges=tuple(CircuitEdge(**e) for e in data["edges"]),
                threshold=float(data["threshold"]),
                metric=data["metric"],
                precision=data["precision"],
                abs_threshold=bool(data["abs_threshold"]),
                model=data["model"],
                task=data["task"],
                stats=RunStats(**data["stats"]),
                total_edges=int(data["total_edges"]),
                versions=data.get("versions", {}),
                removed=tuple(CircuitEdge(**e) for e in data.get("removed", [])),
                groups=data.get("groups", {}),
                precision_note=data.get("precision_note", ""),
                task_check=data.get("task_check", {}),
                architecture=tuple(data.get("architecture", ())),
                faithfulness=Faithfulness(**data["faithfulness"]) if data.get("faithfulness") else None,
            )
        except (ValueError, KeyError, TypeError) as error:
            raise CircuitFormatError(f"{path} is not a circuit file written by pahq_fx: {error}") from None

    def ranked_edges(self) -> list[CircuitEdge]:
        """The edges by the size of their effect, largest first (a NaN effect last)."""
        return sorted(self.edges, key=lambda e: (math.isnan(e.effect), -abs(e.effect) if not math.isnan(e.effect) else 0.0))

    def to_dot(self) -> str:
        """Graphviz DOT text of the circuit (no Graphviz needed to produce it): the circuit's edges and their
        endpoints only. Under grouped-query attention a key/value group and the heads of it that the circuit uses
        sit in a cluster whose label names every head the group feeds."""
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fillcolor=white];']
        ends = {e.sender for e in self.edges} | {node_of(e.receiver) for e in self.edges}
        for node in sorted(ends):
            colour = {
                NodeKind.MLP: "lightyellow",
                NodeKind.ATTENTION_OUTPUT: "lavender",
                NodeKind.EMBED: "lightgrey",
                NodeKind.RESID_POST: "lightgrey",
            }.get(parse(node).kind, "lightblue")
            lines.append(f'  "{node}" [fillcolor={colour}];')
        for group, heads in sorted(self.groups.items()):
            if group in ends:
                members = " ".join(f'"{n}";' for n in [group, *(h for h in heads if h in ends)])
                lines.append(
                    f'  subgraph "cluster_{identifier(group)}" {{ label="{group}: keys and values of {", ".join(heads)}"; '
                    f"style=dashed; color=grey; {members} }}"
                )
        for e in sorted(self.edges, key=lambda e: (e.receiver, e.sender)):
            role = parse(e.receiver).role
            label = f' [label="{role.value} {e.effect:.3g}"]' if role else f' [label="{e.effect:.3g}"]'
            lines.append(f'  "{e.sender}" -> "{node_of(e.receiver)}"{label};')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def draw(self, path: str | Path, *more: str | Path, top_k: int | None = 50, min_effect: float = 0.0) -> Path:
        """A layered picture of the circuit, PNG or SVG by the suffix (matplotlib; no Graphviz needed), written
        to ``path`` and to every further path in ``more`` from one layout. Returns ``path``. It draws the ``top_k``
        edges of largest effect (``None``: every edge) among those whose effect is at least ``min_effect``, and
        notes how many it left out: past a few dozen edges a picture of all of them is unreadable."""
        from .drawing import draw_circuit

        return draw_circuit(self, path, *more, top_k=top_k, min_effect=min_effect)[0]

    def evaluate(self, model: Any, task: Any, metric: str | None = None) -> Faithfulness:
        """Metric of this circuit alone (every other edge patched) next to the full model's, in FP32; ``metric``
        defaults to the circuit's own (``kl`` for a circuit read from an EAP-IG file)."""
        return evaluate_circuit(self.edge_set(), model, task, metric or self.metric, found_on=self.model)

    def to_eap_json(self, path: str | Path, head_graph: HeadGraph | None = None) -> Path:
        """Write the circuit as an EAP-IG / MIB graph (``Graph.to_json``'s layout): every edge of the model's graph,
        ``in_graph`` for the circuit's, scored with the measured effects (docs/mib.md). ``head_graph``: the model's;
        without it, the layout this circuit's file records (a run of this pahq_fx records it)."""
        from .eap_graph import layout_of, layout_of_circuit, write_json

        return write_json(self, path, layout_of(head_graph) if head_graph is not None else layout_of_circuit(self))

    def to_eap_pt(self, path: str | Path, head_graph: HeadGraph | None = None) -> Path:
        """:meth:`to_eap_json` in EAP-IG's ``Graph.to_pt`` layout (``torch.save`` of plain tensors and dicts)."""
        from .eap_graph import layout_of, layout_of_circuit, write_pt

        return write_pt(self, path, layout_of(head_graph) if head_graph is not None else layout_of_circuit(self))

    def summary(self) -> str:
        s = self.stats
        return (
            f"{len(self.edges)}/{self.total_edges} edges kept, {len(self.nodes)} nodes "
            f"(metric={self.metric}, threshold={self.threshold:g}, precision={self.precision}); "
            f"{s.queries} queries in {s.wall_s:.1f}s ({s.setup_s:.1f}s setup, {s.queries_per_second:.1f} queries/s, "
            f"{s.forward_equivalents:.3g} forward-equivalents per query), {s.execution or 'eager'}, "
            f"{s.compilations} compilations, peak RSS {s.peak_memory_mb:.0f} MB{self._speculation_summary()}"
        )

    def _speculation_summary(self) -> str:
        s = self.stats
        if s.hit_rate is None:
            return f"; speculation {s.speculation}" if s.speculation else ""
        return (
            f"; speculation {s.speculation}: {s.evaluated} queries evaluated for {s.queries} decided, "
            f"{s.candidates_per_batch:.1f} per batch, predictor hit rate {s.hit_rate:.0%}, "
            f"{s.near_threshold} decisions within round-off of the threshold"
        )
