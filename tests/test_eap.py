"""EAP-IG / MIB graph files: the name mapping, the files both ways on GPT-2, GPT-NeoX and Llama (grouped keys and
values), a file written by hand from EAP-IG's layout, what the format cannot express, and evaluating such a file."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from builders import Spec, build, token_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc import Circuit, CircuitEdge, EdgeGraph, RunStats, evaluate_circuit
from pahq_fx.acdc.eap_graph import layout_of
from pahq_fx.errors import CircuitFormatError
from pahq_fx.ir import names
from pahq_fx.ir.names import Role

FIXTURE = Path(__file__).parent / "fixtures" / "eap_gpt2_1layer_2heads.json"
# What the hand-written fixture holds, in pahq_fx's names: kept edges and tested removals with their scores.
FIXTURE_KEPT = {
    ("embed", "a0.h0.q"): 0.5,
    ("embed", "a0.h0.v"): 0.25,
    ("embed", "m0"): 1.5,
    ("a0.h0", "m0"): 0.125,
    ("a0.h0", "resid_post"): 0.75,
    ("m0", "resid_post"): 2.0,
}
FIXTURE_REMOVED = {("embed", "a0.h0.k"): -0.03125, ("a0.h1", "m0"): 0.0625, ("embed", "resid_post"): 0.01}
SPECS = {
    "gpt2": Spec("gpt2", 2, 2, 2, 4),
    "neox": Spec("neox", 2, 2, 2, 4, parallel=True),
    "llama": Spec("llama", 2, 4, 2, 4),  # two key/value groups of two heads
}


def head_graph_of(model: torch.nn.Module) -> pahq_fx.HeadGraph:
    return pahq_fx.transform(model, precision="fp32", compile=False).head_graph


@pytest.fixture(scope="module")
def head_graphs() -> dict[str, pahq_fx.HeadGraph]:
    return {family: head_graph_of(build(spec)) for family, spec in SPECS.items()}


def circuit_of(kept: dict, removed: dict, total: int) -> Circuit:
    return Circuit(
        edges=tuple(CircuitEdge(s, r, e) for (s, r), e in kept.items()),
        threshold=0.1,
        metric="kl",
        precision="fp32",
        abs_threshold=False,
        model={"class": "test"},
        task={},
        stats=RunStats(0.0, 0, 0.0, 0.0, 0),
        total_edges=total,
        removed=tuple(CircuitEdge(s, r, e) for (s, r), e in removed.items()),
    )


def scores(edges) -> dict[tuple[str, str], float]:
    return {(e.sender, e.receiver): e.effect for e in edges}


@given(layer=st.integers(0, 99), head=st.integers(0, 99), other=st.integers(0, 99), role=st.sampled_from(list(Role)))
def test_edge_names_map_both_ways(layer, head, other, role):
    receiver = names.attention_input(names.head(layer, head), role)
    for sender in (names.EMBED, names.head(max(layer - 1, 0), other), names.mlp(layer)):
        for target in (receiver, names.mlp(layer + 1), names.RESID_POST):
            assert names.from_eap_edge(names.eap_edge(sender, target)) == (sender, target)
    assert names.eap_edge(names.EMBED, receiver) == f"input->a{layer}.h{head}<{role.value}>"
    assert names.eap_edge(names.mlp(layer), names.RESID_POST) == f"m{layer}->logits"


@pytest.mark.parametrize("node", ["a0.out", "a1.g0", "m1.1", "m-1"])
def test_what_eap_cannot_name_is_an_error_naming_it(node):
    with pytest.raises(CircuitFormatError, match=rf"^{node} is .*EAP-IG/MIB graphs have only"):
        names.eap_node(node)


@pytest.mark.parametrize("bad", ["input->a0.h0", "a0.h0->a1.h0<x>", "logits->m0", "m0->input", "a0.g0->m1"])
def test_other_edge_names_are_refused(bad):
    with pytest.raises(CircuitFormatError, match="not an EAP-IG edge name"):
        names.from_eap_edge(bad)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), family=st.sampled_from(sorted(SPECS)))
def test_round_trip_json_and_pt(tmp_path_factory, head_graphs, data, family):
    """pahq_fx -> EAP-IG -> pahq_fx: the same kept edges and scores, the same tested removals (nonzero effects),
    every edge of the model's graph in the file; under grouped keys and values to one rounding."""
    head_graph = head_graphs[family]
    edges = [(e.sender, e.receiver) for e in EdgeGraph(head_graph).edges()]
    status = data.draw(st.lists(st.sampled_from(["kept", "removed", "untested"]), min_size=len(edges), max_size=len(edges)))
    effect = st.floats(-8, 8, allow_nan=False).filter(lambda x: abs(x) > 1e-6)
    values = data.draw(st.lists(effect, min_size=len(edges), max_size=len(edges)))
    kept = {e: v for e, s, v in zip(edges, status, values, strict=True) if s == "kept"}
    removed = {e: v for e, s, v in zip(edges, status, values, strict=True) if s == "removed"}
    circuit = circuit_of(kept, removed, len(edges))
    layout = layout_of(head_graph)
    folder = tmp_path_factory.mktemp("eap")
    circuit.to_eap_json(folder / "graph.json", head_graph)
    circuit.to_eap_pt(folder / "graph.pt", head_graph)

    written = json.loads((folder / "graph.json").read_text())
    assert written["cfg"] == layout.cfg and list(written["edges"]) == [f"{p}->{c}" for p, c in layout.edges()]
    assert sum(e["in_graph"] for e in written["edges"].values()) == sum(layout.share(r) for _, r in kept)
    for suffix, rel in ((".json", 1e-15), (".pt", 1e-6)):  # the .pt form holds float32 scores, as EAP-IG's does
        back = pahq_fx.load_circuit(folder / f"graph{suffix}", head_graph)
        assert back.edge_set() == set(kept) and set(scores(back.removed)) == set(removed)
        for original, read in ((kept, scores(back.edges)), (removed, scores(back.removed))):
            for edge, value in original.items():
                assert math.isclose(read[edge], value, rel_tol=rel, abs_tol=1e-300), (suffix, edge)
    if family == "llama":  # without the model's groups: per-head key/value edges, folded again on evaluation
        per_head = pahq_fx.load_circuit(folder / "graph.json")
        assert all(names.parse(r).kind is not names.NodeKind.KV_GROUP for _, r in per_head.edge_set())
        assert {(s, layout.receiver(r)) for s, r in per_head.edge_set()} == set(kept)


def test_hand_written_fixture_loads_and_evaluates():
    """A file written by hand from EAP-IG's documented layout (not by our writer) reads as the circuit it holds, and
    evaluates as that circuit's own edges do."""
    circuit = pahq_fx.load_circuit(FIXTURE)
    assert scores(circuit.edges) == FIXTURE_KEPT and scores(circuit.removed) == FIXTURE_REMOVED
    assert circuit.total_edges == 13 and circuit.architecture[0]["parallel"] is False
    model = build(Spec("gpt2", 1, 2, 2, 8))
    assert pahq_fx.load_circuit(FIXTURE, head_graph_of(model)).edge_set() == set(FIXTURE_KEPT)
    task = pahq_fx.Task(token_ids(3, 5, seed=3), token_ids(3, 5, seed=4))
    assert circuit.evaluate(model, task) == evaluate_circuit(set(FIXTURE_KEPT), model, task)


def _hand_built_pt(path: Path) -> None:
    """The fixture's circuit as EAP-IG's ``to_pt`` lays it out, indices from its documented formulas (1 layer,
    2 heads): forward input 0, a0.h{h} 1 + h, m0 3; backward a0.h{h}<q|k|v> 2 * 'qkv'.index(x) + h, m0 6, logits 7."""
    src, dst = ["input", "a0.h0", "a0.h1", "m0"], [f"a0.h{h}<{x}>" for x in "qkv" for h in range(2)] + ["m0", "logits"]
    data = json.loads(FIXTURE.read_text())
    scores_, in_graph = torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bool)
    for name, edge in data["edges"].items():
        parent, child = name.split("->")
        scores_[src.index(parent), dst.index(child)] = edge["score"]
        in_graph[src.index(parent), dst.index(child)] = edge["in_graph"]
    torch.save(
        {
            "cfg": data["cfg"],
            "src_nodes": src,
            "dst_nodes": dst,
            "edges_scores": scores_,
            "edges_in_graph": in_graph,
            "nodes_in_graph": torch.tensor([True, True, False, True]),
        },
        path,
    )


def test_hand_built_pt_loads_and_our_writer_lays_it_out_the_same(tmp_path):
    _hand_built_pt(tmp_path / "hand.pt")
    circuit = pahq_fx.load_circuit(tmp_path / "hand.pt")
    assert circuit.edge_set() == set(FIXTURE_KEPT) and set(scores(circuit.removed)) == set(FIXTURE_REMOVED)
    assert all(math.isclose(scores(circuit.edges)[e], v, rel_tol=1e-6) for e, v in FIXTURE_KEPT.items())
    circuit.to_eap_pt(tmp_path / "ours.pt")
    hand, ours = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("hand", "ours"))
    for key in ("src_nodes", "dst_nodes", "cfg"):
        assert hand[key] == ours[key]
    for key in ("edges_scores", "edges_in_graph", "nodes_in_graph"):
        assert torch.equal(hand[key], ours[key]), key
    pahq_fx.load_circuit(FIXTURE).to_eap_json(tmp_path / "ours.json")  # JSON scores are exact, .pt ones float32
    assert json.loads((tmp_path / "ours.json").read_text()) == json.loads(FIXTURE.read_text())


def test_a_file_for_another_model_is_one_line_naming_the_mismatch(head_graphs):
    with pytest.raises(CircuitFormatError, match=r"written for another model: n_layers=1 in the file, 2 in this model"):
        pahq_fx.load_circuit(FIXTURE, head_graphs["gpt2"])
    model = build(SPECS["neox"])
    task = pahq_fx.Task(token_ids(2, 5), token_ids(2, 5, seed=2))
    with pytest.raises(CircuitFormatError, match=r"parallel_attn_mlp=False in the file, True in this model") as error:
        pahq_fx.load_circuit(FIXTURE).evaluate(model, task)
    assert "\n" not in str(error.value)


def test_post_attention_norms_are_refused_by_name():
    gemma = build(Spec("gemma2", 1, 2, 2, 8))
    circuit = circuit_of({("embed", "a0.h0.q"): 1.0}, {}, 1)
    with pytest.raises(CircuitFormatError, match=r"^a0\.out is a post-attention norm"):
        circuit.to_eap_json("never.json", head_graph_of(gemma))


def test_a_hybrids_extra_components_are_refused_by_name(tmp_path):
    layer = {"heads": 2, "kv_groups": 2, "mlp": True, "components": 2, "output_norm": False, "parallel": False, "d_model": 8}
    circuit = dataclasses.replace(circuit_of({}, {}, 0), architecture=(layer,))
    with pytest.raises(CircuitFormatError, match=r"^m0\.1 is a whole component beyond one MLP"):
        circuit.to_eap_json(tmp_path / "never.json")
    old = dataclasses.replace(circuit_of({}, {}, 0), architecture=({"heads": 2, "kv_groups": 2, "mlp": True},))
    with pytest.raises(CircuitFormatError, match="pass the model's head_graph"):
        old.to_eap_json(tmp_path / "never.json")


def test_a_group_split_by_a_file_is_kept_whole_with_a_warning(tmp_path, head_graphs):
    layout = layout_of(head_graphs["llama"])
    # head 0 of group 0 keeps its key input from the embedding, head 1 (same group) does not
    edges = {f"{p}->{c}": {"score": 0.0, "in_graph": False} for p, c in layout.edges()}
    edges["input->a1.h0<k>"] = {"score": 0.5, "in_graph": True}
    edges["input->a1.h1<k>"] = {"score": 0.25, "in_graph": False}
    nodes = {n: {"in_graph": False} for n in [*layout.src_nodes(), "logits"]}
    (tmp_path / "split.json").write_text(json.dumps({"cfg": layout.cfg, "nodes": nodes, "edges": edges}))
    with pytest.warns(UserWarning, match="only some heads of 1 key/value group"):
        circuit = pahq_fx.load_circuit(tmp_path / "split.json", head_graphs["llama"])
    assert scores(circuit.edges) == {("embed", "a1.g0.k"): 0.75}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "{not json", "is not a circuit file pahq_fx reads"),
        ("other.json", '{"cfg": {}}', "is not an EAP-IG graph file"),
        ("cfg.json", '{"cfg": {"n_layers": 1}, "nodes": {}, "edges": {}}', "cfg lacks n_heads, parallel_attn_mlp, d_model"),
        ("bad.pt", "not a torch file", "is not a torch file"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(CircuitFormatError, match=message):
        pahq_fx.load_circuit(tmp_path / name)


def test_neuron_level_files_are_refused(tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["nodes"]["m0"]["neurons"] = [True] * 16
    (tmp_path / "neurons.json").write_text(json.dumps(data))
    with pytest.raises(CircuitFormatError, match="is a neuron-level circuit"):
        pahq_fx.load_circuit(tmp_path / "neurons.json")


def test_edges_missing_from_a_file_are_named(tmp_path):
    data = json.loads(FIXTURE.read_text())
    del data["edges"]["m0->logits"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(CircuitFormatError, match=r"missing \['m0->logits'\]"):
        pahq_fx.load_circuit(tmp_path / "short.json")


@pytest.mark.parametrize("model_name", ["gpt2-induction", "llama-ioi"])
def test_evaluate_gives_the_same_numbers_for_our_file_and_eap_files(tmp_path, capsys, model_name):
    """``pahq-fx evaluate`` of a circuit.json and of its EAP-IG .json and .pt (written from the circuit's own record,
    without the model): the same metric values, grouped key/value inputs (llama-ioi) included."""
    from pahq_fx import cli, zoo
    from pahq_fx.tasks import make_task

    task_name = {"gpt2-induction": "induction", "llama-ioi": "ioi"}[model_name]
    model, tokenizer = zoo.load(model_name)
    task = make_task(task_name, tokenizer, n=8, seed=0)
    circuit = pahq_fx.discover(model, task, threshold=0.05, precision="fp32", progress=False)
    assert circuit.edges and len(circuit.edges) < circuit.total_edges
    circuit.save(tmp_path / "circuit.json")
    circuit.to_eap_json(tmp_path / "graph.json")
    circuit.to_eap_pt(tmp_path / "graph.pt")
    printed = []
    for file in ("circuit.json", "graph.json", "graph.pt"):
        argv = ["evaluate", "--circuit", str(tmp_path / file), "--model", model_name, "--task", task_name, "--n", "8"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a file of our own circuit splits no key/value group
            assert cli.main([*argv, "--metric", "kl"]) == 0
        printed.append(capsys.readouterr().out.split("edges; ")[1])
    assert printed[0] == printed[1] == printed[2] and "normalised faithfulness" in printed[0]
