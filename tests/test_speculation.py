"""Speculative search equals sequential search: same decisions, effects to round-off, for every predictor."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc.search import prepare, search
from pahq_fx.acdc.speculation import ROUND_OFF, Prediction, Predictor
from pahq_fx.errors import PahqError
from tests.builders import Spec, build, token_ids

SPECULATION_FAMILIES = ("gpt2", "neox", "llama", "opt")


@st.composite
def small_specs(draw) -> Spec:
    family = draw(st.sampled_from(SPECULATION_FAMILIES))
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])) if family == "llama" else heads
    return Spec(
        family, draw(st.integers(1, 2)), heads, kv_heads, 4, parallel=draw(st.booleans()), seed=draw(st.integers(0, 2**16))
    )


def decisions(circuit: pahq_fx.Circuit, session) -> list[tuple[str, str, float, bool]]:
    """(sender, receiver, effect, removed) for every tested edge, in ACDC's visiting order."""
    kept = {(e.sender, e.receiver): e.effect for e in circuit.edges}
    removed = {(e.sender, e.receiver): e.effect for e in circuit.removed}
    order = []
    for receiver in session.edges.receivers:
        for s in receiver.senders:
            key = (session.edges.senders[s].name, receiver.name)
            if key in removed:
                order.append((*key, removed[key], True))
            elif key in kept and not math.isnan(kept[key]):
                order.append((*key, kept[key], False))
    return order


def assert_same_search(sequential, speculative, session, threshold):
    """Decisions equal in order until one whose effect lies within round-off of the threshold; effects to round-off."""
    a, b = decisions(sequential, session), decisions(speculative, session)
    # strict=False: the two part ways at a decision within round-off of the threshold
    for (sender, receiver, effect, removed), (sender_b, receiver_b, effect_b, removed_b) in zip(a, b, strict=False):
        assert (sender, receiver) == (sender_b, receiver_b)
        scale = max(1.0, abs(effect))
        if removed != removed_b:  # only where round-off can decide: then the searches part ways
            assert abs(effect - threshold) <= 1e-4 * scale, (sender, receiver, effect, effect_b)
            return
        assert effect_b == pytest.approx(effect, abs=1e-5 * scale), (sender, receiver)
    assert len(a) == len(b)
    assert speculative.edge_set() == sequential.edge_set()


@settings(max_examples=10, deadline=None)
@given(
    spec=small_specs(),
    log_threshold=st.floats(-4, -1),
    zero=st.booleans(),
    kind=st.sampled_from(list(Prediction)),
    max_candidates=st.integers(2, 9),
    seed=st.integers(0, 1000),
)
def test_speculative_search_equals_sequential_search(spec, log_threshold, zero, kind, max_candidates, seed):
    """Every predictor (the random one an adversary), batch bounds, thresholds and families: the same search."""
    model = build(spec)
    task = pahq_fx.Task(token_ids(3, 6, seed=seed), token_ids(3, 6, seed=seed + 1))
    session = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True)
    threshold = 0.0 if zero else 10**log_threshold
    sequential = search(session, threshold, progress=False, speculation="off")
    session.runtime.reset()
    predictor = Predictor(kind, max_candidates=max_candidates, seed=seed)
    speculative = search(session, threshold, progress=False, speculation=predictor)
    assert_same_search(sequential, speculative, session, threshold)
    assert speculative.stats.queries == sequential.stats.queries  # decided, as the sequential search counts them
    assert speculative.stats.evaluated >= speculative.stats.queries  # dropped candidates are evaluated, not decided
    assert predictor.decided == len(decisions(speculative, session)) and 0 <= predictor.hits <= predictor.decided


@pytest.mark.parametrize("kind", ["kept", "removed"])
def test_a_right_guess_decides_a_whole_batch_and_a_wrong_one_drops_the_rest(kind):
    """Predicting "kept" at threshold 0 on a model where most removals raise KL: batches are mostly confirmed;
    predicting "removed" there is mostly wrong, each batch yields one decision. Both give the sequential circuit."""
    model = build(Spec("gpt2", 2, 4, 4, 8, seed=3))
    task = pahq_fx.Task(token_ids(4, 6, seed=5), token_ids(4, 6, seed=6))
    session = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True)
    sequential = search(session, 0.0, progress=False, speculation="off")
    session.runtime.reset()
    predictor = Predictor(kind, max_candidates=8)
    speculative = search(session, 0.0, progress=False, speculation=predictor)
    assert_same_search(sequential, speculative, session, 0.0)
    per_batch = predictor.decided / predictor.batches
    removed_share = len(sequential.removed) / (len(sequential.removed) + len(sequential.edges))
    if (kind == "kept") == (removed_share < 0.5):
        assert per_batch > 2, (per_batch, removed_share)
    assert speculative.stats.evaluated >= speculative.stats.queries


def test_batch_sizes_follow_the_hit_rate_within_the_bounds():
    predictor = Predictor("kept", max_candidates=16)
    assert predictor.batch_size(100, 100) <= 3  # no history: one hit and one miss as prior
    for _ in range(64):
        predictor.record(False, False)
    assert predictor.batch_size(100, 100) == 16
    assert predictor.batch_size(5, 100) == 5
    assert predictor.batch_size(100, 3) == 3
    for _ in range(64):
        predictor.record(False, True)
    assert predictor.batch_size(100, 100) == 1
    assert predictor.guesses(3) == [False] * 3
    assert Predictor("removed").guesses(2) == [True, True]


def test_predictor_state_round_trips():
    predictor = Predictor("adaptive")
    for i in range(10):
        predictor.record(i % 3 == 0, i % 2 == 0)
    other = Predictor("adaptive")
    other.restore(predictor.state())
    assert other.state() == predictor.state()
    assert other.guesses(4) == predictor.guesses(4) and other.batch_size(50, 50) == predictor.batch_size(50, 50)


@pytest.mark.parametrize("bad", ["sometimes", "random", ""])
def test_unknown_speculation_is_refused_before_any_work(bad):
    model = build(Spec("gpt2", 1, 2, 2, 4))
    task = pahq_fx.Task(token_ids(2, 4, seed=1), token_ids(2, 4, seed=2))
    with pytest.raises(PahqError, match="speculation"):
        pahq_fx.discover(model, task, threshold=0.01, speculation=bad, progress=False)


def test_report_counts_evaluated_and_decided_queries_and_round_off_decisions():
    model = build(Spec("llama", 2, 4, 2, 4, seed=7))
    task = pahq_fx.Task(token_ids(3, 6, seed=3), token_ids(3, 6, seed=4))
    circuit = pahq_fx.discover(
        model, task, threshold=0.01, precision="fp32", progress=False, allow_weak_task=True, speculation="adaptive"
    )
    stats = circuit.stats
    assert stats.speculation.startswith("adaptive")
    assert stats.hit_rate is not None and 0 <= stats.hit_rate <= 1
    assert stats.near_threshold is not None and stats.near_threshold >= 0
    assert "decided" in circuit.summary() and "hit rate" in circuit.summary()
    off = pahq_fx.discover(model, task, threshold=0.01, precision="fp32", progress=False, allow_weak_task=True, speculation="off")
    assert off.stats.hit_rate is None and off.stats.evaluated == off.stats.queries
    assert off.edge_set() == circuit.edge_set()


def test_candidate_batches_run_at_a_multiple_of_the_task_batch():
    """The prelude's values (masks, positions, sizes) at K x the batch are the task's repeated: checked, not assumed."""
    model = build(Spec("neox", 2, 2, 2, 4, seed=1))
    task = pahq_fx.Task(token_ids(3, 5, seed=8), token_ids(3, 5, seed=9))
    runtime = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True).runtime
    assert runtime.batches_candidates(), runtime.candidate_refusal
    receiver = runtime.edges.receivers[1]
    runtime.investigate(receiver)
    senders = list(receiver.senders)[:3]
    batch = runtime.try_remove_each(1, senders, [True, False, True])
    runtime.keep_candidate(None, 0)
    one_by_one = []
    for i, s in enumerate(senders):
        earlier = [senders[j] for j in range(i) if [True, False, True][j]]
        one_by_one.append(runtime.try_remove_edges({1: [*earlier, s]}))
        runtime.rollback()
    torch.testing.assert_close(torch.tensor(batch), torch.tensor(one_by_one), rtol=ROUND_OFF, atol=1e-6)
