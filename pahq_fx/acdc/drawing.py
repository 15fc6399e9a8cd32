"""A layered picture of a circuit with matplotlib: no Graphviz binary, which a ``pip install`` user does not have.

Rows are the residual stream's order: ``embed`` at the bottom, each layer's heads, then its post-attention norm
(if any) and its MLP, ``resid_post`` at the top. Every head of the model is drawn (faint when the circuit does not
use it); under grouped-query attention a
bracket below the heads shows each key/value group. An edge ends at the receiver's query, key or value input
(left, middle, right of the head, or at the group's bracket), coloured by that role; its width grows with the
measured effect (the metric's increase when the edge was patched).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import names
from ..atomic import write_bytes
from ..names import NodeKind, Role

if TYPE_CHECKING:
    from .circuit import Circuit

ROLE_COLOURS = {Role.QUERY: "#1f77b4", Role.KEY: "#ff7f0e", Role.VALUE: "#2ca02c", None: "#555555"}
ROLE_OFFSETS = {Role.QUERY: -0.25, Role.KEY: 0.0, Role.VALUE: 0.25, None: 0.0}
BOX_W, BOX_H = 0.7, 0.34
USED, UNUSED = "#dbe9f6", "#f4f4f4"
MLP_COLOUR = "#fff2c2"


@dataclass(frozen=True)
class _Layer:
    heads: int
    kv_groups: int
    components: int  # whole components after the layer's attention: its MLP, a hybrid's mixers and MLPs
    output_norm: bool = False

    def group_of(self, head: int) -> int:
        return head * self.kv_groups // self.heads


def _architecture(circuit: Circuit) -> tuple[list[_Layer], int]:
    """The model's layers as the circuit recorded them (for older circuit files, what the edge names show), and the
    number of whole components before the first attention layer."""
    seen: dict[int, int] = {}  # components by the attention layer they follow, as far as the edge names show
    layers: dict[int, dict[str, int]] = {}
    for edge in (*circuit.edges, *circuit.removed):
        for name in (edge.sender, edge.receiver):
            parsed = names.parse(name)
            if parsed.kind is NodeKind.MLP:
                seen[parsed.layer] = max(seen.get(parsed.layer, 0), (parsed.index or 0) + 1)
            if parsed.layer is None or parsed.layer < 0:
                continue
            layer = layers.setdefault(parsed.layer, {"heads": 0, "groups": 0, "output_norm": 0})
            if parsed.kind is NodeKind.HEAD:
                layer["heads"] = max(layer["heads"], parsed.index + 1)
            elif parsed.kind is NodeKind.KV_GROUP:
                layer["groups"] = max(layer["groups"], parsed.index + 1)
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
        layer = layers.setdefault(names.parse(group).layer, {"heads": 0, "groups": 0, "output_norm": 0})
        layer["heads"] = max([layer["heads"], *(names.parse(h).index + 1 for h in heads)])
    n = max([*layers, *seen], default=-1) + 1
    out = []
    for index in range(n):
        layer = layers.get(index, {"heads": 1, "groups": 0, "output_norm": 0})
        heads = max(layer["heads"], 1)
        out.append(_Layer(heads, layer["groups"] or heads, seen.get(index, 0), bool(layer["output_norm"])))
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
        return 2.0 * layer + self.offset + {NodeKind.MLP: 2.0, NodeKind.ATTENTION_OUTPUT: 1.5}.get(kind, 1.0)

    def components_after(self, layer: int) -> int:
        return self.leading if layer < 0 else self.layers[layer].components

    def component_x(self, layer: int, position: int) -> float:
        """One component centred; several (a hybrid's mixers and MLPs) spread over the width in order."""
        count = self.components_after(layer)
        return self.centre() if count <= 1 else (position + 0.5) * self.width / count - 0.5

    def head_x(self, layer: int, head: int) -> float:
        """Heads of a layer spread evenly over the width, whatever their number."""
        return (head + 0.5) * self.width / self.layers[layer].heads - 0.5

    def group_x(self, layer: int, group: int) -> float:
        info = self.layers[layer]
        xs = [self.head_x(layer, h) for h in range(info.heads) if info.group_of(h) == group]
        return sum(xs) / len(xs)

    def centre(self) -> float:
        return (self.width - 1) / 2

    def node(self, name: str) -> tuple[float, float]:
        parsed = names.parse(name)
        y = self.row(parsed.kind, parsed.layer)
        if parsed.kind is NodeKind.HEAD:
            return self.head_x(parsed.layer, parsed.index), y
        if parsed.kind is NodeKind.KV_GROUP:
            return self.group_x(parsed.layer, parsed.index), self.row(NodeKind.HEAD, parsed.layer) - BOX_H / 2 - 0.18
        if parsed.kind is NodeKind.MLP:
            return self.component_x(parsed.layer, parsed.index or 0), y
        return self.centre(), y

    def sender(self, name: str) -> tuple[float, float]:
        x, y = self.node(name)
        return x, y + BOX_H / 2

    def receiver(self, name: str) -> tuple[float, float]:
        parsed = names.parse(name)
        if parsed.kind is NodeKind.KV_GROUP:
            x, y = self.group_x(parsed.layer, parsed.index), self.row(NodeKind.HEAD, parsed.layer) - BOX_H / 2 - 0.18
            return x + ROLE_OFFSETS[parsed.role] * 0.6, y - 0.08
        x, y = self.node(parsed.node)
        return x + ROLE_OFFSETS[parsed.role] * BOX_W, y - BOX_H / 2


def draw_circuit(circuit: Circuit, *paths: str | Path) -> list[Path]:
    """Write the picture to each path (``.png`` or ``.svg``) and return the paths: the figure is laid out once."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    paths = tuple(Path(p) for p in paths)
    for path in paths:
        if path.suffix.lower() not in (".png", ".svg"):
            raise ValueError(f"draw the circuit as .png or .svg, not {path.suffix or 'a file without suffix'}")
    layers, leading = _architecture(circuit)
    at = _Positions(layers, leading)
    used = set(circuit.nodes)
    rows = at.rows
    figure = Figure(figsize=(max(6.0, 1.05 * at.width + 1.5), max(4.0, 0.95 * rows + 1.2)))
    axes = figure.add_subplot()
    axes.set_axis_off()

    def box(x: float, y: float, label: str, fill: str, strong: bool, width: float = BOX_W) -> None:
        axes.add_patch(
            FancyBboxPatch(
                (x - width / 2, y - BOX_H / 2),
                width,
                BOX_H,
                boxstyle="round,pad=0.02,rounding_size=0.08",
                facecolor=fill,
                edgecolor="#333333" if strong else "#bbbbbb",
                linewidth=1.2 if strong else 0.6,
                zorder=3,
            )
        )
        axes.text(x, y, label, ha="center", va="center", fontsize=7.5, color="#111111" if strong else "#aaaaaa", zorder=4)

    box(at.centre(), 0.0, names.EMBED, USED if names.EMBED in used else UNUSED, names.EMBED in used, width=1.2)

    def components(layer: int) -> None:
        width = min(1.0, 0.9 * at.width / max(at.components_after(layer), 1))
        for position in range(at.components_after(layer)):
            name = names.mlp(layer, position)
            box(*at.node(name), name, MLP_COLOUR if name in used else UNUSED, name in used, width=width)

    components(-1)
    box(at.centre(), at.row(NodeKind.RESID_POST, None), names.RESID_POST, USED, True, width=1.4)
    for index, layer in enumerate(layers):
        y = at.row(NodeKind.HEAD, index)
        axes.text(-0.9, y, f"layer {index}", ha="right", va="center", fontsize=8, color="#444444")
        for h in range(layer.heads):
            name = names.head(index, h)
            box(at.head_x(index, h), y, name, USED if name in used else UNUSED, name in used)
        if layer.kv_groups != layer.heads:
            for g in range(layer.kv_groups):
                heads = [at.head_x(index, h) for h in range(layer.heads) if layer.group_of(h) == g]
                group = names.kv_group(index, g)
                strong = group in used
                left, right, gy = min(heads) - BOX_W / 2, max(heads) + BOX_W / 2, y - BOX_H / 2 - 0.18
                axes.plot(
                    [left, left, right, right],
                    [gy + 0.08, gy, gy, gy + 0.08],
                    color="#333333" if strong else "#cccccc",
                    linewidth=1.0,
                    zorder=2,
                )
                axes.text(
                    (left + right) / 2,
                    gy + 0.075,
                    group,
                    fontsize=6,
                    ha="center",
                    va="center",
                    color="#333333" if strong else "#aaaaaa",
                )
        if layer.output_norm:
            name = names.attention_output(index)
            box(
                at.centre(),
                at.row(NodeKind.ATTENTION_OUTPUT, index),
                name,
                USED if name in used else UNUSED,
                name in used,
                width=0.9,
            )
        components(index)

    effects = [e.effect for e in circuit.edges if math.isfinite(e.effect)]
    largest = max([abs(e) for e in effects] + [1e-12])
    for edge in sorted(circuit.edges, key=lambda e: abs(e.effect) if math.isfinite(e.effect) else 0.0):
        role = names.parse(edge.receiver).role
        strength = abs(edge.effect) / largest if math.isfinite(edge.effect) else 0.0
        start, end = at.sender(edge.sender), at.receiver(edge.receiver)
        bend = 0.25 if abs(start[0] - end[0]) < 1e-6 and end[1] - start[1] > 1.5 else 0.08
        axes.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=7,
                color=ROLE_COLOURS[role],
                linewidth=0.6 + 3.4 * math.sqrt(strength),
                alpha=0.45 + 0.5 * strength,
                connectionstyle=f"arc3,rad={bend}",
                zorder=1,
            )
        )
    legend = [Line2D([0], [0], color=ROLE_COLOURS[r], linewidth=2, label=f"to {r.name.lower()}") for r in Role]
    legend.append(Line2D([0], [0], color=ROLE_COLOURS[None], linewidth=2, label="to norm / MLP / resid_post"))
    axes.legend(
        handles=legend,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        frameon=False,
        title=f"width: effect (max {largest:.3g})",
        title_fontsize=7,
    )
    axes.set_xlim(-1.6, at.width + 0.2)
    axes.set_ylim(-0.6, rows - 0.4)
    axes.set_title(
        f"{Path(str(circuit.model.get('name', ''))).name} on {circuit.task.get('name', '')}: "
        f"{len(circuit.edges)}/{circuit.total_edges} edges "
        f"({circuit.metric}, threshold {circuit.threshold:g}, {circuit.precision})",
        fontsize=9,
    )
    figure.tight_layout()
    for path in paths:
        picture = io.BytesIO()
        figure.savefig(picture, format=path.suffix.lower()[1:], dpi=150)
        write_bytes(path, picture.getvalue())
    return list(paths)
