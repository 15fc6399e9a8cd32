"""Circuits from EAP-IG / MIB graph files, and :func:`load_circuit`, which reads those and pahq_fx's own
``circuit.json``. The graphs' layout, the rules for grouped keys and values and for scores, and the files' edge values
are :mod:`pahq_fx.acdc.eap_graph`'s."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..errors import CircuitFormatError
from ..ir import names
from ..ir.head_graph import HeadGraph
from .circuit import Circuit, CircuitEdge, RunStats
from .eap_graph import FORMAT, EapLayout, EdgeValues, check_cfg, group, layout_of, read, values_from_json


def to_circuit(values: EdgeValues, layout: EapLayout, source: str) -> Circuit:
    """A :class:`Circuit` of a file's edges on ``layout`` (the model's, or the file's own without groups)."""
    per_head = {(s, r): f"{p}->{c}" for (p, c), (s, r) in EapLayout.from_cfg(values.cfg).translation.items()}
    members = group({edge: values.in_graph[name] for edge, name in per_head.items()}, layout, list)
    split = sum(1 for found in members.values() if any(found) and not all(found))
    if split:
        warnings.warn(
            f"pahq_fx: {source} keeps the key or value input of only some heads of {split} key/value group edges; "
            "the whole group's input is kept (a group shares one input)",
            stacklevel=3,
        )
    scores = group({edge: values.scores[name] for edge, name in per_head.items()}, layout, math.fsum)
    ordered = layout.canonical_edges()
    kept = tuple(CircuitEdge(s, r, scores[(s, r)]) for s, r in ordered if any(members[(s, r)]))
    removed = tuple(CircuitEdge(s, r, scores[(s, r)]) for s, r in ordered if not any(members[(s, r)]) and scores[(s, r)] != 0)
    return Circuit(
        edges=kept,
        threshold=math.nan,
        metric="kl",
        precision="",
        abs_threshold=False,
        model={"class": "", "name": source, "format": FORMAT, "eap_cfg": values.cfg},
        task={},
        stats=RunStats(0.0, 0, 0.0, 0.0, 0),
        total_edges=len(ordered),
        removed=removed,
        groups=_groups(layout),
        architecture=_architecture(layout),
    )


def _groups(layout: EapLayout) -> dict[str, list[str]]:
    out = {}
    for layer, groups in enumerate(layout.groups):
        if groups is None:
            continue
        for g in sorted(set(groups)):
            out[names.kv_group(layer, g)] = [names.head(layer, h) for h, of in enumerate(groups) if of == g]
    return out


def _architecture(layout: EapLayout) -> tuple[dict[str, Any], ...]:
    layers = tuple(
        {
            "heads": layout.n_heads,
            "kv_groups": len(set(groups)) if groups else layout.n_heads,
            "mlp": True,
            "components": 1,
            "output_norm": False,
            "parallel": layout.parallel_attn_mlp,
        }
        for groups in layout.groups
    )
    if layers:
        layers[0]["d_model"] = layout.d_model
    return layers


def load_circuit(path: str | Path, head_graph: HeadGraph | None = None) -> Circuit:
    """A circuit from a file: pahq_fx's ``circuit.json``, or an EAP-IG / MIB graph (``.json`` or ``.pt``).

    ``head_graph`` (the model's: ``pahq_fx.transform(model).head_graph``) is checked against an EAP-IG file's cfg
    and supplies the key/value groups the file does not record. Without it, an EAP-IG file is read with a key and
    value input per head; :meth:`Circuit.evaluate` folds those onto the model's groups and checks the cfg then.
    """
    path = Path(path)
    try:
        if path.suffix == ".pt":
            values = read(path)
        else:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "format" in data:
                return Circuit.load(path)
            values = values_from_json(data, path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CircuitFormatError(f"{path} is not a circuit file pahq_fx reads: {error}") from None
    layout = EapLayout.from_cfg(values.cfg)
    if head_graph is not None:
        layout = layout_of(head_graph)
        check_cfg(values.cfg, layout, str(path))
    return to_circuit(values, layout, str(path))
