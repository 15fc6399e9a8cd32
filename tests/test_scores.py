"""Exact edge scores equal a naive full forward per edge, and MIB's curves (pruning, exact evaluation, CPR, CMD)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc.evaluation import Faithfulness
from pahq_fx.acdc.mib import MIB_FRACTIONS, acdc_curve, edge_rows, mib_curves, prune, top_circuits, trapezoid
from pahq_fx.acdc.scores import EdgeScores, edge_scores, load_scores, scores_of_session
from pahq_fx.acdc.search import prepare
from pahq_fx.errors import PahqError
from tests.acdc_reference import ReferenceACDC
from tests.builders import VOCAB, Spec, build, token_ids
from tests.test_cli import run

SCORE_FAMILIES = ("gpt2", "neox", "llama", "opt")


@st.composite
def small_specs(draw) -> Spec:
    family = draw(st.sampled_from(SCORE_FAMILIES))
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([1, 2])) if family == "llama" else heads
    return Spec(
        family, draw(st.integers(1, 2)), heads, kv_heads, 4, parallel=draw(st.booleans()), seed=draw(st.integers(0, 2**16))
    )


def answered_task(seed: int) -> pahq_fx.Task:
    answers = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(seed))
    return pahq_fx.Task(
        token_ids(3, 6, seed=seed), token_ids(3, 6, seed=seed + 1), correct_ids=answers[0], incorrect_ids=answers[1]
    )


def logit_diff(ref: ReferenceACDC, task: pahq_fx.Task, removed: set) -> float:
    """The mean correct-minus-incorrect logit, from the reference's own full forward."""
    logits = ref.forward(ref.clean, removed, ref.corrupt_outputs)[1][:, -1]
    rows = torch.arange(logits.shape[0])
    return float((logits[rows, task.correct_ids] - logits[rows, task.incorrect_ids]).mean())


@settings(max_examples=8, deadline=None)
@given(spec=small_specs(), seed=st.integers(0, 1000), metric=st.sampled_from(["kl", "logit_diff"]), batch=st.booleans())
def test_exact_scores_equal_a_full_forward_per_edge(spec, seed, metric, batch):
    """Every edge's score is the reference's metric with that edge alone patched, minus the full model's: the KL
    increase, or the drop in logit difference (the sign rule: larger = more important), to FP32 round-off."""
    model, task = build(spec), answered_task(seed)
    scores = edge_scores(model, task, metric=metric, progress=False, allow_weak_task=True, batch=batch)
    ref = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask)
    expected_edges = {(s, r) for r, senders, _ in ref.receivers() for s in senders}
    assert set(scores.by_edge()) == expected_edges
    if metric == "kl":
        full = ref.kl(set())
        expected = {e: ref.kl({e}) - full for e in expected_edges}
    else:
        full = logit_diff(ref, task, set())
        expected = {e: full - logit_diff(ref, task, {e}) for e in expected_edges}
    for edge, score in scores.by_edge().items():
        assert score == pytest.approx(expected[edge], rel=1e-4, abs=1e-5), edge
    assert scores.stats.passes <= len(expected_edges)


@settings(max_examples=30, deadline=None)
@given(chosen=st.sets(st.integers(0, 45)))
def test_pruning_keeps_only_connected_edges_and_is_idempotent(chosen, small_session):
    """MIB's prune: a subset of the chosen edges in which every sender has an incoming edge (or is the embedding)
    and every receiver's node sends on (or is the final read); pruning twice changes nothing."""
    edges = small_session.edges
    every = [(row, s) for row, r in enumerate(edges.receivers) for s in r.senders]
    kept = prune(edges, {every[i % len(every)] for i in chosen})
    assert kept <= {every[i % len(every)] for i in chosen}
    assert prune(edges, kept) == kept
    feeds = [edges.feeding_senders(r) for r in edges.receivers]
    for row, s in kept:
        assert s == 0 or any(s in feeds[r] for r, _ in kept), "a sender with no incoming edge"
        assert not feeds[row] or any(x == t for _, x in kept for t in feeds[row]), "a receiver whose node sends nothing"


@pytest.fixture(scope="module")
def small_session():
    model = build(Spec("gpt2", 2, 2, 2, 4, seed=7))
    return prepare(model, answered_task(3), precision="fp32", compile=False, allow_weak_task=True)


def test_curve_circuits_are_evaluated_exactly(small_session):
    """Each point of a curve is the reference's metric with every edge outside the pruned top edges patched."""
    session = small_session
    scores = scores_of_session(session, progress=False)
    result = mib_curves(session.runtime, session.edges, scores)
    ref = ReferenceACDC(session.model, session.task.clean_input_ids, session.task.corrupted_input_ids, session.task.metric_mask)
    edges = session.edges
    every = {(edges.senders[s].name, r.name) for r in edges.receivers for s in r.senders}
    by_row = edge_rows(edges, scores)
    assert result.empty_circuit == pytest.approx(ref.kl(every), rel=1e-5)
    for curve, absolute in zip(result.curves, (False, True), strict=True):
        plans = top_circuits(edges, by_row, MIB_FRACTIONS, absolute)
        for point, (fraction, _, kept) in zip(curve.points, plans, strict=True):
            names = {(edges.senders[s].name, edges.receivers[row].name) for row, s in kept}
            assert (point.fraction, point.requested, point.edges) == (fraction, int(fraction * len(every)), len(kept))
            assert point.metric == pytest.approx(ref.kl(every - names), rel=1e-4, abs=1e-6)
    assert result.curve("signed").points[-1].faithfulness == pytest.approx(1.0)
    assert result.cpr == pytest.approx(result.curve("signed").area_under)
    assert result.cmd == pytest.approx(result.curve("absolute").area_from_one)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-2, 2), min_size=len(MIB_FRACTIONS), max_size=len(MIB_FRACTIONS)))
def test_cpr_and_cmd_are_trapezoid_areas_on_the_fraction_axis(values):
    """CPR integrates f, CMD |1 - f|, trapezoid by trapezoid between MIB's fractions; a constant curve c has area
    c * (1 - 0.001), and CPR + CMD bounds the span wherever f <= 1."""
    xs = list(MIB_FRACTIONS)
    assert trapezoid(xs, [0.5] * len(xs)) == pytest.approx(0.5 * 0.999)
    under, from_one = trapezoid(xs, values), trapezoid(xs, [abs(1 - v) for v in values])
    if all(v <= 1 for v in values):
        assert under + from_one == pytest.approx(0.999)
    assert from_one >= 0


def test_acdc_circuits_form_a_step_curve_on_the_fraction_grid():
    """At each fraction, the largest ACDC circuit that fits the edge budget; the empty circuit where none does."""

    def at(normalised: float) -> Faithfulness:
        return Faithfulness("kl", circuit=2.0 * (1 - normalised), full_model=0.0, empty_circuit=2.0)

    result = acdc_curve([(3, at(0.4)), (30, at(0.9)), (30, at(0.8))], total_edges=1000)
    got = [(p.requested, p.edges, p.faithfulness) for p in result.curve("acdc").points]
    assert got[:2] == [(1, 0, 0.0), (2, 0, 0.0)]
    assert got[2:5] == [(5, 3, 0.4), (10, 3, 0.4), (20, 3, 0.4)]
    assert got[5:9] == [(50, 30, 0.9), (100, 30, 0.9), (200, 30, 0.9), (500, 30, 0.9)]
    assert got[9] == (1000, 1000, 1.0)
    assert result.curve("acdc").points[2].metric == pytest.approx(1.2)


def test_scores_round_trip_through_both_file_layouts(small_session, tmp_path):
    """pahq_fx's file and EAP-IG's layout (embed -> input, resid_post -> logits, a0.h1.q -> a0.h1<q>) load back to the
    same scores; key/value groups are written per head, sharing the group's score; a graph EAP-IG cannot express
    (a post-attention norm) is refused with one line."""
    scores = scores_of_session(small_session, progress=False)
    scores.save(tmp_path / "scores.json")
    (tmp_path / "importances.json").write_text(json.dumps(scores.to_eap_json()))
    eap = json.loads((tmp_path / "importances.json").read_text())
    assert eap["cfg"] == {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}
    assert "input->a1.h0<q>" in eap["edges"] and "a1.h1->logits" in eap["edges"] and "input" in eap["nodes"]
    for name in ("scores.json", "importances.json"):
        assert load_scores(tmp_path / name).by_edge() == scores.by_edge()
    grouped = edge_scores(build(Spec("llama", 1, 2, 1, 4)), answered_task(1), progress=False, allow_weak_task=True)
    written = grouped.to_eap_json()["edges"]  # a key/value group's edge, shared among its two heads
    group_score = grouped.by_edge()[("embed", "a0.g0.k")]
    assert written["input->a0.h0<k>"]["score"] == written["input->a0.h1<k>"]["score"] == pytest.approx(group_score / 2)
    normed = edge_scores(build(Spec("gemma2", 1, 2, 2, 4)), answered_task(1), progress=False, allow_weak_task=True)
    with pytest.raises(PahqError, match="post-attention norms"):
        normed.to_eap_json()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PahqError, match="not a score file"):
        load_scores(tmp_path / "bad.json")


def test_scores_for_another_graph_are_refused(small_session):
    other = EdgeScores(scores=(), metric="kl")
    with pytest.raises(PahqError, match="do not match this model's graph"):
        mib_curves(small_session.runtime, small_session.edges, other)


def test_cli_scores_then_curve(tmp_path):
    """pahq-fx scores writes the score files; evaluate --curve reads them back (and refuses a file that is not one)."""
    common = ("--model", "gpt2-induction", "--task", "induction", "--n", "4", "--no-progress")
    scored = run("scores", *common, "--out", str(tmp_path / "s"), "--top", "5")
    assert scored.returncode == 0, scored.stderr
    for name in ("scores.json", "importances.json", "scores.tsv", "scores.md"):
        assert (tmp_path / "s" / name).is_file()
    tsv = (tmp_path / "s" / "scores.tsv").read_text().splitlines()
    values = [float(line.split("\t")[3]) for line in tsv[1:]]
    assert values == sorted(values, reverse=True)
    assert len(values) == len(json.loads((tmp_path / "s" / "scores.json").read_text())["scores"])
    curve = run(
        "evaluate",
        "--curve",
        *common,
        "--scores",
        str(tmp_path / "s" / "importances.json"),
        "--metric",
        "kl",
        "--out",
        str(tmp_path / "c"),
    )
    assert curve.returncode == 0, curve.stderr
    data = json.loads((tmp_path / "c" / "curve.json").read_text())
    assert [p["fraction"] for p in data["curves"][0]["points"]] == list(MIB_FRACTIONS)
    assert data["cmd"] >= 0 and data["cpr"] <= 1
    assert (tmp_path / "c" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    other = run("evaluate", "--curve", *common[:4], "--n", "5", "--no-progress", "--out", str(tmp_path / "c"))
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "already holds" in other.stderr  # one run per folder
    assert json.loads((tmp_path / "c" / "curve.json").read_text()) == data
    bad = run("evaluate", "--curve", *common, "--scores", str(tmp_path / "s" / "scores.md"), "--out", str(tmp_path / "d"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a score file" in bad.stderr
