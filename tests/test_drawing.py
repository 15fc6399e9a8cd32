"""The circuit picture: drawn with matplotlib alone, laid out by the residual stream's order."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc.circuit import Circuit, CircuitEdge, RunStats
from pahq_fx.acdc.drawing import draw_circuit
from pahq_fx.acdc.picture import _Layer, _Positions, lay_out, select_edges
from pahq_fx.errors import PahqError
from pahq_fx.ir import names
from pahq_fx.ir.names import NodeKind
from tests.test_cli import run


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.sampled_from([(1, 1, 1), (4, 4, 1), (4, 2, 0), (8, 1, 1), (6, 3, 3)]), min_size=1, max_size=5), st.integers(0, 4)
)
def test_layout_puts_layers_in_rows_and_heads_in_order(layers, leading):
    """Heads in order within their layer's row, whole components (a hybrid's several) in order within theirs,
    the rows in the residual stream's order."""
    at = _Positions([_Layer(*layer) for layer in layers], leading)
    rows = [at.row(NodeKind.EMBED, None)] + ([at.row(NodeKind.MLP, -1)] if leading else [])
    for index, (heads, groups, _components) in enumerate(layers):
        rows += [at.row(NodeKind.HEAD, index), at.row(NodeKind.MLP, index)]
        xs = [at.head_x(index, h) for h in range(heads)]
        assert xs == sorted(xs) and len(set(xs)) == heads
        assert min(xs) >= -0.5 and max(xs) <= at.width - 0.5
        for g in range(groups):
            members = [at.head_x(index, h) for h in range(heads) if h * groups // heads == g]
            assert min(members) <= at.group_x(index, g) <= max(members)
            assert at.receiver(names.attention_input(names.kv_group(index, g), names.Role.KEY))[1] < rows[-2]
    for layer in range(-1, len(layers)):
        spots = [at.node(names.mlp(layer, k)) for k in range(at.components_after(layer))]
        assert [x for x, _ in spots] == sorted({x for x, _ in spots}) and all(-0.5 <= x <= at.width - 0.5 for x, _ in spots)
        assert {y for _, y in spots} <= {at.row(NodeKind.MLP, layer)}
    rows.append(at.row(NodeKind.RESID_POST, None))
    assert rows == sorted(rows) and len(set(rows)) == len(rows), "embed at the bottom, resid_post at the top"
    assert at.rows > max(rows)
    for role in names.Role:
        assert at.receiver(names.attention_input(names.head(0, 0), role))[1] < at.row(NodeKind.HEAD, 0)
    offsets = [at.receiver(names.attention_input(names.head(0, 0), r))[0] for r in names.Role]
    assert len(set(offsets)) == 3, "query, key and value inputs land at different places"


def _circuit(architecture, edges, groups=None) -> Circuit:
    return Circuit(
        edges=tuple(CircuitEdge(s, r, e) for s, r, e in edges),
        threshold=0.1,
        metric="kl",
        precision="fp32",
        abs_threshold=False,
        model={"name": "toy"},
        task={"name": "toy"},
        stats=RunStats(0, 0, 0, 0, 0),
        total_edges=40,
        groups={"a0.g0": ["a0.h0", "a0.h1"], "a0.g1": ["a0.h2", "a0.h3"]} if groups is None else groups,
        architecture=architecture,
    )


LAYERS = st.tuples(st.sampled_from([(1, 1), (4, 4), (4, 2), (8, 2), (6, 3), (3, 1)]), st.integers(0, 3), st.booleans())


@st.composite
def circuits(draw) -> Circuit:
    """A random model (heads, key/value groups, whole components, post-attention norms, leading components) and a
    random set of its edges, each from a node to one computed later."""
    layers = draw(st.lists(LAYERS, min_size=1, max_size=4))
    leading = draw(st.integers(0, 2))
    architecture = tuple(
        {"heads": h, "kv_groups": g, "mlp": c > 0, "components": c, "output_norm": norm, "leading": leading}
        for (h, g), c, norm in layers
    )
    order = {names.EMBED: (-2, 0, 0)} | {names.mlp(-1, k): (-1, 2, k) for k in range(leading)}
    receivers = [(names.RESID_POST, (99, 0, 0))] + [(name, key) for name, key in order.items() if key[0] == -1]
    for index, ((heads, groups), components, norm) in enumerate(layers):
        for h in range(heads):
            order[names.head(index, h)] = (index, 0, h)
            receivers.append((names.attention_input(names.head(index, h), names.Role.QUERY), (index, 0, h)))
            if groups == heads:
                receivers += [
                    (names.attention_input(names.head(index, h), r), (index, 0, h)) for r in (names.Role.KEY, names.Role.VALUE)
                ]
        if groups != heads:
            for g in range(groups):
                receivers += [
                    (names.attention_input(names.kv_group(index, g), r), (index, 0, 0))
                    for r in (names.Role.KEY, names.Role.VALUE)
                ]
        if norm:
            order[names.attention_output(index)] = (index, 1, 0)
            receivers.append((names.attention_output(index), (index, 1, 0)))
        for k in range(components):
            order[names.mlp(index, k)] = (index, 2, k)
            receivers.append((names.mlp(index, k), (index, 2, k)))
    possible = sorted(
        (sender, receiver)
        for sender, before in order.items()
        for receiver, after in receivers
        if before < after and not (before[:2] == after[:2] == (before[0], 0))
    )
    chosen = draw(st.lists(st.sampled_from(possible), min_size=1, max_size=40, unique=True))
    effects = draw(st.lists(st.floats(0.001, 10.0), min_size=len(chosen), max_size=len(chosen)))
    groups = {
        names.kv_group(i, g): [names.head(i, h) for h in range(heads) if h * groups_ // heads == g]
        for i, ((heads, groups_), _, _) in enumerate(layers)
        if groups_ != heads
        for g in range(groups_)
    }
    return _circuit(architecture, [(s, r, e) for (s, r), e in zip(chosen, effects, strict=True)], groups)


def _crosses(a: tuple[float, float], b: tuple[float, float], box) -> bool:
    """Whether the axis-parallel segment a-b enters the inside of ``box``."""
    eps = 1e-6
    return (
        min(a[0], b[0]) < box.right - eps
        and max(a[0], b[0]) > box.left + eps
        and min(a[1], b[1]) < box.top - eps
        and max(a[1], b[1]) > box.bottom + eps
    )


@settings(max_examples=60, deadline=None)
@given(circuits(), st.sampled_from([None, 1, 5, 50]))
def test_edges_pass_between_boxes_and_only_drawn_nodes_are_active(circuit, top_k):
    """Every drawn edge runs in horizontal and vertical segments from its sender's top to its receiver's input and
    enters no box but its own two endpoints'; the active nodes are exactly the drawn edges' endpoints."""
    picture = lay_out(circuit, top_k=top_k)
    drawn = [route.edge for route in picture.routes]
    assert drawn == select_edges(circuit.edges, top_k, 0.0)
    assert picture.left_out == len(circuit.edges) - len(drawn)
    assert picture.active == {e.sender for e in drawn} | {names.node_of(e.receiver) for e in drawn}
    for route in picture.routes:
        sender, receiver = route.edge.sender, names.node_of(route.edge.receiver)
        own = {sender, receiver}
        start, end = route.points[0], route.points[-1]
        assert start == (picture.boxes[sender].x, picture.boxes[sender].top)
        if receiver in picture.boxes:
            assert end[1] == picture.boxes[receiver].bottom
        for a, b in zip(route.points, route.points[1:], strict=False):
            assert a[0] == b[0] or a[1] == b[1], f"{route.edge}: a slanted segment {a} -> {b}"
            assert min(a[0], b[0]) >= -1.0 and max(a[0], b[0]) <= picture.width + 0.2
            for box in picture.boxes.values():
                assert box.name in own or not _crosses(a, b, box), f"{sender} -> {route.edge.receiver} crosses {box.name}"


def test_the_reported_crossing_is_routed_around():
    """a0.h0 -> m1 was drawn straight through the a1.h1 box (and m0); a head with no edge of its own was active."""
    architecture = ({"heads": 2, "kv_groups": 2, "mlp": True}, {"heads": 2, "kv_groups": 2, "mlp": True})
    picture = lay_out(_circuit(architecture, [("a0.h0", "m1", 1.0), ("a1.h0", "resid_post", 0.5)], groups={}))
    (route, _) = picture.routes
    assert not any(
        _crosses(a, b, picture.boxes[name])
        for a, b in zip(route.points, route.points[1:], strict=False)
        for name in ("a1.h1", "a1.h0", "m0")
    )
    assert picture.active == {"a0.h0", "m1", "a1.h0", "resid_post"}


def test_top_k_and_min_effect_choose_the_largest_edges(tmp_path):
    edges = [("embed", f"a0.h{h % 4}.{'qkv'[h // 4]}", float(h + 1)) for h in range(12)]
    circuit = _circuit(({"heads": 4, "kv_groups": 4, "mlp": True},), edges, groups={})
    assert [e.effect for e in select_edges(circuit.edges, 3, 0.0)] == [12.0, 11.0, 10.0]
    assert [e.effect for e in select_edges(circuit.edges, None, 9.5)] == [12.0, 11.0, 10.0]
    assert len(select_edges(circuit.edges, 5, 11.0)) == 2 and len(select_edges(circuit.edges, None, 0.0)) == 12
    for bad in ({"top_k": 0}, {"top_k": 2.5}, {"min_effect": -1.0}, {"min_effect": float("nan")}):
        with pytest.raises(PahqError):
            select_edges(circuit.edges, **{"top_k": None, "min_effect": 0.0, **bad})
    svg = draw_circuit(circuit, tmp_path / "c.svg", top_k=3)[0].read_text()
    assert "9 weaker not drawn" in svg
    assert "not drawn" not in circuit.draw(tmp_path / "all.svg", top_k=None).read_text()


@pytest.mark.parametrize("with_architecture", [True, False], ids=["recorded", "from-names"])
def test_svg_shows_every_head_the_groups_and_the_roles(tmp_path, with_architecture):
    architecture = ({"heads": 4, "kv_groups": 2, "mlp": True}, {"heads": 4, "kv_groups": 2, "mlp": True})
    circuit = _circuit(
        architecture if with_architecture else (),
        [
            ("embed", "a0.g1.v", 1.5),
            ("embed", "a0.h3.q", 0.2),
            ("a0.h3", "a1.g0.k", 0.4),
            ("a1.h1", "m1", 0.3),
            ("m1", "resid_post", 2.0),
            ("a0.h0", "resid_post", 0.1),
            ("m0", "a1.h3.q", 0.2),
        ],
    )
    svg_path, png_path = draw_circuit(circuit, tmp_path / "c.svg", tmp_path / "c.png")
    svg = svg_path.read_text()
    for layer in (0, 1):
        for h in range(4):
            assert f"a{layer}.h{h}" in svg
    assert "g1" in svg and "to query" in svg and "to key" in svg and "to value" in svg
    assert "resid_post" in svg and "embed" in svg and "m1" in svg
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        draw_circuit(circuit, tmp_path / "c.png", tmp_path / "c.pdf")
    assert circuit.draw(tmp_path / "one.svg") == tmp_path / "one.svg" and "a1.h3" in (tmp_path / "one.svg").read_text()


def test_cli_draws_png_and_svg_without_graphviz(tmp_path):
    python_only = tmp_path / "bin"
    python_only.mkdir()
    for tool in ("pahq-fx", "python"):
        source = Path(sys.executable).with_name(tool)
        if source.exists():
            (python_only / tool).symlink_to(source)
    env = {**os.environ, "PATH": str(python_only)}
    assert shutil.which("dot", path=env["PATH"]) is None
    out = tmp_path / "out"
    result = run(
        "discover",
        "--model",
        "llama-ioi",
        "--task",
        "ioi",
        "--n",
        "8",
        "--threshold",
        "0.05",
        "--precision",
        "fp32",
        "--no-progress",
        "--draw-top-k",
        "3",
        "--out",
        str(out),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "circuit.png").read_bytes()[:4] == b"\x89PNG"
    svg = (out / "circuit.svg").read_text()
    circuit = pahq_fx.Circuit.load(out / "circuit.json")
    assert circuit.architecture and all(node in svg for node in circuit.nodes)
    assert len(circuit.edges) > 3 and f"the 3 largest; {len(circuit.edges) - 3} weaker not drawn" in svg
    assert "circuit.png, circuit.svg" in result.stdout
