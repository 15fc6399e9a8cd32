"""Bad input to the newest features (graph files, circuit files, score files, --max-memory and plan's arguments, the
checkpoint's state file): one line naming the file, field and value, exit 2 from the command line, never a traceback,
a silent misreading or code run from a file."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from transformers import LlamaConfig

import pahq_fx
from pahq_fx import cli
from pahq_fx.acdc import state_io
from pahq_fx.acdc.eap_graph import EapLayout, edge_count, node_counts
from pahq_fx.acdc.mib import check_fractions, edge_rows
from pahq_fx.acdc.scores import EdgeScore, EdgeScores, eap_layout, load_scores
from pahq_fx.acdc.search import prepare, search
from pahq_fx.errors import CircuitFormatError, PahqError, PlanError
from pahq_fx.memory_size import parse_bytes
from tests.builders import Spec, build, token_ids

FIXTURE = Path(__file__).parent / "fixtures" / "eap_gpt2_1layer_2heads.json"
GRAPH = json.loads(FIXTURE.read_text())
Q = "input->a0.h0<q>"


def _edit(change):
    data = copy.deepcopy(GRAPH)
    change(data)
    return data


def _edge(**fields):
    return lambda d: d["edges"][Q].update(fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_edge(score=float("nan")), f"edge {Q} has score nan: a score must be a finite number"),
        (_edge(score="0.5"), "has score '0.5': a score must be a finite number"),
        (_edge(score=True), "has score True"),
        (_edge(in_graph="false"), f"edge {Q} has in_graph='false': it must be true or false"),
        (lambda d: d["edges"].update({Q: [0.5, True]}), f"edge {Q} must be an object with score and in_graph"),
        (lambda d: d.update(edges=[]), "nodes and edges must be JSON objects"),
        (lambda d: d.update(cfg=None), "its cfg must be an object with n_layers"),
        (lambda d: d["cfg"].update(n_layers=1.5), "its cfg has n_layers=1.5: it must be a positive integer"),
        (lambda d: d["cfg"].update(n_heads="2"), "its cfg has n_heads='2'"),
        (lambda d: d["cfg"].update(parallel_attn_mlp="false"), "parallel_attn_mlp='false': it must be true or false"),
        (lambda d: d["cfg"].update(n_layers=10**9), r"it lists 13 edges, an EAP-IG graph with cfg .* has 10500000001500000001"),
    ],
    ids=["nan", "string-score", "bool-score", "string-in-graph", "edge-list", "edges-list", "cfg-null", "float-size",
         "string-size", "string-flag", "forged-size"],
)  # fmt: skip
def test_a_malformed_graph_json_names_the_edge_or_setting(tmp_path, change, message):
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(_edit(change)))
    with pytest.raises(CircuitFormatError, match=message):
        pahq_fx.load_circuit(path)
    with pytest.raises(PahqError, match=message):
        load_scores(path)


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAHQ_PROBE_MARK']}",))


def _pt(**changes):
    layout = EapLayout.from_cfg(GRAPH["cfg"])
    src, dst = layout.src_nodes(), layout.dst_nodes()
    data = {
        "cfg": GRAPH["cfg"],
        "src_nodes": src,
        "dst_nodes": dst,
        "edges_scores": torch.zeros(len(src), len(dst)),
        "edges_in_graph": torch.zeros(len(src), len(dst), dtype=torch.bool),
        "nodes_in_graph": torch.ones(len(src), dtype=torch.bool),
    }
    return {**data, **changes}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a torch file of plain tensors and dicts"),
        (_pt(edges_scores=torch.full((4, 8), float("nan"))), "has score nan: a score must be a finite number"),
        (_pt(edges_in_graph=torch.full((4, 8), 0.5)), "edges_in_graph must be a bool tensor"),
        (_pt(edges_scores=torch.zeros(4, 8).to_sparse()), "edges_scores must be a dense 4 x 8 tensor"),
        (_pt(src_nodes=5), "src_nodes / dst_nodes are not those of an EAP-IG graph"),
        (_pt(cfg=torch.zeros(2)), "its cfg must be an object"),
        ({"cfg": _Planted()}, "is not a torch file of plain tensors and dicts"),
    ],
    ids=["empty", "nan", "float-membership", "sparse", "int-nodes", "tensor-cfg", "pickled-code"],
)
def test_a_malformed_graph_pt_is_one_line_and_runs_nothing(tmp_path, monkeypatch, content, message):
    mark = tmp_path / "ran"
    monkeypatch.setenv("PAHQ_PROBE_MARK", str(mark))
    path = tmp_path / "graph.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CircuitFormatError, match=message) as raised:
        pahq_fx.load_circuit(path)
    assert "\n" not in str(raised.value) and not mark.exists()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.booleans())
def test_the_counts_checked_before_building_a_graph_are_its_own(n_layers, n_heads, parallel):
    layout = EapLayout(n_layers, n_heads, parallel, 8, (None,) * n_layers)
    assert edge_count(n_layers, n_heads, parallel) == len(layout.edges())
    assert node_counts(n_layers, n_heads) == (len(layout.src_nodes()), len(layout.dst_nodes()))


@pytest.fixture(scope="module")
def circuit_json(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("circuit") / "circuit.json"
    pahq_fx.load_circuit(FIXTURE).save(path)
    return json.loads(path.read_text())


def _first(field, value):
    return lambda d: d["edges"][0].update({field: value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_first("sender", "a0.h0\nm0"), r"edges\[0\].sender: 'a0.h0\\nm0' is not a canonical node name"),
        (_first("sender", 5), r"edges\[0\].sender must be a node name, got 5"),
        (_first("receiver", "a3.h0.q"), r"edges\[0\].receiver names 'a3.h0.q', but the circuit's model has 1 layers"),
        (_first("receiver", "a0.h9.q"), r"edges\[0\].receiver names 'a0.h9.q', but layer 0 has 2 heads"),
        (_first("effect", "big"), r"edges\[0\] has effect 'big': it must be a number"),
        (lambda d: d.update(groups=[1]), "groups must map each key/value group to a list of its heads"),
        (lambda d: d.update(architecture=[{"heads": "x"}]), r"architecture\[0\].heads must be a positive integer"),
        (lambda d: d.update(task=None), "task must be an object, got None"),
        (lambda d: d.pop("edges"), "it lacks edges"),
    ],
    ids=["newline", "int-name", "layer", "head", "effect", "groups", "architecture", "task", "no-edges"],
)
def test_a_malformed_circuit_json_names_the_field(tmp_path, circuit_json, change, message):
    data = copy.deepcopy(circuit_json)
    change(data)
    path = tmp_path / "circuit.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CircuitFormatError, match=f"{path} is not a circuit file written by pahq_fx: {message}"):
        pahq_fx.load_circuit(path)


def test_a_score_file_with_a_nan_score_is_refused(tmp_path):
    scores = EdgeScores(scores=(EdgeScore("embed", "resid_post", 1.0), EdgeScore("embed", "m0", float("nan"))), metric="kl")
    scores.save(tmp_path / "scores.json")
    with pytest.raises(PahqError, match="edge embed -> m0 has score nan: a score must be a finite number"):
        load_scores(tmp_path / "scores.json")


@pytest.fixture(scope="module")
def grouped():
    """A grouped-query model's session, and its runtime stopped after a few receivers (a state worth saving)."""
    task = pahq_fx.Task(token_ids(3, 6, seed=3), token_ids(3, 6, seed=4))
    session = prepare(build(Spec("llama", 2, 4, 2, 4)), task, precision="fp32")

    def stop(done):
        if done.index == 5:
            raise StopIteration

    with contextlib.suppress(StopIteration):
        search(session, 0.005, progress=False, callback=stop)
    return session


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**16))
def test_an_importances_file_of_a_grouped_model_evaluates_as_its_scores(tmp_path_factory, grouped, seed):
    """EAP-IG writes a key/value group's edge once per head (a share each); read back, the shares sum to the group's
    score, so that `pahq-fx scores`' own importances.json ranks the edges as its scores.json does."""
    edges = grouped.edges
    values = torch.randn(sum(len(r.senders) for r in edges.receivers), generator=torch.Generator().manual_seed(seed))
    named = [(edges.senders[s].name, r.name) for r in edges.receivers for s in r.senders]
    layout = eap_layout(edges)
    scores = EdgeScores(
        tuple(EdgeScore(s, r, float(v)) for (s, r), v in zip(named, values, strict=True)),
        metric="kl",
        eap_config=layout.cfg,
        eap_groups=layout.groups,
    )
    path = tmp_path_factory.mktemp("importances") / "importances.json"
    path.write_text(json.dumps(scores.to_eap_json()))
    assert edge_rows(edges, load_scores(path)) == pytest.approx(edge_rows(edges, scores), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    "fractions", [(), (0.0, 0.5), (0.5, 1.5), (0.5, 0.1), (float("nan"),), "0.5"], ids=str
)  # fmt: skip
def test_bad_edge_fractions_are_refused(fractions):
    with pytest.raises(PahqError, match="fractions must"):
        check_fractions(fractions)


@pytest.mark.parametrize("text", ["1e400", "1.2.3GB", ".", "0", "-1", "10XB", True, -5])
def test_a_memory_size_that_is_not_one_is_a_plan_error(text):
    with pytest.raises(PlanError, match="memory size"):
        parse_bytes(text)


def test_plan_json_replaces_a_planted_symlink(tmp_path):
    config = LlamaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=8, intermediate_size=16, vocab_size=50
    )
    result = pahq_fx.plan_from_config(config, 2, 4, max_memory="1GiB")
    target, link = tmp_path / "elsewhere.txt", tmp_path / "plan.json"
    target.write_text("keep")
    link.symlink_to(target)
    from pahq_fx.acdc.plan import write_json

    write_json(result, str(link))
    assert target.read_text() == "keep" and not link.is_symlink() and json.loads(link.read_text())["edges"] == result.edges


def _main(capsys, *args) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("discover", "--threshold", "0.1", "--max-memory", "1e400"), "argument --max-memory: a memory size must be at least"),
        (("sweep", "--thresholds", "0.1", "--max-memory", "1.2.3GB"), "argument --max-memory: not a memory size: '1.2.3GB'"),
        (("plan", "--max-memory", "0"), "argument --max-memory: a memory size must be at least one byte"),
        (("plan", "--layers", "a,b"), "argument --layers: must be comma-separated layer numbers, got 'a,b'"),
        (("plan", "--queries-per-role", "0"), "argument --queries-per-role: must be at least 1"),
        (("evaluate", "--circuit", "c.json", "--scores", "s.json"), "--scores, --out and --overwrite go with --curve"),
        (("evaluate", "--curve", "--circuit", "c.json", "--out", "o"), "evaluate --curve reads edge scores (--scores)"),
    ],
    ids=["discover-memory", "sweep-memory", "plan-memory", "layers", "queries", "scores-without-curve", "curve-circuit"],
)
def test_bad_arguments_of_the_newest_options_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    command, *rest = args
    out = () if command in ("plan", "evaluate") else ("--out", "o")
    code, err = _main(capsys, command, "--model", "llama-ioi", "--task", "ioi", *out, *rest)
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--config", "./missing/config.json", "--batch", "2", "--seq", "4"), "--config ./missing/config.json: no such file"),
        (("--config", "CONFIG", "--batch", "2", "--seq", "4", "--positions", "9"), "between 1 and batch x seq = 8, got 9"),
        (("--config", "JUNK", "--batch", "2", "--seq", "4"), "is not a Hugging Face configuration"),
    ],
    ids=["missing", "positions", "not-a-config"],
)
def test_plan_from_a_config_checks_its_sizes(tmp_path, capsys, args, message):
    LlamaConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, vocab_size=50).save_pretrained(tmp_path / "c")
    (tmp_path / "junk.json").write_text("[]")
    places = {"CONFIG": str(tmp_path / "c"), "JUNK": str(tmp_path / "junk.json")}
    code, err = _main(capsys, "plan", *(places.get(a, a) for a in args))
    assert code == 2 and err.count("\n") == 1 and message in err, err


def _layout(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["layout"])


def _with(data: bytes, change) -> bytes:
    tensors, layout = load(data), _layout(data)
    change(tensors, layout)
    return save(tensors, metadata={"layout": json.dumps(layout)})


def _first(layout: dict, field: str) -> int:
    return next(i for i, ref in enumerate(layout[field]) if ref is not None)


def _own(layout: dict, field: str) -> str:
    return next(ref for ref in layout[field] if isinstance(ref, str) and ref not in ("clean",) and not ref.startswith("read:"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, lay: t.update({_own(lay, "inputs"): t[_own(lay, "inputs")][:1].clone()}), "receiver inputs do not fit"),
        (lambda t, lay: t.update({_own(lay, "inputs"): t[_own(lay, "inputs")].double()}), "receiver inputs do not fit"),
        (lambda t, lay: t.update({lay["final"]: torch.zeros(3)}), "final read does not fit"),
        (lambda t, lay: lay["inputs"].append(None), "a model with other edges"),
        (lambda t, lay: lay["inputs"].__setitem__(_first(lay, "inputs"), "read:999"), "clean read of a step other than"),
        (lambda t, lay: lay.update(metric="abc"), "metric is not what pahq_fx writes"),
        (lambda t, lay: lay.update(active_from=999), "active_from is not what pahq_fx writes"),
        (lambda t, lay: lay.update(removed_from=[[999]] * len(lay["removed_from"])), "removed_from is not what"),
        (lambda t, lay: lay.pop("outputs"), "outputs is not what pahq_fx writes"),
        (lambda t, lay: lay["projections"].update({"x": lay["final"]}), "projections is not what pahq_fx writes"),
    ],
    ids=[
        "input-rows",
        "input-dtype",
        "input-count",
        "input-read",
        "final-shape",
        "metric",
        "active-from",
        "removed",
        "no-outputs",
        "projection-key",
    ],
)
def test_a_hand_edited_state_file_is_refused_whole(grouped, change, message):
    """A state file whose SHA-256 was recomputed into the checkpoint still has to be one pahq_fx wrote for this
    runtime: refused (the resume then replays every decision) and the runtime left as it was."""
    runtime = grouped.runtime
    data = state_io.encode(runtime)
    before = state_io.encode(runtime)
    with pytest.raises(state_io.StateMismatch, match=message):
        state_io.restore(runtime, _with(data, change))
    assert state_io.encode(runtime) == before
