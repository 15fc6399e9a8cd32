"""State storage (pahq_fx.acdc.storage): the runtime with its caches and sender outputs in bf16 or FP8 is the FP32
runtime within the format's error, its rounding does not accumulate over commits, and its bytes are the plan's.

Errors are stated as signal to noise (dB) for tensors, as in the FP8 tests, and relative to the metric's scale for
metrics: bf16 keeps 8 significant bits (about 48 dB on a stored output), FP8 e4m3 with a scale per row 4 (about
25 dB). A metric moves by the rounding of the outputs its cone reads.
"""

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc import EdgeGraph, Metric
from pahq_fx.acdc import plan as planning
from pahq_fx.acdc.runtime import PatchingRuntime, ReceiverInputs
from pahq_fx.acdc.storage import Storage, codec, read_storage
from pahq_fx.ir.structure import StepKind
from pahq_fx.passes import lower_precision, split_heads, trace
from pahq_fx.passes.precision import all_heads_fp32
from tests.builders import RUNTIME_FAMILIES, Spec, build, specs, sqnr_db, token_ids

# The format's stated error: the least SQNR of a stored output against FP32's after a search's commits, the largest
# metric difference relative to max(1, |metric|), on these random models. A stored FP8 output's own 4 bits hold 25 dB,
# but a changed sender's output also carries the rounding of every input it read, which a norm of a nearly
# cancelling sum (Gemma 2's post-attention norm) amplifies: after commits only bf16 keeps a useful bound per output.
ROUND_TRIP_DB = {Storage.BF16: 40.0, Storage.FP8: 18.0}
SQNR_DB = {Storage.BF16: 30.0}
METRIC_ERROR = {Storage.BF16: 2e-3, Storage.FP8: 3e-2}
# A post-attention norm (Gemma 2, OLMo 2) divides a layer's summed heads by their own scale: where random heads nearly
# cancel it amplifies any rounding of theirs, stored or FP32 (tests/test_runtime.py compares FP32 state as SQNR for the
# same reason). Those families' metrics are held to ten times the format's error.
AMPLIFIED = 10.0
# What order-independence allows: rounding boundaries crossed by FP32 round-off of the inputs (rare, one unit each).
DRIFT = {Storage.BF16: 2e-4, Storage.FP8: 3e-3}


def _runtimes(spec: Spec, storage: Storage, seed: int):
    model = build(spec)
    task = pahq_fx.Task(token_ids(3, 6, seed=seed), token_ids(3, 6, seed=seed + 1))
    graph = lower_precision(split_heads(trace(model, task.clean_input_ids, dynamic_shapes="batch")), "fp32")
    edges = EdgeGraph(graph.meta["head_graph"])
    make = lambda s: PatchingRuntime(graph, edges, task, Metric.KL, storage=s)  # noqa: E731
    return make(Storage.FP32), make(storage), make


@pytest.mark.parametrize("storage", [Storage.BF16, Storage.FP8])
def test_codec_round_trip_error(storage):
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 3, 5).view(1, 5, 1)  # rows of very different scales
    stored = codec(storage).store(x)
    assert sqnr_db(x, codec(storage).load(stored)) > ROUND_TRIP_DB[storage]
    assert all(t.element_size() < 4 for t in codec(storage).tensors(stored)[:1])
    index = torch.tensor([0, 7, 14])
    rows = codec(storage).select_rows(stored, index)
    assert torch.equal(codec(storage).load(rows), codec(storage).load(stored).flatten(0, 1)[index])
    assert torch.equal(codec(storage).load(codec(storage).store(torch.zeros(2, 3, 8))), torch.zeros(2, 3, 8))


@settings(max_examples=10, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # shrinking is slow here
@given(spec=specs(RUNTIME_FAMILIES), storage=st.sampled_from([Storage.BF16, Storage.FP8]), data=st.data())
def test_stored_state_is_fp32_within_the_formats_error_and_does_not_drift(spec, storage, data):
    """The same random flips on an FP32 and a low-storage runtime: every query's metric within the format's error
    (ten times it behind a post-attention norm); afterwards (bf16, no such norm) every live sender's output within its
    SQNR. The state after the commits is the one a fresh runtime
    reaches by removing the same edges in one pass: rounding did not accumulate."""
    spec = Spec(spec.family, min(spec.layers, 2), spec.heads, spec.kv_heads, spec.head_dim, spec.parallel, spec.seed)
    fp32, low, make = _runtimes(spec, storage, data.draw(st.integers(0, 100)))
    normed = any(layer.has_output_norm for layer in fp32.edges.head_graph.layers)
    error = METRIC_ERROR[storage] * (AMPLIFIED if normed else 1.0)
    receivers = fp32.edges.receivers
    for row, receiver in enumerate(receivers[: data.draw(st.integers(1, len(receivers)))]):
        scale = max(1.0, abs(fp32.investigate(receiver)))
        assert low.investigate(receiver) == pytest.approx(fp32.metric, abs=error * scale)
        for sender in data.draw(st.lists(st.sampled_from(receiver.senders), unique=True, max_size=4), label="senders"):
            if not fp32.is_kept(row, sender):
                continue
            want = fp32.try_remove(row, [sender])
            assert low.try_remove(row, [sender]) == pytest.approx(want, abs=error * max(1.0, abs(want)))
            if data.draw(st.booleans(), label="commit"):
                fp32.commit(), low.commit()
            else:
                fp32.rollback(), low.rollback()
    want, got = fp32.run_from(0), low.run_from(0)
    assert got == pytest.approx(want, abs=error * max(1.0, abs(want)))
    for sender in fp32.edges.senders:
        changed = fp32.outputs[sender.index] is not fp32.clean[sender.index]
        if storage in SQNR_DB and not normed and fp32.edge_state.kept_out[sender.index] and changed:
            stored = low.codec.load(low.outputs[sender.index])
            assert sqnr_db(fp32.outputs[sender.index], stored) > SQNR_DB[storage], sender.name

    fresh = make(storage)
    fresh.run_from(0)
    removals: dict[int, list[int]] = {}
    for r, s in low.removed:
        removals.setdefault(r, []).append(s)
    once = fresh.try_remove_edges(removals) if removals else fresh.metric
    assert once == pytest.approx(got, abs=DRIFT[storage] * (AMPLIFIED if normed else 1.0) * max(1.0, abs(got)))


@settings(max_examples=8, deadline=None)
@given(spec=specs(RUNTIME_FAMILIES), storage=st.sampled_from([Storage.BF16, Storage.FP8]), seed=st.integers(0, 100))
def test_clean_reads_are_held_rounded_and_the_runs_computed_from_them(spec, storage, seed):
    """Low storage holds each step's clean read in bf16 (``read_storage``), and setup ran every step on its read as
    held: each step run again on it gives every sender's stored clean output bit for bit. Otherwise every query's
    change would carry the reads' rounding, and every step would differ from its caches once it runs."""
    spec = Spec(spec.family, min(spec.layers, 2), spec.heads, spec.kv_heads, spec.head_dim, spec.parallel, spec.seed)
    _, low, _ = _runtimes(spec, storage, seed)
    assert {read.dtype for read in low.clean_reads} == {torch.bfloat16}
    assert codec(read_storage(storage)).store(torch.ones(1)).dtype == torch.bfloat16
    with torch.no_grad(), all_heads_fp32(low.graph):
        for k, step in enumerate(low.steps):
            block, aux = getattr(low.graph, step.module), low._aux(step.aux)
            read = low.clean_read(k)
            outputs = block.from_stream(read, *aux).unbind(2) if step.kind is StepKind.ATTENTION else [block(read, *aux)]
            for sender, output in zip(low.index.step_senders[k], outputs, strict=True):
                want = low.codec.load(low.clean[sender])
                assert torch.equal(low.codec.load(low.codec.store(output)), want), low.edges.senders[sender].name


@settings(max_examples=6, deadline=None)
@given(
    spec=specs(("gpt2", "llama", "neox")),
    storage=st.sampled_from(list(Storage)),
    inputs=st.sampled_from(list(ReceiverInputs)),
    batch=st.integers(1, 3),
    seq=st.integers(2, 8),
)
def test_bytes_are_the_plans(spec, storage, inputs, batch, seq):
    """``state_bytes()`` after setup and with every step running equals the plan's caches and starting state, in every
    storage format, with receiver inputs stored or recomputed, to the byte."""
    from pahq_fx.acdc.setup import build_runtime
    from pahq_fx.passes.precision import Format

    model = build(spec)
    task = pahq_fx.Task(token_ids(batch, seq, seed=3), token_ids(batch, seq, seed=4))
    runtime, edges = build_runtime(model, task, Metric.KL, Format.FP32, "per_row", False, storage, inputs)
    geometry = planning.geometry_from_runtime(runtime, model)
    memory = planning.memory_plan(geometry, planning.Workload(batch, seq, batch), storage.value, 0, inputs.value)
    assert runtime.state_bytes() == memory.cache_bytes
    runtime.investigate(edges.receivers[-1])
    assert runtime.state_bytes() == memory.cache_bytes + memory.state_start


def test_discover_records_its_storage_and_a_resume_must_match(tmp_path):
    model = build(Spec("gpt2", 2, 4, 4, 8))
    task = pahq_fx.Task(token_ids(3, 6, seed=1), token_ids(3, 6, seed=2))
    fp32 = pahq_fx.discover(model, task, threshold=0.01, precision="fp32", progress=False, allow_weak_task=True)
    bf16 = pahq_fx.discover(model, task, threshold=0.01, precision="fp32", progress=False, allow_weak_task=True, storage="bf16")
    assert bf16.stats.storage == "bf16" and fp32.stats.storage == "fp32"
    assert bf16.stats.state_bytes < fp32.stats.state_bytes
    with pytest.raises(pahq_fx.PahqError, match="state storage"):
        pahq_fx.discover(model, task, threshold=0.01, storage="fp16", progress=False, allow_weak_task=True)
