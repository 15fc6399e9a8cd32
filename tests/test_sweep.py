"""Threshold sweeps: one setup, the same circuits as separate runs, faithfulness normalised, ROC/AUC as ACDC scores it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pahq_fx
from pahq_fx import zoo
from pahq_fx.acdc import evaluate_circuit, roc_auc, roc_point
from pahq_fx.acdc.evaluation import normalised_faithfulness
from pahq_fx.tasks import make_task
from tests.test_cli import run

E = [("embed", f"r{i}") for i in range(4)]  # four edges: e0, e1 in the reference, e2, e3 not


def test_perfect_recovery_has_auc_one():
    reference = {E[0], E[1]}
    points = [roc_point(found, reference, 4) for found in ({E[0]}, {E[0], E[1]}, {E[0], E[1], E[2]})]
    assert [(p.false_positive_rate, p.true_positive_rate) for p in points] == [(0, 0.5), (0, 1), (0.5, 1)]
    assert roc_auc(points) == 1.0


def test_inverted_scores_have_auc_zero():
    reference = {E[0], E[1]}
    points = [roc_point(found, reference, 4) for found in ({E[2]}, {E[2], E[3]}, {E[2], E[3], E[0]})]
    assert roc_auc(points) == 0.0


def test_known_half_right_cases():
    reference = {E[0], E[1]}
    assert roc_auc([roc_point({E[0]}, reference, 4)]) == 0.5  # half the reference, nothing false
    # (0, 0.5) then (0.5, 1): 0.5 of TPR over the whole FPR range, the other 0.5 from FPR 0.5 on
    assert roc_auc([roc_point({E[0]}, reference, 4), roc_point({E[0], E[1], E[2]}, reference, 4)]) == 0.75
    # a point another beats on both rates changes nothing (the staircase is pessimistic, not interpolated)
    worse = roc_point({E[0], E[2], E[3]}, reference, 4)
    assert roc_auc([roc_point({E[0]}, reference, 4), worse]) == 0.5


@given(st.lists(st.sets(st.sampled_from(E)), min_size=1, max_size=6), st.sets(st.sampled_from(E), min_size=1, max_size=3))
def test_auc_is_an_area_and_never_rewards_adding_false_edges(found_sets, reference):
    points = [roc_point(f, reference, len(E)) for f in found_sets]
    assert 0.0 <= roc_auc(points) <= 1.0
    with_false = [roc_point(f | (set(E) - reference), reference, len(E)) for f in found_sets]
    assert all(p.false_positive_rate == 1.0 for p in with_false)


def test_roc_needs_positives_and_negatives():
    with pytest.raises(ValueError, match="no positives or no negatives"):
        roc_point({E[0]}, set(), 4)
    with pytest.raises(ValueError, match="no positives or no negatives"):
        roc_point({E[0]}, set(E), 4)


@pytest.mark.parametrize(
    "full, empty",
    [(0.0, 2.3), (-4.0, 1.5), (3.0, 0.5), (10.0, -2.0)],
    ids=["kl", "negated-logit-diff", "larger-is-better", "larger-is-better-signed"],
)
def test_normalisation_is_one_for_the_full_model_and_zero_for_the_empty_circuit(full, empty):
    assert normalised_faithfulness(full, full, empty) == 1.0
    assert normalised_faithfulness(empty, full, empty) == 0.0
    halfway = normalised_faithfulness((full + empty) / 2, full, empty)
    assert halfway == pytest.approx(0.5)


@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_full_and_empty_circuits_normalise_to_one_and_zero_on_a_real_model(metric):
    model, tokenizer = zoo.load("llama-ioi")
    task = make_task("ioi", tokenizer, n=8, seed=2)
    graph = pahq_fx.acdc.EdgeGraph(pahq_fx.transform(model, precision="fp32", compile=False).head_graph)
    every_edge = {(e.sender, e.receiver) for e in graph.edges()}
    assert evaluate_circuit(every_edge, model, task, metric).normalised == pytest.approx(1.0, abs=1e-5)
    assert evaluate_circuit(set(), model, task, metric).normalised == pytest.approx(0.0, abs=1e-5)


def test_sweep_equals_separate_runs_and_sets_up_once(monkeypatch):
    model, tokenizer = zoo.load("gpt2-induction")
    task = make_task("induction", tokenizer, n=8, seed=4)
    thresholds = [0.3, 0.003, 0.03]
    traces = []
    original = pahq_fx.acdc.setup.trace
    monkeypatch.setattr(pahq_fx.acdc.setup, "trace", lambda *a, **k: traces.append(1) or original(*a, **k))
    result = pahq_fx.sweep(model, task, thresholds, precision="fp8", progress=False)
    assert len(traces) == 1, "a sweep traces the model once for every threshold"
    assert [p.threshold for p in result.points] == sorted(thresholds)
    for point in result.points:
        alone = pahq_fx.discover(model, task, threshold=point.threshold, precision="fp8", progress=False, faithfulness=True)
        assert point.circuit.edge_set() == alone.edge_set()
        assert [e.effect for e in point.circuit.edges] == [e.effect for e in alone.edges]
        assert point.circuit.stats.queries == alone.stats.queries
        expected = evaluate_circuit(alone.edge_set(), model, task)
        assert point.faithfulness.circuit == pytest.approx(expected.circuit, rel=1e-4, abs=1e-6)
        assert alone.faithfulness.circuit == pytest.approx(expected.circuit, rel=1e-4, abs=1e-6)
        assert alone.faithfulness.empty_circuit == pytest.approx(expected.empty_circuit, rel=1e-4, abs=1e-6)
    sizes = [len(p.circuit.edges) for p in result.points]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_cli_sweep_against_fp32_writes_circuits_table_and_plots(tmp_path):
    out = tmp_path / "sweep"
    result = run(
        "sweep",
        "--model",
        "llama-ioi",
        "--task",
        "ioi",
        "--n",
        "8",
        "--thresholds",
        "0.01,0.1,0.3",
        "--precision",
        "bf16",
        "--reference",
        "fp32",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    for t in ("0.01", "0.1", "0.3"):
        assert pahq_fx.Circuit.load(out / f"tau={t}" / "circuit.json").precision == "bf16"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["points"]) == 3 and 0.0 <= summary["auc"] <= 1.0 and summary["fp32"]["precision"] == "fp32"
    assert len(summary["agreement_jaccard"]) == 3
    assert "| threshold |" in (out / "summary.md").read_text() and "AUC" in result.stdout
    assert summary["mib"]["cmd"] >= 0.0 and summary["mib"]["cpr"] <= 1.0 and "CPR" in result.stdout
    for plot in ("edges_vs_threshold.png", "faithfulness_vs_edges.png", "roc.png", "curve.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    bad = run("sweep", "--model", "llama-ioi", "--task", "ioi", "--thresholds", "0.1,x", "--out", str(out))
    assert bad.returncode == 2 and "comma-separated numbers" in bad.stderr
