"""EAP-IG / MIB graphs: their layout, checked against a model, and their files' edge values, read and written.

(:mod:`pahq_fx.acdc.eap` turns what a file holds into a :class:`~pahq_fx.acdc.circuit.Circuit`.)

EAP-IG's ``Graph`` (hannamw/EAP-IG, which MIB's circuit track loads) is fixed by four settings, its ``cfg``:
``n_layers``, ``n_heads``, ``parallel_attn_mlp`` and ``d_model``. Every layer has ``n_heads`` heads, each with its
own query, key and value input, and one MLP; ``input`` (the embedding) and ``logits`` (the final residual stream)
close it. A file lists every edge of that graph with ``in_graph`` and ``score``. The mapping of single names is
:mod:`pahq_fx.ir.names`; this module adds what needs the whole graph:

- **Grouped keys and values.** EAP-IG, like MIB's TransformerLens models (``ungroup_grouped_query_attention``), has
  a key and a value input per query head. Writing, a group edge ``s -> a{L}.g{G}.k`` becomes ``s -> a{L}.h{H}<k>``
  for every head ``H`` of the group, each ``in_graph`` as the group edge and scored its effect divided by the
  group's size; reading, a group edge is in the circuit if any of its heads' edges is (a warning counts the groups
  a file splits), and its score is the sum of theirs. Scores are effects of patching, and the effect of patching a
  group's input is, to first order, the sum of patching each head's copy: sum and share are inverse (to one
  rounding), and a top-n over a written file ranks each copy by its part.
- **Scores.** A written edge's score is pahq_fx's measured effect (the metric's rise when the edge alone is
  patched, for kept and for tested removed edges); an edge never tested (its receiver pruned) gets 0, EAP-IG's own
  score of an unscored edge. Reading, edges in the graph are the circuit's, and edges outside it with a nonzero
  score its tested removals.
- **What it cannot express**: neuron-level circuits, post-attention norms (``a{L}.out``), a hybrid's extra
  components (``m{L}.{K}``, ``m-1``), layers without an MLP or with differing head counts are a
  :class:`CircuitFormatError` naming them.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_bytes, write_text
from ..errors import CircuitFormatError
from ..ir import names
from ..ir.head_graph import HeadGraph
from ..ir.names import NodeKind, Role
from .edges import EdgeGraph

if TYPE_CHECKING:
    from .circuit import Circuit
CFG_KEYS = ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")
PT_KEYS = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
FORMAT = "EAP-IG"


def cfg_settings(cfg: Any, source: str = "the graph") -> tuple[int, int, bool, int]:
    """A cfg's ``n_layers``, ``n_heads``, ``parallel_attn_mlp`` and ``d_model``, each of the type EAP-IG writes (sizes
    positive integers, the flag a boolean): a one-line :class:`CircuitFormatError` naming the first that is not."""
    if not isinstance(cfg, dict):
        raise CircuitFormatError(f"{source}: its cfg must be an object with {', '.join(CFG_KEYS)}, got {type(cfg).__name__}")
    missing = [key for key in CFG_KEYS if key not in cfg]
    if missing:
        raise CircuitFormatError(f"{source}: its cfg lacks {', '.join(missing)} (EAP-IG's cfg has {', '.join(CFG_KEYS)})")
    for key in ("n_layers", "n_heads", "d_model"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CircuitFormatError(f"{source}: its cfg has {key}={value!r}: it must be a positive integer")
    if not isinstance(cfg["parallel_attn_mlp"], bool):
        flag = cfg["parallel_attn_mlp"]
        raise CircuitFormatError(f"{source}: its cfg has parallel_attn_mlp={flag!r}: it must be true or false")
    return cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"], cfg["d_model"]


def edge_count(n_layers: int, n_heads: int, parallel: bool) -> int:
    """How many edges :meth:`EapLayout.edges` lists, by arithmetic: a file's size is checked against its cfg before a
    graph of that cfg (which a forged cfg could make astronomically large) is built."""
    streams = n_layers + (n_heads + 1) * n_layers * (n_layers - 1) // 2  # senders before each layer, summed
    return (3 * n_heads + 1) * streams + (0 if parallel else n_layers * n_heads) + 1 + n_layers * (n_heads + 1)


def node_counts(n_layers: int, n_heads: int) -> tuple[int, int]:
    """How many source and destination nodes :meth:`EapLayout.src_nodes` and :meth:`EapLayout.dst_nodes` list."""
    return 1 + n_layers * (n_heads + 1), n_layers * (3 * n_heads + 1) + 1


@dataclass(frozen=True)
class EapLayout:
    """An EAP-IG graph and the model's key/value groups: ``groups[L]`` is the group of each head of layer ``L``,
    ``None`` where heads have their own keys and values (every layer when the groups are not known)."""

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool
    d_model: int
    groups: tuple[tuple[int, ...] | None, ...]

    @classmethod
    def from_cfg(cls, cfg: Any) -> EapLayout:
        """The layout a file's cfg describes, without groups (an EAP-IG file does not record them)."""
        n_layers, n_heads, parallel, d_model = cfg_settings(cfg)
        return cls(n_layers, n_heads, parallel, d_model, (None,) * n_layers)

    @property
    def cfg(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "parallel_attn_mlp": self.parallel_attn_mlp,
            "d_model": self.d_model,
        }

    def src_nodes(self) -> list[str]:
        """EAP-IG's forward (sender) order: ``input``, then per layer its heads and its MLP."""
        out = [names.EAP_INPUT]
        for layer in range(self.n_layers):
            out += [names.head(layer, h) for h in range(self.n_heads)] + [names.mlp(layer)]
        return out

    def dst_nodes(self) -> list[str]:
        """EAP-IG's backward (receiver) order: per layer every head's query, then key, then value input, then its MLP;
        ``logits`` last."""
        out = []
        for layer in range(self.n_layers):
            out += [f"{names.head(layer, h)}<{role}>" for role in "qkv" for h in range(self.n_heads)] + [names.mlp(layer)]
        return [*out, names.EAP_LOGITS]

    def edges(self) -> list[tuple[str, str]]:
        """Every edge as (parent, child) in the order EAP-IG builds them (its files list them so)."""
        out: list[tuple[str, str]] = []
        stream = [names.EAP_INPUT]
        for layer in range(self.n_layers):
            heads = [names.head(layer, h) for h in range(self.n_heads)]
            mlp = names.mlp(layer)
            for parent in stream:
                out += [(parent, f"{head}<{role}>") for head in heads for role in "qkv"]
                if self.parallel_attn_mlp:
                    out.append((parent, mlp))
            if not self.parallel_attn_mlp:
                out += [(parent, mlp) for parent in [*stream, *heads]]
            stream += [*heads, mlp]
        return out + [(parent, names.EAP_LOGITS) for parent in stream]

    def receiver(self, receiver: str) -> str:
        """The model's receiver of a per-head one: ``a1.h3.k`` -> ``a1.g1.k`` where head 3 of layer 1 reads group 1's
        keys; anything else unchanged."""
        parsed = names.parse(receiver)
        if parsed.kind is not NodeKind.HEAD or parsed.role is None or parsed.role is Role.QUERY:
            return receiver
        layer, head = parsed.unit
        groups = self.groups[layer]
        return receiver if groups is None else names.attention_input(names.kv_group(layer, groups[head]), parsed.role)

    def share(self, receiver: str) -> int:
        """How many per-head EAP-IG edges one edge into ``receiver`` becomes: a group's size, else 1."""
        parsed = names.parse(receiver)
        if parsed.kind is not NodeKind.KV_GROUP:
            return 1
        layer, group = parsed.unit
        groups = self.groups[layer]
        if groups is None:
            raise CircuitFormatError(f"{receiver} names a key/value group of layer {layer}, which has none")
        return groups.count(group)

    @functools.cached_property
    def translation(self) -> dict[tuple[str, str], tuple[str, str]]:
        """Every EAP-IG edge (parent, child), in EAP-IG's order, to pahq_fx's (sender, receiver): built once, since
        a large model has millions of edges."""
        receivers: dict[str, str] = {}
        out = {}
        for parent, child in self.edges():
            sender, receiver = names.from_eap_edge(f"{parent}->{child}")
            if receiver not in receivers:
                receivers[receiver] = self.receiver(receiver)
            out[(parent, child)] = sender, receivers[receiver]
        return out

    def canonical_edges(self) -> list[tuple[str, str]]:
        """pahq_fx's edges of this graph, each once, in EAP-IG's order of their first per-head edge."""
        return list(dict.fromkeys(self.translation.values()))


def layout_of(head_graph: HeadGraph) -> EapLayout:
    """The EAP-IG graph of a split model, checked edge for edge against pahq_fx's graph of it; what the format cannot
    express is a :class:`CircuitFormatError` naming it."""
    for component in head_graph.leading:
        names.eap_node(component.name)
    for layer in head_graph.layers:
        if layer.has_output_norm:
            names.eap_node(layer.output_norm_name)
        if len(layer.components) != 1:
            _no_single_mlp(layer.index, [c.name for c in layer.components])
    layout = _layout(
        [layer.n_heads for layer in head_graph.layers],
        [not {names.attention(layer.index)} & set(layer.components[0].reads) for layer in head_graph.layers],
        head_graph.d_model,
        [layer.kv_group_of_head if layer.grouped else None for layer in head_graph.layers],
    )
    ours = {(e.sender, e.receiver) for e in EdgeGraph(head_graph).edges()}
    theirs = set(layout.canonical_edges())
    if ours != theirs:
        only_ours, only_theirs = sorted(ours - theirs)[:3], sorted(theirs - ours)[:3]
        raise CircuitFormatError(
            f"this model's edges differ from an EAP-IG graph with cfg {layout.cfg}: only in the model {only_ours}, "
            f"only in the EAP-IG graph {only_theirs}"
        )
    return layout


def layout_of_circuit(circuit: Circuit) -> EapLayout:
    """The EAP-IG graph of the model a circuit was found on, from what its file records (``architecture`` and
    ``groups``)."""
    layers = circuit.architecture
    if not layers or any("parallel" not in layer for layer in layers) or "d_model" not in layers[0]:
        raise CircuitFormatError(
            "this circuit does not record its model's layout (written by an older pahq_fx, or loaded from another "
            "format): pass the model's head_graph"
        )
    if layers[0].get("leading"):
        names.eap_node(names.mlp(-1))
    for index, layer in enumerate(layers):
        if layer.get("output_norm"):
            names.eap_node(names.attention_output(index))
        if layer.get("components", int(layer["mlp"])) != 1:
            _no_single_mlp(index, [names.mlp(index, k) for k in range(layer.get("components", int(layer["mlp"])))])
    groups: list[list[int] | None] = [None] * len(layers)
    for group, heads in circuit.groups.items():
        at, index = names.parse(group).unit
        members = groups[at] = groups[at] or [0] * layers[at]["heads"]
        for head in heads:
            members[names.parse(head).unit[1]] = index
    return _layout(
        [layer["heads"] for layer in layers],
        [bool(layer["parallel"]) for layer in layers],
        int(layers[0]["d_model"]),
        [tuple(g) if g is not None else None for g in groups],
    )


def _no_single_mlp(layer: int, components: list[str]) -> None:
    if len(components) > 1:
        names.eap_node(components[1])
    raise CircuitFormatError(f"attention layer {layer} has no MLP: EAP-IG/MIB graphs have one MLP m{{L}} per layer")


def _layout(heads: list[int], parallel: list[bool], d_model: int, groups: list[tuple[int, ...] | None]) -> EapLayout:
    if len(set(heads)) > 1:
        raise CircuitFormatError(f"layers have {sorted(set(heads))} heads: an EAP-IG graph has one n_heads for every layer")
    if len(set(parallel)) > 1:
        raise CircuitFormatError("some layers run attention and MLP in parallel, others not: EAP-IG has one parallel_attn_mlp")
    return EapLayout(len(heads), heads[0], parallel[0], d_model, tuple(groups))


@dataclass(frozen=True)
class EdgeValues:
    """What a file says of each EAP-IG edge: its score and whether it is in the graph."""

    cfg: dict[str, Any]
    scores: dict[str, float]
    in_graph: dict[str, bool]


def edge_values(circuit: Circuit, layout: EapLayout) -> EdgeValues:
    """Every EAP-IG edge of ``layout`` with the circuit's score and membership (module docstring: the rules)."""
    kept = {(e.sender, e.receiver): e.effect for e in circuit.edges}
    tested = {(e.sender, e.receiver): e.effect for e in circuit.removed}
    unknown = (kept.keys() | tested.keys()) - set(layout.canonical_edges())
    if unknown:
        first = sorted(unknown)[0]
        for node in (first[0], names.node_of(first[1])):
            if names.parse(node).kind is not NodeKind.KV_GROUP:
                names.eap_node(node)
        raise CircuitFormatError(f"the circuit has {len(unknown)} edges an EAP-IG graph with cfg {layout.cfg} lacks: {first}")
    scores, in_graph = {}, {}
    shares: dict[str, int] = {}
    for (parent, child), edge in layout.translation.items():
        name = f"{parent}->{child}"
        in_graph[name] = edge in kept
        effect = kept.get(edge, tested.get(edge, 0.0))
        if edge[1] not in shares:
            shares[edge[1]] = layout.share(edge[1])
        scores[name] = effect / shares[edge[1]]
    return EdgeValues(layout.cfg, scores, in_graph)


def score_values(scores: dict[tuple[str, str], float], layout: EapLayout) -> EdgeValues:
    """Every EAP-IG edge of ``layout`` scored and in the graph: an importance file, as MIB's evaluation reads one. A key
    or value group edge's score is shared among its heads (module docstring); an edge ``scores`` lacks scores 0."""
    values: dict[str, float] = {}
    shares: dict[str, int] = {}
    for (parent, child), edge in layout.translation.items():
        if edge[1] not in shares:
            shares[edge[1]] = layout.share(edge[1])
        values[f"{parent}->{child}"] = scores.get(edge, 0.0) / shares[edge[1]]
    return EdgeValues(layout.cfg, values, dict.fromkeys(values, True))


def graph_json(values: EdgeValues, layout: EapLayout) -> dict[str, Any]:
    """EAP-IG's ``Graph.to_json`` layout: ``cfg``, ``nodes`` (``in_graph``), ``edges`` (``score``, ``in_graph``)."""
    used = _used_nodes(values)
    nodes = {node: {"in_graph": node in used} for node in layout.src_nodes()}
    nodes[names.EAP_LOGITS] = {"in_graph": True}  # EAP-IG's logits node is always in the graph
    edges = {name: {"score": score, "in_graph": values.in_graph[name]} for name, score in values.scores.items()}
    return {"cfg": values.cfg, "nodes": nodes, "edges": edges}


def write_json(circuit: Circuit, path: str | Path, layout: EapLayout) -> Path:
    """The circuit in EAP-IG's ``Graph.to_json`` layout (:func:`graph_json`)."""
    return write_text(path, json.dumps(graph_json(edge_values(circuit, layout), layout)))


def write_pt(circuit: Circuit, path: str | Path, layout: EapLayout) -> Path:
    """EAP-IG's ``Graph.to_pt`` layout: ``cfg``, ``src_nodes``, ``dst_nodes``, and float32 ``edges_scores`` / bool
    ``edges_in_graph`` matrices (source by destination; 0 / False where no edge runs) and ``nodes_in_graph``."""
    import io

    import torch

    values = edge_values(circuit, layout)
    src, dst = layout.src_nodes(), layout.dst_nodes()
    row, column = {n: i for i, n in enumerate(src)}, {n: i for i, n in enumerate(dst)}
    scores = torch.zeros(len(src), len(dst))
    in_graph = torch.zeros(len(src), len(dst), dtype=torch.bool)
    for parent, child in layout.edges():
        name = f"{parent}->{child}"
        scores[row[parent], column[child]] = values.scores[name]
        in_graph[row[parent], column[child]] = values.in_graph[name]
    used = _used_nodes(values)
    nodes = torch.tensor([node in used for node in src], dtype=torch.bool)
    buffer = io.BytesIO()
    torch.save(
        {
            "cfg": values.cfg,
            "src_nodes": src,
            "dst_nodes": dst,
            "edges_scores": scores,
            "edges_in_graph": in_graph,
            "nodes_in_graph": nodes,
        },
        buffer,
    )
    return write_bytes(path, buffer.getvalue())


def _used_nodes(values: EdgeValues) -> set[str]:
    """EAP-IG nodes an in-graph edge leaves or enters (a head's ``<q>`` input counts for the head)."""
    used = set()
    for name, kept in values.in_graph.items():
        if kept:
            parent, child = name.split("->")
            used |= {parent, child.split("<")[0]}
    return used


def read(path: str | Path) -> EdgeValues:
    """A graph file's cfg and every edge's score and membership, by EAP-IG edge name (``.pt``: ``torch.load`` with
    ``weights_only=True``; anything else JSON)."""
    path = Path(path)
    if path.suffix == ".pt":
        return _read_pt(path)
    return values_from_json(json.loads(path.read_text()), path)


def values_from_json(data: Any, path: Path) -> EdgeValues:
    """What a JSON graph (``Graph.to_json``'s layout) says of each edge; a score must be a finite number and
    ``in_graph`` a boolean, as EAP-IG writes them, and the edges exactly those of the file's cfg."""
    if not isinstance(data, dict) or not {"cfg", "nodes", "edges"} <= data.keys():
        raise CircuitFormatError(f"{path} is not an EAP-IG graph file (a JSON object with cfg, nodes and edges)")
    nodes, edges = data["nodes"], data["edges"]
    if not isinstance(nodes, dict) or not isinstance(edges, dict):
        raise CircuitFormatError(f"{path}: nodes and edges must be JSON objects keyed by name, as EAP-IG writes them")
    expected = edge_count(*cfg_settings(data["cfg"], str(path))[:3])
    if expected > 2 * len(edges) + 64:  # far more than the file lists: refused before the cfg's graph is built
        raise CircuitFormatError(f"{path}: it lists {len(edges)} edges, an EAP-IG graph with cfg {data['cfg']} has {expected}")
    layout = EapLayout.from_cfg(data["cfg"])
    if any(isinstance(node, dict) and "neurons" in node for node in nodes.values()):
        _neurons(path)
    _check_edge_names(edges.keys(), layout, path)
    scores, in_graph = {}, {}
    for name, edge in edges.items():
        if not isinstance(edge, dict) or "score" not in edge or "in_graph" not in edge:
            raise CircuitFormatError(f"{path}: edge {name} must be an object with score and in_graph, got {edge!r:.80}")
        scores[name] = _score(edge["score"], name, path)
        if not isinstance(edge["in_graph"], bool):
            raise CircuitFormatError(f"{path}: edge {name} has in_graph={edge['in_graph']!r}: it must be true or false")
        in_graph[name] = edge["in_graph"]
    return EdgeValues(layout.cfg, scores, in_graph)


def _score(value: Any, edge: str, path: Path) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise CircuitFormatError(f"{path}: edge {edge} has score {value!r}: a score must be a finite number")
    return float(value)


def _read_pt(path: Path) -> EdgeValues:
    import torch

    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol are not for a user whose file is refused
            warnings.simplefilter("ignore")
            data = torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as error:  # torch.load's own errors on a damaged or foreign file vary; none runs code (weights_only)
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise CircuitFormatError(f"{path} is not a torch file of plain tensors and dicts: {first}") from None
    if not isinstance(data, dict) or not set(PT_KEYS) <= data.keys():
        raise CircuitFormatError(f"{path} is not an EAP-IG graph file (a torch dict with {', '.join(PT_KEYS)})")
    n_layers, n_heads, _, _ = cfg_settings(data["cfg"], str(path))
    if "neurons_in_graph" in data:
        _neurons(path)
    src, dst = data["src_nodes"], data["dst_nodes"]
    named = all(isinstance(n, (list, tuple)) and all(isinstance(x, str) for x in n) for n in (src, dst))
    if not named or (len(src), len(dst)) != node_counts(n_layers, n_heads):
        raise CircuitFormatError(f"{path}: src_nodes / dst_nodes are not those of an EAP-IG graph with cfg {data['cfg']}")
    layout = EapLayout.from_cfg(data["cfg"])
    if list(src) != layout.src_nodes() or list(dst) != layout.dst_nodes():
        raise CircuitFormatError(f"{path}: src_nodes / dst_nodes are not those of an EAP-IG graph with cfg {layout.cfg}")
    scores, in_graph = data["edges_scores"], data["edges_in_graph"]
    for name, tensor, kind in (("edges_scores", scores, "floating-point"), ("edges_in_graph", in_graph, "bool")):
        dense = isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and tensor.device.type == "cpu"
        if not dense or tuple(tensor.shape) != (len(src), len(dst)):
            raise CircuitFormatError(f"{path}: {name} must be a dense {len(src)} x {len(dst)} tensor")
        if (tensor.dtype == torch.bool) != (kind == "bool") or (kind != "bool" and not tensor.dtype.is_floating_point):
            raise CircuitFormatError(f"{path}: {name} must be a {kind} tensor, as EAP-IG writes it, got {tensor.dtype}")
    row, column = {n: i for i, n in enumerate(src)}, {n: i for i, n in enumerate(dst)}
    names_ = [f"{p}->{c}" for p, c in layout.edges()]
    rows, columns = [row[p] for p, _ in layout.edges()], [column[c] for _, c in layout.edges()]
    score_list = scores.double()[rows, columns].tolist()
    for name, value in zip(names_, score_list, strict=True):
        _score(value, name, path)
    member_list = in_graph[rows, columns].tolist()
    return EdgeValues(layout.cfg, dict(zip(names_, score_list, strict=True)), dict(zip(names_, member_list, strict=True)))


def _neurons(path: Path) -> None:
    raise CircuitFormatError(f"{path} is a neuron-level circuit: pahq_fx's edges are between whole heads and MLPs")


def _check_edge_names(found: Any, layout: EapLayout, path: Path) -> None:
    expected = {f"{p}->{c}" for p, c in layout.edges()}
    found = set(found)
    if found != expected:
        extra, missing = sorted(found - expected)[:3], sorted(expected - found)[:3]
        raise CircuitFormatError(
            f"{path}: its edges are not those of an EAP-IG graph with cfg {layout.cfg} "
            f"(unexpected {extra or 'none'}, missing {missing or 'none'})"
        )


def check_cfg(cfg: dict[str, Any], layout: EapLayout, source: str) -> None:
    """A one-line error naming each setting where a file's cfg and the model's graph differ."""
    mismatched = [
        f"{key}={cfg[key]!r} in the file, {getattr(layout, key)!r} in this model"
        for key in CFG_KEYS
        if cfg[key] != getattr(layout, key)
    ]
    if mismatched:
        raise CircuitFormatError(f"{source} was written for another model: {'; '.join(mismatched)}")


def group(values: dict[tuple[str, str], Any], layout: EapLayout, combine: Any) -> dict[tuple[str, str], Any]:
    """Per-head edges folded onto the model's receivers: each key/value group's edges combined by ``combine`` over
    its heads' values (``any`` of memberships, the sum of scores); other edges unchanged."""
    gathered: dict[tuple[str, str], list[Any]] = {}
    receivers: dict[str, str] = {}
    for (sender, receiver), value in values.items():
        if receiver not in receivers:
            receivers[receiver] = layout.receiver(receiver)
        gathered.setdefault((sender, receivers[receiver]), []).append(value)
    return {edge: combine(found) for edge, found in gathered.items()}


def fit_to_model(kept: set[tuple[str, str]], found_on: dict[str, Any], head_graph: HeadGraph) -> set[tuple[str, str]]:
    """The edges of a circuit read from an EAP-IG file on the model it is evaluated with: the file's cfg checked
    against the model, and per-head key/value edges folded onto the model's groups (in if any head's is)."""
    layout = layout_of(head_graph)
    check_cfg(found_on["eap_cfg"], layout, found_on.get("name") or "the graph file")
    return {edge for edge, found in group(dict.fromkeys(kept, True), layout, any).items() if found}
