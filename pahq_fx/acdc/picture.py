"""Where everything of a circuit's picture goes, without drawing it: the boxes, which of them are active, and for each
drawn edge a route of horizontal and vertical segments that passes between boxes, never through one.

Rows are the residual stream's order: ``embed`` at the bottom, each layer's heads, then its post-attention norm
(if any) and its whole components, ``resid_post`` at the top. Every head of the model gets a box; under
grouped-query attention a bracket below the heads marks each key/value group, and its key and value inputs sit
below the bracket. An edge leaves its sender's top, runs in the free band (channel) above the sender's row, climbs
in a free vertical lane between the boxes of the rows it passes, and runs in the channel below its receiver to the
receiver's query, key or value input. Edges are the largest by effect, so that a large circuit stays readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PahqError
from ..ir import names
from ..ir.names import NodeKind, Role

if TYPE_CHECKING:
    from .circuit import Circuit, CircuitEdge

DEFAULT_TOP_K = 50  # edges drawn by default: past a few dozen a layered picture stops being readable
ROLE_OFFSETS = {Role.QUERY: -0.25, Role.KEY: 0.0, Role.VALUE: 0.25, None: 0.0}
BOX_W, BOX_H = 0.7, 0.34
BRACKET_DROP = 0.18  # the key/value bracket's line below its heads' boxes
INPUT_DROP = 0.08  # a group's key and value inputs below its bracket
CLEARANCE = 0.04  # between a route and a box, and between parallel routes
MARGIN = 0.85  # the free lane left of every box (x from -MARGIN), before the layer labels


@dataclass(frozen=True)
class Box:
    """A node's box: its name, centre and extent."""

    name: str
    x: float
    y: float
    width: float

    @property
    def left(self) -> float:
        return self.x - self.width / 2

    @property
    def right(self) -> float:
        return self.x + self.width / 2

    @property
    def bottom(self) -> float:
        return self.y - BOX_H / 2

    @property
    def top(self) -> float:
        return self.y + BOX_H / 2


@dataclass(frozen=True)
class Bracket:
    """A key/value group's bracket under the heads it feeds."""

    name: str
    left: float
    right: float
    y: float


@dataclass(frozen=True)
class Route:
    """A drawn edge and its polyline, from the sender's top to the receiver's input."""

    edge: CircuitEdge
    points: tuple[tuple[float, float], ...]

    @property
    def role(self) -> Role | None:
        return names.parse(self.edge.receiver).role


@dataclass
class Picture:
    """Everything :func:`~pahq_fx.acdc.drawing.draw_circuit` draws. ``active``: the endpoints of the drawn edges
    (nodes, and key/value groups for their brackets); ``left_out``: the circuit's edges not drawn."""

    boxes: dict[str, Box]
    brackets: list[Bracket]
    routes: list[Route]
    active: set[str]
    left_out: int
    layer_rows: list[float]  # y of each layer's heads, for its label
    width: float
    height: float


@dataclass(frozen=True)
class _Layer:
    heads: int
    kv_groups: int
    components: int  # whole components after the layer's attention: its MLP, a hybrid's mixers and MLPs
    output_norm: bool = False

    def group_of(self, head: int) -> int:
        return head * self.kv_groups // self.heads


def select_edges(edges: tuple[CircuitEdge, ...], top_k: int | None, min_effect: float) -> list[CircuitEdge]:
    """The edges to draw: those whose effect is at least ``min_effect`` in size, the ``top_k`` largest of them
    (``None``: all), largest first (a NaN effect is never drawn)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise PahqError(f"top_k must be a positive integer or None (every edge), got {top_k!r}")
    if isinstance(min_effect, bool) or not isinstance(min_effect, (int, float)) or not min_effect >= 0:
        raise PahqError(f"min_effect must be a non-negative number, got {min_effect!r}")
    kept = [e for e in edges if abs(e.effect) >= min_effect]
    kept.sort(key=lambda e: -abs(e.effect))
    return kept if top_k is None else kept[:top_k]


def architecture(circuit: Circuit) -> tuple[list[_Layer], int]:
    """The model's layers as the circuit recorded them (for older circuit files, what the edge names show), and the
    number of whole components before the first attention layer."""
    seen: dict[int, int] = {}  # components by the attention layer they follow, as far as the edge names show
    layers: dict[int, dict[str, int]] = {}
    for edge in (*circuit.edges, *circuit.removed):
        for name in (edge.sender, edge.receiver):
            parsed = names.parse(name)
            if parsed.kind is NodeKind.MLP:
                seen[parsed.layer_number] = max(seen.get(parsed.layer_number, 0), (parsed.index or 0) + 1)
            if parsed.layer is None or parsed.layer < 0:
                continue
            layer = layers.setdefault(parsed.layer, {"heads": 0, "groups": 0, "output_norm": 0})
            if parsed.kind is NodeKind.HEAD:
                layer["heads"] = max(layer["heads"], parsed.unit[1] + 1)
            elif parsed.kind is NodeKind.KV_GROUP:
                layer["groups"] = max(layer["groups"], parsed.unit[1] + 1)
            elif parsed.kind is NodeKind.ATTENTION_OUTPUT:
                layer["output_norm"] = 1
    leading = max(seen.get(-1, 0), int(circuit.architecture[0].get("leading", 0)) if circuit.architecture else 0)
    if circuit.architecture:
        return [
            _Layer(
                int(a["heads"]),
                int(a["kv_groups"]),
                max(int(a.get("components", a["mlp"])), seen.get(i, 0)),
                bool(a.get("output_norm", False)),
            )
            for i, a in enumerate(circuit.architecture)
        ], leading
    for group, heads in circuit.groups.items():
        layer = layers.setdefault(names.parse(group).layer_number, {"heads": 0, "groups": 0, "output_norm": 0})
        layer["heads"] = max([layer["heads"], *(names.parse(h).unit[1] + 1 for h in heads)])
    n = max([*layers, *seen], default=-1) + 1
    out = []
    for index in range(n):
        layer = layers.get(index, {"heads": 1, "groups": 0, "output_norm": 0})
        n_heads = max(layer["heads"], 1)
        out.append(_Layer(n_heads, layer["groups"] or n_heads, seen.get(index, 0), bool(layer["output_norm"])))
    return out, leading


class _Positions:
    """Where every node sits: x by head or component index (centred), y by the row of its component; the
    components before the first attention layer take a row of their own above the embedding."""

    def __init__(self, layers: list[_Layer], leading: int) -> None:
        self.layers = layers
        self.leading = leading
        self.offset = 1.0 if leading else 0.0
        self.width = max([4, *(layer.heads for layer in layers), *(layer.components for layer in layers), leading])

    @property
    def rows(self) -> int:
        return int(2 * len(self.layers) + 2 + self.offset)

    def row(self, kind: NodeKind, layer: int | None) -> float:
        if kind is NodeKind.EMBED:
            return 0.0
        if kind is NodeKind.RESID_POST:
            return 2.0 * len(self.layers) + 1 + self.offset
        if layer is None:
            raise ValueError(f"a {kind.value} row needs its layer")
        return 2.0 * layer + self.offset + {NodeKind.MLP: 2.0, NodeKind.ATTENTION_OUTPUT: 1.5}.get(kind, 1.0)

    def components_after(self, layer: int) -> int:
        return self.leading if layer < 0 else self.layers[layer].components

    def component_x(self, layer: int, position: int) -> float:
        """One component centred; several (a hybrid's mixers and MLPs) spread over the width in order."""
        count = self.components_after(layer)
        return self.centre() if count <= 1 else (position + 0.5) * self.width / count - 0.5

    def component_width(self, layer: int) -> float:
        return min(1.0, 0.9 * self.width / max(self.components_after(layer), 1))

    def head_x(self, layer: int, head: int) -> float:
        """Heads of a layer spread evenly over the width, whatever their number."""
        return (head + 0.5) * self.width / self.layers[layer].heads - 0.5

    def group_x(self, layer: int, group: int) -> float:
        info = self.layers[layer]
        xs = [self.head_x(layer, h) for h in range(info.heads) if info.group_of(h) == group]
        return sum(xs) / len(xs)

    def bracket_y(self, layer: int) -> float:
        return self.row(NodeKind.HEAD, layer) - BOX_H / 2 - BRACKET_DROP

    def centre(self) -> float:
        return (self.width - 1) / 2

    def node(self, name: str) -> tuple[float, float]:
        parsed = names.parse(name)
        y = self.row(parsed.kind, parsed.layer)
        if parsed.kind is NodeKind.HEAD:
            return self.head_x(*parsed.unit), y
        if parsed.kind is NodeKind.KV_GROUP:
            return self.group_x(*parsed.unit), self.bracket_y(parsed.layer_number)
        if parsed.kind is NodeKind.MLP:
            return self.component_x(parsed.layer_number, parsed.index or 0), y
        return self.centre(), y

    def sender(self, name: str) -> tuple[float, float]:
        x, y = self.node(name)
        return x, y + BOX_H / 2

    def receiver(self, name: str) -> tuple[float, float]:
        parsed = names.parse(name)
        if parsed.kind is NodeKind.KV_GROUP:
            x, y = self.group_x(*parsed.unit), self.bracket_y(parsed.layer_number)
            return x + ROLE_OFFSETS[parsed.role] * 0.6, y - INPUT_DROP
        x, y = self.node(parsed.node)
        return x + ROLE_OFFSETS[parsed.role] * BOX_W, y - BOX_H / 2

    def boxes(self) -> list[Box]:
        """Every node's box, active or not."""
        out = [
            Box(names.EMBED, self.centre(), 0.0, 1.2),
            Box(names.RESID_POST, self.centre(), self.row(NodeKind.RESID_POST, None), 1.4),
        ]
        for after in range(-1, len(self.layers)):
            for position in range(self.components_after(after)):
                name = names.mlp(after, position)
                out.append(Box(name, *self.node(name), self.component_width(after)))
        for index, layer in enumerate(self.layers):
            out += [Box(names.head(index, h), *self.node(names.head(index, h)), BOX_W) for h in range(layer.heads)]
            if layer.output_norm:
                name = names.attention_output(index)
                out.append(Box(name, *self.node(name), 0.9))
        return out

    def brackets(self) -> list[Bracket]:
        out = []
        for index, layer in enumerate(self.layers):
            if layer.kv_groups == layer.heads:
                continue
            for g in range(layer.kv_groups):
                xs = [self.head_x(index, h) for h in range(layer.heads) if layer.group_of(h) == g]
                out.append(Bracket(names.kv_group(index, g), min(xs) - BOX_W / 2, max(xs) + BOX_W / 2, self.bracket_y(index)))
        return out


@dataclass
class _Row:
    """Boxes at one height, and the vertical band they (and a bracket's inputs below them) occupy."""

    y: float
    low: float
    high: float
    spans: list[tuple[float, float]]  # x extents of the row's boxes


class _Router:
    """Routes edges through the free channels between rows and the free lanes between boxes, spreading edges that
    share a channel or a lane over parallel tracks."""

    def __init__(self, at: _Positions, boxes: list[Box]) -> None:
        self.at = at
        self.right = at.width + 0.1
        by_y: dict[float, _Row] = {}
        for box in boxes:
            row = by_y.setdefault(box.y, _Row(box.y, box.bottom, box.top, []))
            row.spans.append((box.left, box.right))
        for index, layer in enumerate(at.layers):
            if layer.kv_groups != layer.heads:
                row = by_y[at.row(NodeKind.HEAD, index)]
                row.low = min(row.low, at.bracket_y(index) - INPUT_DROP - CLEARANCE / 2)
        self.rows = sorted(by_y.values(), key=lambda r: r.y)
        self.horizontal: dict[int, list[tuple[float, float, float]]] = {}  # channel -> (x from, x to, y)
        self.vertical: list[tuple[float, float, float]] = []  # (x, y from, y to)

    def route(self, edge: CircuitEdge) -> tuple[tuple[float, float], ...]:
        start, end = self.at.sender(edge.sender), self.at.receiver(edge.receiver)
        up = self._row_of(self.at.node(edge.sender)[1])  # channel `up` lies above the sender's row
        down = self._row_of(end[1]) - 1  # channel `down` lies below the receiver's row
        if up == down:
            if abs(start[0] - end[0]) < 1e-9:
                return start, end
            y = self._track(up, start[0], end[0])
            return start, (start[0], y), (end[0], y), end
        lane_rows = range(min(up, down) + 1, max(up, down) + 1)  # a same-row edge passes its own row
        x = self._lane(lane_rows, start[0], end[0], sorted((sum(self._channel(up)) / 2, sum(self._channel(down)) / 2)))
        y1, y2 = self._track(up, start[0], x), self._track(down, x, end[0])
        self.vertical.append((x, min(y1, y2), max(y1, y2)))
        points = [start, (start[0], y1), (x, y1), (x, y2), (end[0], y2), end]
        return tuple(p for i, p in enumerate(points) if i == 0 or p != points[i - 1])

    def _row_of(self, y: float) -> int:
        return next(i for i, row in enumerate(self.rows) if row.low - 1e-9 <= y <= row.high + 1e-9)

    def _channel(self, channel: int) -> tuple[float, float]:
        """The band between row ``channel`` and the row above it, less the clearance from both."""
        return self.rows[channel].high + CLEARANCE, self.rows[channel + 1].low - CLEARANCE

    def _track(self, channel: int, x0: float, x1: float) -> float:
        """The y in ``channel`` for a horizontal run from ``x0`` to ``x1``: the track nearest the channel's middle
        that no other run over the same stretch uses (the least used where every track is)."""
        low, high = self._channel(channel)
        middle = (low + high) / 2
        tracks = sorted(_spread(low, high), key=lambda y: abs(y - middle))
        a, b = min(x0, x1) - CLEARANCE, max(x0, x1) + CLEARANCE
        runs = self.horizontal.setdefault(channel, [])

        def crowding(y: float) -> int:
            return sum(1 for s, e, t in runs if abs(t - y) < CLEARANCE / 2 and s <= b and e >= a)

        y = min(tracks, key=crowding)
        runs.append((min(x0, x1), max(x0, x1), y))
        return y

    def _lane(self, rows: range, x0: float, x1: float, ys: list[float]) -> float:
        """An x free of every box of ``rows``: among tracks in the gaps between boxes, the one that keeps the route
        short and apart from other edges' lanes over the same heights ``ys``."""
        spans = sorted(span for r in rows for span in self.rows[r].spans)
        gaps, reached = [], -MARGIN
        for left, right in spans:
            if left - reached > 2 * CLEARANCE:
                gaps.append((reached + CLEARANCE, left - CLEARANCE))
            reached = max(reached, right)
        gaps.append((reached + CLEARANCE, max(reached + CLEARANCE, self.right)))
        tracks = [x for low, high in gaps for x in _spread(low, high)]

        def cost(x: float) -> float:
            crowded = sum(1 for v, a, b in self.vertical if abs(v - x) < CLEARANCE / 2 and a <= ys[1] and b >= ys[0])
            return abs(x - x0) + abs(x - x1) + 2.0 * crowded

        return min(tracks, key=cost)


def _spread(low: float, high: float) -> list[float]:
    """Parallel tracks across ``[low, high]``, ``CLEARANCE`` apart (at least one, in the middle)."""
    count = max(1, int((high - low) / CLEARANCE))
    return [low + (high - low) * (k + 0.5) / count for k in range(count)]


def lay_out(circuit: Circuit, top_k: int | None = DEFAULT_TOP_K, min_effect: float = 0.0) -> Picture:
    """Boxes for every node of the model, routes for the circuit's largest edges (:func:`select_edges`)."""
    layers, leading = architecture(circuit)
    at = _Positions(layers, leading)
    drawn = select_edges(circuit.edges, top_k, min_effect)
    boxes = at.boxes()
    router = _Router(at, boxes)
    # Strong edges first, so that they get the shortest lanes and the middle tracks.
    routes = [Route(edge, router.route(edge)) for edge in drawn]
    active = {e.sender for e in drawn} | {names.node_of(e.receiver) for e in drawn}
    return Picture(
        boxes={box.name: box for box in boxes},
        brackets=at.brackets(),
        routes=routes,
        active=active,
        left_out=len(circuit.edges) - len(drawn),
        layer_rows=[at.row(NodeKind.HEAD, index) for index in range(len(layers))],
        width=at.width,
        height=float(at.rows),
    )
