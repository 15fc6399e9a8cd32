"""The circuit picture with matplotlib: no Graphviz binary, which a ``pip install`` user does not have.

:func:`~pahq_fx.acdc.picture.lay_out` decides where everything goes; this module only draws it. Active nodes (an
endpoint of a drawn edge) are strong, the rest of the model faint. An edge is coloured by the input it feeds (query,
key, value, or a norm, MLP or ``resid_post``); its width grows with the measured effect (the metric's increase when
the edge was patched). A note under the picture says how many of the circuit's edges were left out.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_bytes
from ..ir import names
from ..ir.names import NodeKind, Role
from .picture import BOX_H, DEFAULT_TOP_K, lay_out

if TYPE_CHECKING:
    from .circuit import Circuit

ROLE_COLOURS = {Role.QUERY: "#1f77b4", Role.KEY: "#ff7f0e", Role.VALUE: "#2ca02c", None: "#555555"}
USED, UNUSED = "#dbe9f6", "#f4f4f4"
MLP_COLOUR = "#fff2c2"


def draw_circuit(circuit: Circuit, *paths: str | Path, top_k: int | None = DEFAULT_TOP_K, min_effect: float = 0.0) -> list[Path]:
    """Write the picture to each path (``.png`` or ``.svg``) and return the paths: the figure is laid out once.
    ``top_k`` and ``min_effect`` choose the edges drawn (:func:`~pahq_fx.acdc.picture.select_edges`)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as PolyLine

    targets = [Path(p) for p in paths]
    for path in targets:
        if path.suffix.lower() not in (".png", ".svg"):
            raise ValueError(f"draw the circuit as .png or .svg, not {path.suffix or 'a file without suffix'}")
    picture = lay_out(circuit, top_k, min_effect)
    active = picture.active
    figure = Figure(figsize=(max(6.0, 1.05 * picture.width + 1.5), max(4.0, 0.95 * picture.height + 1.2)))
    axes = figure.add_subplot()
    axes.set_axis_off()

    for box in picture.boxes.values():
        strong = box.name in active
        fill = (MLP_COLOUR if names.parse(box.name).kind is NodeKind.MLP else USED) if strong else UNUSED
        axes.add_patch(
            FancyBboxPatch(
                (box.left, box.bottom),
                box.width,
                BOX_H,
                boxstyle="round,pad=0.02,rounding_size=0.08",
                facecolor=fill,
                edgecolor="#333333" if strong else "#bbbbbb",
                linewidth=1.2 if strong else 0.6,
                zorder=3,
            )
        )
        axes.text(
            box.x, box.y, box.name, ha="center", va="center", fontsize=7.5, color="#111111" if strong else "#aaaaaa", zorder=4
        )
    for index, y in enumerate(picture.layer_rows):
        axes.text(-0.9, y, f"layer {index}", ha="right", va="center", fontsize=8, color="#444444")
    for bracket in picture.brackets:
        strong = bracket.name in active
        axes.plot(
            [bracket.left, bracket.left, bracket.right, bracket.right],
            [bracket.y + 0.08, bracket.y, bracket.y, bracket.y + 0.08],
            color="#333333" if strong else "#cccccc",
            linewidth=1.0,
            zorder=2,
        )
        axes.text(
            (bracket.left + bracket.right) / 2,
            bracket.y + 0.075,
            bracket.name,
            fontsize=6,
            ha="center",
            va="center",
            color="#333333" if strong else "#aaaaaa",
        )

    effects = [abs(r.edge.effect) for r in picture.routes if math.isfinite(r.edge.effect)]
    largest = max([*effects, 1e-12])
    for route in reversed(picture.routes):  # weakest first, so that strong edges lie on top
        effect = route.edge.effect
        strength = min(abs(effect) / largest, 1.0) if math.isfinite(effect) else 1.0
        axes.add_patch(
            FancyArrowPatch(
                path=PolyLine(route.points),
                arrowstyle="-|>",
                mutation_scale=7,
                color=ROLE_COLOURS[route.role],
                linewidth=0.6 + 2.4 * math.sqrt(strength),
                alpha=0.45 + 0.5 * strength,
                joinstyle="miter",
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
    axes.set_xlim(-1.6, picture.width + 0.2)
    axes.set_ylim(-0.6, picture.height - 0.4)
    axes.set_title(
        f"{Path(str(circuit.model.get('name', ''))).name} on {circuit.task.get('name', '')}: "
        f"{len(circuit.edges)}/{circuit.total_edges} edges "
        f"({circuit.metric}, threshold {circuit.threshold:g}, {circuit.precision})",
        fontsize=9,
    )
    if picture.left_out:
        figure.text(
            0.01, 0.005, _left_out_note(picture.left_out, len(picture.routes), top_k, min_effect), fontsize=7, color="#444444"
        )
    figure.tight_layout()
    for path in targets:
        data = io.BytesIO()
        figure.savefig(data, format=path.suffix.lower()[1:], dpi=150)
        write_bytes(path, data.getvalue())
    return targets


def _left_out_note(left_out: int, drawn: int, top_k: int | None, min_effect: float) -> str:
    """How many edges the picture leaves out, by which rule, and how to draw them."""
    rule = [f"the {drawn} largest" if top_k is not None and drawn == top_k else f"{drawn}"]
    if min_effect > 0:
        rule.append(f"effect at least {min_effect:g}")
    return f"edges drawn: {', '.join(rule)}; {left_out} weaker not drawn (top_k=None, or --draw-top-k all, draws every edge)"
