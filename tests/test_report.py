"""What a discover run writes besides the picture: report.md's edge list and circuit.dot's edges."""

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from pahq_fx.acdc.circuit import CircuitEdge
from pahq_fx.acdc.evaluation import Faithfulness
from pahq_fx.cli import REPORT_EDGES, _report
from pahq_fx.ir.names import node_of
from tests.test_drawing import _circuit, circuits


@settings(max_examples=20, deadline=None)
@given(circuits(), st.integers(0, 2 * REPORT_EDGES))
def test_report_lists_edges_largest_first_and_dot_holds_circuit_edges_only(circuit, extra):
    """report.md lists the edges by effect, largest first, up to REPORT_EDGES with a count of the rest; report.json
    holds all; every arrow of circuit.dot is a circuit edge and every circuit edge an arrow."""
    padding = tuple(CircuitEdge("embed", "resid_post", 1e-4 * (i + 1)) for i in range(extra))
    circuit = dataclasses.replace(circuit, edges=circuit.edges + padding, faithfulness=Faithfulness("kl", 0.1, 0.0, 1.0))
    data, markdown = _report(circuit, None, "toy")
    effects = [e["effect"] for e in data["edges"]]
    assert len(effects) == len(circuit.edges) and effects == sorted(effects, key=abs, reverse=True)
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    shown = min(len(circuit.edges), REPORT_EDGES)
    assert [row.split("|")[2].strip() for row in rows] == [e["sender"] for e in data["edges"][:shown]]
    assert (f"{len(circuit.edges) - REPORT_EDGES} more edges" in markdown) == (len(circuit.edges) > REPORT_EDGES)
    dot = circuit.to_dot()
    arrows = [line.split('"')[1::2][:2] for line in dot.splitlines() if " -> " in line]
    assert sorted(map(tuple, arrows)) == sorted((e.sender, node_of(e.receiver)) for e in circuit.edges)


def test_dot_shows_a_group_as_a_cluster_not_as_edges():
    circuit = _circuit((), [("embed", "a0.g1.v", 1.5), ("a0.h3", "resid_post", 0.4)])
    dot = circuit.to_dot()
    assert 'subgraph "cluster_a0_g1" { label="a0.g1: keys and values of a0.h2, a0.h3"; style=dashed; color=grey;' in dot
    assert '"a0.g1"; "a0.h3"; }' in dot and '"a0.h2"' not in dot and "a0.g0" not in dot
    assert dot.count(" -> ") == 2
