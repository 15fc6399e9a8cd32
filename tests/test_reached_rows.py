"""A query recomputes only the rows its change reaches (prompts that differ at one position): the state still equals a
dense evaluation; stored rows are replaced without touching the others."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc import EdgeGraph, Metric
from pahq_fx.acdc.runtime import PatchingRuntime, ReceiverInputs
from pahq_fx.acdc.runtime.rows import ReachedRows
from pahq_fx.acdc.storage import Storage, codec
from pahq_fx.passes import lower_precision, split_heads, trace
from tests.acdc_reference import ReferenceACDC
from tests.builders import RUNTIME_FAMILIES, Spec, build, specs, token_ids
from tests.test_runtime import check_random_flips


@settings(max_examples=30, deadline=None)
@given(mask=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=3), seq=st.sampled_from([1, 5]))
def test_reached_rows_are_every_position_from_a_sequences_first_change_on(mask, seq):
    changed = torch.tensor(mask)
    rows = ReachedRows.of([changed], seq)
    expected = [b * 5 + t for b, row in enumerate(mask) for t in range(5) if any(row[: t + 1])]
    if len(expected) in (0, changed.numel()):
        assert rows is None
    else:
        assert rows is not None and rows.index.tolist() == expected and rows.batch.rows == len(expected)


def shared_prefix_runtime(
    spec: Spec, precision: str, starts: list[int], seed: int, receiver_inputs: ReceiverInputs = ReceiverInputs.STORED
):
    """A runtime on a task whose corrupted prompts differ from the clean ones at position ``starts[b]`` alone (sequence
    b; attention carries the change to later positions), and the dense reference."""
    model = build(spec)
    clean = token_ids(len(starts), 6, seed=seed)
    corrupted = clean.clone()
    other = token_ids(len(starts), 6, seed=seed + 1)
    for b, start in enumerate(starts):
        corrupted[b, start] = other[b, start]
    task = pahq_fx.Task(clean, corrupted)
    graph = lower_precision(split_heads(trace(model, clean, dynamic_shapes="batch")), precision)
    runtime = PatchingRuntime(graph, EdgeGraph(graph.meta["head_graph"]), task, Metric.KL, receiver_inputs=receiver_inputs)
    assert runtime.rows_restrictable, "every family here is causal, with per-token MLPs"
    runtime.restrict_rows = True  # whether or not it pays on a model this small
    return runtime, ReferenceACDC(model, clean, corrupted, task.metric_mask, precision)


@settings(max_examples=8, deadline=None)
@given(
    spec=specs(RUNTIME_FAMILIES),
    precision=st.sampled_from(["fp32", "fp32", "bf16"]),
    starts=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    receiver_inputs=st.sampled_from(list(ReceiverInputs)),
    data=st.data(),
)
def test_queries_over_reached_rows_equal_the_dense_evaluation(spec, precision, starts, receiver_inputs, data):
    """The state after every commit and every query's metric, against the reference's from-scratch evaluation (the
    same oracle as tests/test_runtime.py; recomputing every row instead differs by FP32 round-off only, in both
    directions: a head recomputed alone rounds differently from the batch that computed its state), with receiver inputs
    stored or recomputed."""
    spec = Spec(spec.family, min(spec.layers, 2), spec.heads, spec.kv_heads, spec.head_dim, spec.parallel, spec.seed)
    runtime, reference = shared_prefix_runtime(spec, precision, starts, data.draw(st.integers(0, 50)), receiver_inputs)
    low = precision != "fp32"
    for row in range(len(runtime.edges.receivers)):  # in visiting order
        if data.draw(st.booleans(), label="investigate"):
            check_random_flips(runtime, reference, row, data, low, max_flips=3)


@settings(max_examples=20, deadline=None)
@given(storage=st.sampled_from(list(Storage)), copies=st.sampled_from([None, 2]), data=st.data())
def test_replacing_stored_rows_keeps_every_other_rows_stored_bits(storage, copies, data):
    stored_as = codec(storage)
    stored = stored_as.store(torch.randn(2, 3, 8) * 10)
    total = 6 * (copies or 1)
    index = sorted(data.draw(st.lists(st.integers(0, total - 1), unique=True, min_size=1, max_size=total)))
    rows = stored_as.store(torch.randn(len(index), 8))
    got = stored_as.replace_rows(stored, torch.tensor(index), rows, copies)
    before = stored_as.load(stored).flatten(0, 1).repeat(copies or 1, 1)
    after = stored_as.load(got).flatten(0, -2)
    kept = [i for i in range(total) if i not in index]
    assert torch.equal(after[index], stored_as.load(rows))
    assert torch.equal(after[kept], before[kept])


def test_rows_are_not_restricted_where_prompts_differ_from_the_first_position():
    """Prompts that differ from the first position on leave nothing to restrict: setup does not restrict queries."""
    whole, _ = shared_prefix_runtime(Spec("gpt2", 2, 4, 4, 8), "fp32", [0, 0], seed=3)
    assert not whole._restricting_rows_pays()
