"""What a ``circuit.json`` must hold before :class:`~pahq_fx.acdc.circuit.Circuit` is built from it: every field the
drawing, the report and the evaluation read, of the type :meth:`Circuit.save` writes, so that a damaged or
hand-edited file is one line naming the field instead of a traceback from deep inside a picture."""

from __future__ import annotations

from typing import Any

from ..errors import CircuitFormatError
from ..ir import names
from ..ir.names import NodeKind

REQUIRED = ("edges", "threshold", "metric", "precision", "abs_threshold", "model", "task", "stats", "total_edges")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_circuit_data(data: Any, source: str) -> None:
    """A :class:`CircuitFormatError` naming the first field of ``data`` (a parsed circuit.json) that is missing or
    not of the type :meth:`Circuit.save` writes."""

    def bad(what: str) -> CircuitFormatError:
        return CircuitFormatError(f"{source} is not a circuit file written by pahq_fx: {what}")

    if not isinstance(data, dict):
        raise bad(f"a JSON object is expected, got {type(data).__name__}")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise bad(f"it lacks {', '.join(missing)}")
    for key in ("model", "task", "stats"):
        if not isinstance(data[key], dict):
            raise bad(f"{key} must be an object, got {data[key]!r:.60}")
    if not _count(data["total_edges"]):
        raise bad(f"total_edges must be a non-negative integer, got {data['total_edges']!r:.60}")
    layers = _architecture(data.get("architecture", []), bad)
    for key in ("edges", "removed"):
        edges = data.get(key, [])
        if not isinstance(edges, list):
            raise bad(f"{key} must be a list of edges, got {type(edges).__name__}")
        for i, edge in enumerate(edges):
            if not isinstance(edge, dict) or set(edge) != {"sender", "receiver", "effect"}:
                raise bad(f"{key}[{i}] must be an object with sender, receiver and effect, got {edge!r:.80}")
            if not _number(edge["effect"]):
                raise bad(f"{key}[{i}] has effect {edge['effect']!r:.40}: it must be a number")
            for end in ("sender", "receiver"):
                _node(edge[end], layers, bad, f"{key}[{i}].{end}")
    groups = data.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(h, list) for h in groups.values()):
        raise bad("groups must map each key/value group to a list of its heads")
    for group, heads in groups.items():
        for name in (group, *heads):
            _node(name, layers, bad, f"groups[{group!r:.40}]")


def _architecture(layers: Any, bad: Any) -> list[dict[str, Any]]:
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise bad("architecture must be a list of one object per layer")
    for index, layer in enumerate(layers):
        for key in ("heads", "kv_groups"):
            if key in layer and not (_count(layer[key]) and layer[key] >= 1):
                raise bad(f"architecture[{index}].{key} must be a positive integer, got {layer[key]!r:.40}")
        if "heads" not in layer or "kv_groups" not in layer or "mlp" not in layer:
            raise bad(f"architecture[{index}] lacks heads, kv_groups or mlp")
    return layers


def _node(name: Any, layers: list[dict[str, Any]], bad: Any, where: str) -> None:
    """A canonical node name, and where the file records its architecture, a node of it."""
    if not isinstance(name, str):
        raise bad(f"{where} must be a node name, got {name!r:.40}")
    try:
        parsed = names.parse(name)
    except ValueError as error:
        raise bad(f"{where}: {str(error)[:200]}") from None
    if not layers or parsed.layer is None or parsed.layer < 0:
        return
    if parsed.layer >= len(layers):
        raise bad(f"{where} names {name!r}, but the circuit's model has {len(layers)} layers")
    if parsed.kind in (NodeKind.HEAD, NodeKind.KV_GROUP):
        limit = layers[parsed.layer]["heads" if parsed.kind is NodeKind.HEAD else "kv_groups"]
        if parsed.unit[1] >= limit:
            raise bad(f"{where} names {name!r}, but layer {parsed.layer} has {limit} {parsed.kind.value}s")
