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
from pahq_fx import names
from pahq_fx.acdc.circuit import Circuit, CircuitEdge, RunStats
from pahq_fx.acdc.drawing import _Layer, _Positions, draw_circuit
from pahq_fx.names import NodeKind
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


def _circuit(architecture, edges) -> Circuit:
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
        groups={"a0.g0": ["a0.h0", "a0.h1"], "a0.g1": ["a0.h2", "a0.h3"]},
        architecture=architecture,
    )


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
        "--out",
        str(out),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "circuit.png").read_bytes()[:4] == b"\x89PNG"
    svg = (out / "circuit.svg").read_text()
    circuit = pahq_fx.Circuit.load(out / "circuit.json")
    assert circuit.architecture and all(node in svg for node in circuit.nodes)
    assert "circuit.png, circuit.svg" in result.stdout
