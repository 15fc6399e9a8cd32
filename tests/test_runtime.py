"""The incremental runtime: its state equals a dense from-scratch evaluation, and a query recomputes only its cone."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc import EdgeGraph, Metric
from pahq_fx.acdc.row_batch import RowBatch
from pahq_fx.acdc.runtime import PatchingRuntime
from pahq_fx.ir.structure import StepKind
from pahq_fx.passes import lower_precision, split_heads, trace
from tests.acdc_reference import ReferenceACDC
from tests.builders import RUNTIME_FAMILIES, Spec, build, specs, sqnr_db, token_ids


def runtime_and_reference(
    spec: Spec, precision: str, seed: int = 0, dynamic_shapes: bool | str = True
) -> tuple[PatchingRuntime, ReferenceACDC]:
    """``dynamic_shapes="batch"`` (ACDC's trace) packs the metric rows into sequences of the task's length, ``True``
    runs them one token each (:class:`~pahq_fx.acdc.row_batch.RowBatch`)."""
    model = build(spec)
    task = pahq_fx.Task(token_ids(3, 6, seed=seed), token_ids(3, 6, seed=seed + 1))
    graph = lower_precision(split_heads(trace(model, task.clean_input_ids, dynamic_shapes=dynamic_shapes)), precision)
    runtime = PatchingRuntime(graph, EdgeGraph(graph.meta["head_graph"]), task, Metric.KL)
    reference = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask, precision)
    return runtime, reference


def dense(runtime: PatchingRuntime, reference: ReferenceACDC, extra: tuple[tuple[int, int], ...] = ()):
    """The reference's from-scratch evaluation at the runtime's removed set (plus ``extra``), start step and plan."""
    edges = runtime.edges
    removed = {(edges.senders[s].name, edges.receivers[r].name) for r, s in runtime.removed | set(extra)}
    plan = {getattr(runtime.graph, runtime.steps[k].name).layer: units for k, units in runtime.plan.items()}
    return reference.dense(removed, runtime.active_from, plan)


def assert_state_matches(runtime: PatchingRuntime, reference: ReferenceACDC, metric: float, extra=(), low_precision=False):
    expected_metric, outputs = dense(runtime, reference, extra)
    scale = max(1.0, abs(expected_metric))
    assert metric == pytest.approx(expected_metric, abs=(2e-2 if low_precision else 1e-5) * scale)
    if extra:
        return  # tentative outputs are not the state
    for sender in runtime.edges.senders:
        got, want = runtime.outputs[sender.index], outputs[sender.name]
        if not runtime.edge_state.kept_out[sender.index]:
            continue  # a dead node: nothing reads it, the runtime does not maintain it
        if runtime.edge_state.kept_out[sender.index] <= {runtime.index.final_row} or runtime.sends_rows(sender.index):
            # exact where it is read
            got, want = runtime.final_rows_of(got) if got.dim() == 3 else got, runtime.final_rows_of(want)
        if low_precision:
            assert sqnr_db(want, got) > 25, sender.name
        else:
            # FP32 round-off, as signal to noise: a norm of a sum that nearly cancels (Gemma 2's a{L}.out) turns the
            # association order's ulps of the summands into a larger error on its own small rows than allclose admits.
            assert sqnr_db(want, got) > 80, (sender.name, sqnr_db(want, got))


def check_random_flips(runtime: PatchingRuntime, reference: ReferenceACDC, row: int, data, low: bool, max_flips: int):
    """Investigate receiver ``row``, then remove up to ``max_flips`` of its edges drawn at random, each committed or
    rolled back at random: the state checked against the reference after every step."""
    receiver = runtime.edges.receivers[row]
    assert_state_matches(runtime, reference, runtime.investigate(receiver), low_precision=low)
    for sender in data.draw(st.lists(st.sampled_from(receiver.senders), unique=True, max_size=max_flips), label="senders"):
        value = runtime.try_remove(row, [sender])
        assert_state_matches(runtime, reference, value, extra=((row, sender),), low_precision=low)
        if data.draw(st.booleans(), label="commit"):
            runtime.commit()
            assert_state_matches(runtime, reference, runtime.metric, low_precision=low)
        else:
            runtime.rollback()


@settings(max_examples=12, deadline=None)
@given(
    spec=specs(RUNTIME_FAMILIES),
    precision=st.sampled_from(["fp32", "fp32", "bf16", "fp8"]),
    dynamic_shapes=st.sampled_from([True, "batch"]),
    data=st.data(),
)
def test_state_equals_dense_evaluation_after_any_flips(spec, precision, dynamic_shapes, data):
    """Random receivers in visiting order, random flips committed or rolled back, plan switches between them, on
    a trace with a dynamic sequence length and on one with the task's length fixed."""
    spec = Spec(spec.family, min(spec.layers, 2), spec.heads, spec.kv_heads, spec.head_dim, spec.parallel, spec.seed)
    runtime, reference = runtime_and_reference(
        spec, precision, seed=data.draw(st.integers(0, 100)), dynamic_shapes=dynamic_shapes
    )
    low = precision != "fp32"
    receivers = runtime.edges.receivers
    visited = data.draw(st.integers(1, len(receivers)))
    for row, receiver in enumerate(receivers[:visited]):
        if not data.draw(st.booleans(), label="investigate"):
            runtime.remove(row, receiver.senders)
            continue
        check_random_flips(runtime, reference, row, data, low, max_flips=4)
    assert_state_matches(runtime, reference, runtime.run_from(0), low_precision=low)


def _rows(runtime: PatchingRuntime) -> dict[str, int]:
    return runtime.edges.receiver_index


def _sender(runtime: PatchingRuntime, name: str) -> int:
    return runtime.edges.sender_index[name]


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_a_query_recomputes_only_its_cone(precision):
    """GPT-2: a head's query input reaches that head, the MLP it feeds and the final read; nothing else."""
    runtime, _ = runtime_and_reference(Spec("gpt2", 2, 4, 4, 8), precision)
    rows, edges = _rows(runtime), runtime.edges
    runtime.investigate(edges.receivers[rows["resid_post"]])
    runtime.try_remove(rows["resid_post"], [_sender(runtime, "a1.h3")])
    assert runtime.last_recomputed == ["resid_post"]
    runtime.rollback()

    runtime.investigate(edges.receivers[rows["m1"]])
    runtime.try_remove(rows["m1"], [_sender(runtime, "a1.h0")])
    assert runtime.last_recomputed == ["m1", "resid_post"]
    runtime.rollback()

    runtime.investigate(edges.receivers[rows["a1.h2.q"]])
    runtime.try_remove(rows["a1.h2.q"], [_sender(runtime, "embed")])
    assert runtime.last_recomputed == ["a1.h2", "m1", "resid_post"]
    runtime.rollback()
    runtime.try_remove(rows["a1.h2.k"] if precision == "fp32" else rows["a1.h2.q"], [_sender(runtime, "m0")])
    assert runtime.last_recomputed == ["a1.h2", "m1", "resid_post"]
    runtime.rollback()

    # Without its edge into m1 the head's change reaches only the final read; without any outgoing edge, nothing.
    runtime.remove(rows["m1"], [_sender(runtime, "a1.h2")])
    runtime.try_remove(rows["a1.h2.q"], [_sender(runtime, "embed")])
    assert runtime.last_recomputed == ["a1.h2", "resid_post"]
    runtime.rollback()
    runtime.remove(rows["resid_post"], [_sender(runtime, "a1.h2")])
    before = runtime.metric
    assert runtime.try_remove(rows["a1.h2.q"], [_sender(runtime, "embed")]) == before
    assert runtime.last_recomputed == []  # a dead node: its input changes, nothing is recomputed


def test_a_key_value_group_recomputes_only_its_heads():
    runtime, _ = runtime_and_reference(Spec("llama", 2, 4, 2, 8), "bf16")
    rows, edges = _rows(runtime), runtime.edges
    runtime.investigate(edges.receivers[rows["a1.g1.v"]])
    runtime.try_remove(rows["a1.g1.v"], [_sender(runtime, "a0.h1")])
    assert runtime.last_recomputed == ["a1.h2", "a1.h3", "m1", "resid_post"]


def test_moving_to_another_head_recomputes_only_the_heads_whose_precision_changes():
    runtime, _ = runtime_and_reference(Spec("neox", 2, 4, 4, 8, parallel=True), "fp8")
    rows, edges = _rows(runtime), runtime.edges
    runtime.investigate(edges.receivers[rows["a1.h3.q"]])
    runtime.investigate(edges.receivers[rows["a1.h1.q"]])
    assert runtime.last_recomputed == ["a1.h1", "a1.h3", "resid_post"]  # parallel block: a1 does not feed m1


def test_a_post_attention_norm_is_in_the_cone_of_its_heads_only():
    """Gemma 2: a head's change reaches the residual stream through its layer's norm a{L}.out; a query into the
    norm recomputes the norm and what it feeds, no head."""
    runtime, _ = runtime_and_reference(Spec("gemma2", 2, 4, 2, 8), "fp32")
    rows, edges = _rows(runtime), runtime.edges
    runtime.investigate(edges.receivers[rows["a1.out"]])
    runtime.try_remove(rows["a1.out"], [_sender(runtime, "a1.h1")])
    assert runtime.last_recomputed == ["a1.out", "m1", "resid_post"]
    runtime.rollback()
    runtime.investigate(edges.receivers[rows["a1.h2.q"]])
    runtime.try_remove(rows["a1.h2.q"], [_sender(runtime, "a0.out")])
    assert runtime.last_recomputed == ["a1.h2", "a1.out", "m1", "resid_post"]


def test_a_query_into_a_layer_normed_across_heads_recomputes_every_head():
    """OLMo 2 normalises all heads' queries together: one head's query input changes every head of its layer."""
    runtime, _ = runtime_and_reference(Spec("olmo2", 2, 4, 2, 8), "fp32")
    rows, edges = _rows(runtime), runtime.edges
    runtime.investigate(edges.receivers[rows["a1.h2.q"]])
    runtime.try_remove(rows["a1.h2.q"], [_sender(runtime, "a0.out")])
    assert runtime.last_recomputed == ["a1.h0", "a1.h1", "a1.h2", "a1.h3", "a1.out", "m1", "resid_post"]


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(2, 5), data=st.data())
def test_a_receiver_reached_by_every_recomputed_head_of_a_step_adds_their_sum_once(heads, data):
    """``Deltas.terms``: one summed term per attention step whose recomputed heads all reach the receiver, the single
    changes of the others, and the same total as adding every change on its own. A head's change is computed when
    needed, and kept only where a receiver adds it alone (never with ``keep_heads=False``: computed again, the same)."""
    from pahq_fx.acdc.runtime.deltas import Deltas

    changes = {s: torch.randn(2, 3, 4) for s in range(heads)}
    computed: list[int] = []
    deltas = Deltas(lambda s: computed.append(s) or changes[s])
    deltas.add_heads(0, list(changes))
    changes[heads] = torch.randn(2, 3, 4)
    deltas.add(heads, changes[heads])  # an MLP after the heads
    reaching = data.draw(st.lists(st.sampled_from(range(heads + 1)), min_size=1, unique=True).map(sorted))
    terms = list(deltas.terms(reaching))
    every_head = set(range(heads)) <= set(reaching)
    assert len(terms) == (len(reaching) - heads + 1 if every_head else len(reaching))
    total = sum(d for _, d in terms)
    assert torch.allclose(total, sum(changes[s] for s in reaching), atol=1e-6)
    if every_head and heads > 1:
        assert sorted(computed) == list(range(heads))  # once each, for the sum
        assert not set(range(heads)) & set(deltas.held)  # and none of them held
    unkept = Deltas(lambda s: changes[s].clone(), keep_heads=False)  # receiver inputs recomputed: nothing held
    unkept.add_heads(0, list(range(heads)))
    unkept.add(heads, changes[heads])
    again = [d for _ in range(2) for _, d in unkept.terms(reaching)]
    assert not set(range(heads)) & set(unkept.held)
    assert all(torch.equal(a, b) for a, b in zip(again[: len(again) // 2], again[len(again) // 2 :], strict=True))


@settings(max_examples=40, deadline=None)
@given(
    terms=st.lists(st.sampled_from([(2, 3, 4), (3, 4), (1, 3, 4), (5, 2, 3, 4)]), max_size=6),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16]), min_size=6, max_size=6),
    subtract=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_add_terms_is_pythons_left_to_right_sum_bit_for_bit_and_modifies_nothing(terms, dtypes, subtract, seed):
    """``add_terms`` accumulates in place after its first operation: the same bits as ``x + t0 + t1 ...`` (or ``-``)
    whatever the terms' shapes (broadcasting ones included) and dtypes, and neither ``x`` nor a term changes."""
    from pahq_fx.acdc.runtime.deltas import add_terms

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, generator=generator)
    parts = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in zip(terms, dtypes[: len(terms)], strict=True)]
    before = [t.clone() for t in (x, *parts)]
    expected = x
    for t in parts:
        expected = expected - t if subtract else expected + t
    got = add_terms(x, parts, subtract=subtract)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, *parts), strict=True))
    assert parts or got is x  # nothing to add: x itself, not a copy


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), seq=st.integers(1, 9), width=st.integers(1, 5))
def test_a_row_batch_packs_rows_into_whole_sequences_and_unpacks_them_unchanged(rows, seq, width):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows * seq))
    batch = RowBatch(rows, seq)
    packed = batch.pack(x)
    assert packed.shape == (-(-rows // seq), seq, width) == (*batch.shape, width)
    assert torch.equal(batch.unpack(packed), x)
    assert (packed.flatten(0, 1)[rows:] == x[-1]).all()  # the padding repeats the last row


@pytest.mark.parametrize("dynamic_shapes", [True, "batch"])
def test_the_metric_rows_alone_go_through_the_unembedding_and_the_last_mlp_whatever_the_trace(dynamic_shapes):
    """With the sequence length dynamic or fixed, the unembedding and every MLP are found token-wise, so a query
    reaching only them runs the metric's rows (3 here, of 18 positions), not the whole batch."""
    runtime, _ = runtime_and_reference(Spec("gpt2", 2, 2, 2, 8), "fp32", dynamic_shapes=dynamic_shapes)
    assert torch.equal(runtime.final_rows, runtime.positions) and len(runtime.final_rows) == 3
    assert runtime.row_batch.shape == ((3, 1) if dynamic_shapes is True else (1, 6))
    mlps = {k for k, step in enumerate(runtime.steps) if step.kind is not StepKind.ATTENTION}
    assert mlps and runtime.token_wise_components == mlps
