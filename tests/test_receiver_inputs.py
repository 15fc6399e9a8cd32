"""Receiver inputs recomputed from the removed and kept edges instead of stored: the same search to round-off, a
state that holds no per-receiver input, and a resume bit for bit within the mode."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc import state_io
from pahq_fx.acdc.search import prepare, search
from pahq_fx.acdc.speculation import Prediction, Predictor
from pahq_fx.errors import PahqError
from tests.builders import Spec, build, token_ids
from tests.test_speculation import assert_same_search, small_specs


@settings(max_examples=8, deadline=None)
@given(
    spec=small_specs(), log_threshold=st.floats(-4, -1), zero=st.booleans(), speculate=st.booleans(), seed=st.integers(0, 1000)
)
def test_recomputed_inputs_search_as_stored_ones(spec, log_threshold, zero, speculate, seed):
    """GPT-2, NeoX, Llama (grouped-query) and OPT, random thresholds, with and without speculation: the decisions of
    the stored search until one within round-off of the threshold, effects to round-off, the same circuit otherwise."""
    model = build(spec)
    task = pahq_fx.Task(token_ids(3, 6, seed=seed), token_ids(3, 6, seed=seed + 1))
    threshold = 0.0 if zero else 10**log_threshold
    stored = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True)
    expected = search(stored, threshold, progress=False)
    session = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True, receiver_inputs="recomputed")
    speculation = Predictor(Prediction.ADAPTIVE, max_candidates=4, seed=seed) if speculate else "off"
    got = search(session, threshold, progress=False, speculation=speculation)
    assert_same_search(expected, got, session, threshold)
    assert got.stats.receiver_inputs == "recomputed"
    runtime = session.runtime
    assert all(x is None for x in runtime.inputs), "the mode's state holds no per-receiver input"


def test_a_sparse_state_is_smaller_with_recomputed_inputs():
    """Every removal gives a receiver an input of its own when stored; recomputed, the state holds two streams per
    step at most."""
    model = build(Spec("llama", 2, 4, 2, 8, seed=3))
    task = pahq_fx.Task(token_ids(4, 6, seed=5), token_ids(4, 6, seed=6))
    sizes = {}
    for mode in ("stored", "recomputed"):
        session = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True, receiver_inputs=mode)
        circuit = search(session, 1e-3, progress=False)
        sizes[mode] = (circuit.stats.state_bytes, circuit.edge_set())
    assert sizes["recomputed"][1] == sizes["stored"][1]
    assert sizes["recomputed"][0] < sizes["stored"][0]


def test_a_state_file_of_the_other_mode_is_refused():
    model, task = build(Spec("gpt2", 1, 2, 2, 8)), pahq_fx.Task(token_ids(4, 6, seed=7), token_ids(4, 6, seed=8))
    stored = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True)
    recomputed = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True, receiver_inputs="recomputed")
    with pytest.raises(state_io.StateMismatch, match="holds stored receiver inputs, this run recomputed ones"):
        state_io.restore(recomputed.runtime, state_io.encode(stored.runtime))


def test_an_unknown_mode_is_a_clear_error():
    model, task = build(Spec("gpt2", 1, 2, 2, 8)), pahq_fx.Task(token_ids(4, 6, seed=7), token_ids(4, 6, seed=8))
    with pytest.raises(PahqError, match="unknown receiver inputs 'kept'; choose one of stored, recomputed"):
        prepare(model, task, precision="fp32", compile=False, allow_weak_task=True, receiver_inputs="kept")
