"""ACDC on the per-head graph: exact against a simple reference, PAHQ plan per receiver, thresholds, resume."""

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.acdc import checkpoint as checkpoint_module
from pahq_fx.acdc.circuit import CircuitEdge
from pahq_fx.ir.names import node_of
from pahq_fx.passes.precision import LowPrecisionPerHeadLinear, attention_blocks
from tests.acdc_reference import ReferenceACDC
from tests.builders import Spec, build, keep_only_head, specs, token_ids


def make_task(seed: int, n: int = 4, seq: int = 6) -> pahq_fx.Task:
    return pahq_fx.Task(token_ids(n, seq, seed=seed), token_ids(n, seq, seed=seed + 1000))


@settings(max_examples=8, deadline=None)
@given(spec=specs(), log_threshold=st.floats(-6, -1), seed=st.integers(0, 1000))
def test_fp32_discovery_equals_simple_reference(spec, log_threshold, seed):
    spec = Spec(spec.family, min(spec.layers, 2), spec.heads, spec.kv_heads, spec.head_dim, spec.parallel, spec.seed)
    threshold = math.exp(log_threshold)
    model = build(spec)
    task = make_task(seed)
    reference = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask)
    expected, effects = reference.run(threshold)
    # Decisions within floating-point round-off of the threshold are ties, not tests of the algorithm.
    assume(all(abs(e - threshold) > 1e-5 * max(1.0, threshold) for e in effects.values()))
    circuit = pahq_fx.discover(model, task, threshold=threshold, precision="fp32", progress=False, compile=False)
    assert circuit.edge_set() == expected
    for edge in circuit.edges:
        assert edge.effect == pytest.approx(effects[(edge.sender, edge.receiver)], rel=1e-3, abs=1e-6)
    assert circuit.total_edges == len({(s, r) for r, senders, _ in reference.receivers() for s in senders})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fp32_head_is_the_receivers_head_for_every_query(family, monkeypatch):
    """Every projection that runs during a receiver's queries keeps exactly the receiver's unit in FP32."""
    spec = Spec(family, 2, 4, 2 if family == "llama" else 4, 8)
    model = build(spec)
    calls: list[tuple[int, str, list[int], int]] = []
    original = LowPrecisionPerHeadLinear.units

    def recording_units(self, x, units, full_precision_unit=-1, shared_input=False):
        layer, role = self.site
        calls.append((layer, role, list(units), full_precision_unit))
        return original(self, x, units, full_precision_unit, shared_input)

    monkeypatch.setattr(LowPrecisionPerHeadLinear, "units", recording_units)
    original_lower = pahq_fx.passes.pipeline.lower_precision

    def lower_and_label(graph, *args):
        lowered = original_lower(graph, *args)
        for block in attention_blocks(lowered):
            for role in "qkvo":
                getattr(block, role).site = (block.layer, role)
        return lowered

    monkeypatch.setattr(pahq_fx.passes.pipeline, "lower_precision", lower_and_label)
    per_receiver: dict[str, list[tuple[int, str, list[int], int]]] = {}

    def on_receiver(done):
        per_receiver[done.receiver] = list(calls)
        calls.clear()

    pahq_fx.discover(model, make_task(3), threshold=1e-4, precision="fp8", progress=False, compile=False, callback=on_receiver)
    graph = pahq_fx.acdc.EdgeGraph(pahq_fx.transform(model, precision="fp32", compile=False).head_graph)
    investigated = 0
    for receiver in graph.receivers:
        seen = per_receiver[receiver.name]
        if not receiver.is_attention_input or not seen:
            assert all(fp32 == -1 for layer, _, _, fp32 in seen if not receiver.is_attention_input or layer != receiver.layer)
            continue
        investigated += 1
        info = graph.head_graph.layers[receiver.layer]
        if receiver.role.value == "q":
            expected = {
                "q": receiver.unit,
                "o": receiver.unit,
                "k": info.kv_group_of_head[receiver.unit],
                "v": info.kv_group_of_head[receiver.unit],
            }
        else:
            head = -1 if info.grouped else receiver.unit
            expected = {"q": head, "o": head, "k": receiver.unit, "v": receiver.unit}
        for layer, role, units, fp32 in seen:
            assert fp32 == (expected[role] if layer == receiver.layer else -1), (receiver.name, layer, role, units, fp32)
        ran_in_fp32 = {role for layer, role, units, fp32 in seen if layer == receiver.layer and fp32 in units}
        assert receiver.role.value in ran_in_fp32, receiver.name
    assert investigated >= 3 * 4 // 2


@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_threshold_zero_keeps_exactly_the_edges_that_increase_the_metric(metric):
    model = build(Spec("gpt2", 2, 2, 2, 8))
    base = make_task(5)
    task = pahq_fx.Task(
        base.clean_input_ids,
        base.corrupted_input_ids,
        correct_ids=base.clean_input_ids[:, 0],
        incorrect_ids=base.corrupted_input_ids[:, 0],
    )
    circuit = pahq_fx.discover(model, task, threshold=0.0, metric=metric, precision="fp32", progress=False, compile=False)
    assert circuit.edges
    if metric == "logit_diff":
        assert circuit.removed, "expected some edges whose removal lowers the metric"
    assert all(e.effect >= 0 for e in circuit.edges)
    assert all(e.effect < 0 for e in circuit.removed)


def test_huge_threshold_removes_every_edge():
    model = build(Spec("neox", 2, 2, 2, 8))
    circuit = pahq_fx.discover(model, make_task(6), threshold=1e9, precision="fp8", progress=False, compile=False)
    assert circuit.edges == ()
    assert circuit.total_edges > 0


def test_fp8_circuit_agrees_with_fp32_on_a_sparse_model():
    """Only two heads write: edge effects are far from the threshold, so FP8 noise must not flip decisions."""
    spec = Spec("llama", 2, 4, 2, 8, seed=3)
    model = build(spec)
    keep_only_head(model, spec, 1, 2)
    task = make_task(11, n=6, seq=8)
    fp32 = pahq_fx.discover(model, task, threshold=0.02, precision="fp32", progress=False, compile=False)
    fp8 = pahq_fx.discover(model, task, threshold=0.02, precision="fp8", progress=False, compile=False)
    assert fp32.edges
    assert fp8.jaccard(fp32) >= 0.9


@pytest.mark.parametrize("write_budget", [checkpoint_module.WRITE_BUDGET, 1e12], ids=["default", "only-on-interrupt"])
@pytest.mark.parametrize("speculation", ["off", "removed"])
def test_resume_after_interruption_gives_the_same_circuit(tmp_path, monkeypatch, write_budget, speculation):
    """With a write budget that never lets a save through, the save on interruption alone must keep the state. With
    candidate batches, removals committed together are replayed together and the predictor resumes where it was:
    effects equal bit for bit."""
    monkeypatch.setattr(checkpoint_module, "WRITE_BUDGET", write_budget)
    model = build(Spec("llama", 2, 4, 2, 8))
    task = make_task(7)
    uninterrupted = pahq_fx.discover(
        model, task, threshold=0.005, precision="fp8", progress=False, compile=False, speculation=speculation
    )

    class Stop(Exception):
        pass

    def stop_after(k):
        def callback(done):
            if done.index == k:
                raise Stop

        return callback

    checkpoint = tmp_path / "run.json"
    for k in (3, 9):
        with pytest.raises(Stop):
            pahq_fx.discover(
                model,
                task,
                threshold=0.005,
                precision="fp8",
                progress=False,
                compile=False,
                checkpoint=checkpoint,
                callback=stop_after(k),
                speculation=speculation,
            )
    resumed_from = []
    resumed = pahq_fx.discover(
        model,
        task,
        threshold=0.005,
        precision="fp8",
        progress=False,
        compile=False,
        checkpoint=checkpoint,
        callback=lambda d: resumed_from.append(d.index),
        speculation=speculation,
    )
    assert resumed_from[0] == 10
    assert resumed.edge_set() == uninterrupted.edge_set()
    assert [e.effect for e in resumed.edges] == [e.effect for e in uninterrupted.edges]
    assert resumed.stats.queries == uninterrupted.stats.queries
    assert [e.effect for e in resumed.removed] == [e.effect for e in uninterrupted.removed]


def test_checkpoint_writes_wait_for_their_budget(tmp_path, monkeypatch):
    store = checkpoint_module.Checkpoint(tmp_path / "run.json", {"run": 1})
    assert store.due(), "the first receiver is always saved"
    monkeypatch.setattr(checkpoint_module, "WRITE_BUDGET", 1e12)
    store.save(["resid_post"], [], {}, 1)
    assert not store.due() and store.load()["done"] == ["resid_post"]
    monkeypatch.setattr(checkpoint_module, "WRITE_BUDGET", 0)
    store.save(["resid_post", "m1"], [], {}, 2)
    assert store.due() and store.load()["done"] == ["resid_post", "m1"]
    assert not checkpoint_module.Checkpoint(None, {}).due()


def test_checkpoint_of_another_run_is_refused_and_a_finished_run_removes_its_own(tmp_path):
    model = build(Spec("gpt2", 1, 2, 2, 8))
    checkpoint = tmp_path / "run.json"

    def interrupt(done):
        if done.index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pahq_fx.discover(
            model,
            make_task(1),
            threshold=0.01,
            precision="fp32",
            progress=False,
            compile=False,
            checkpoint=checkpoint,
            callback=interrupt,
        )
    assert checkpoint.exists()
    with pytest.raises(pahq_fx.CheckpointError, match="belongs to another run \\(its threshold differ"):
        pahq_fx.discover(
            model, make_task(1), threshold=0.02, precision="fp32", progress=False, compile=False, checkpoint=checkpoint
        )
    assert checkpoint.exists(), "a refused run must not touch the other run's checkpoint"
    pahq_fx.discover(model, make_task(1), threshold=0.01, precision="fp32", progress=False, compile=False, checkpoint=checkpoint)
    assert not checkpoint.exists()


def _effects(circuit) -> dict:
    return {(e.sender, e.receiver): e.effect for e in (*circuit.edges, *circuit.removed)}


def _assert_same_decisions_but_ties(first, second, threshold: float) -> None:
    """The same circuit, except edges whose effect is within 1% of the threshold in both runs: compiled kernels
    round differently from eager ones (FP8 activation scales, fused GELU), so such a decision is a tie."""
    one, other = _effects(first), _effects(second)
    for edge in first.edge_set() ^ second.edge_set():
        assert abs(one[edge] - threshold) <= 0.01 * threshold and abs(other[edge] - threshold) <= 0.01 * threshold, (
            edge,
            one[edge],
            other[edge],
        )


def test_compiled_discovery_matches_eager_and_compiles_once_per_component_kind():
    """One graph per component kind and shape (attention core; MLP on every row and on the metric rows; final read):
    a 6-layer model compiles no more than a 2-layer one."""
    task = make_task(8)
    compilations = {}
    for layers in (2, 6):
        model = build(Spec("gpt2", layers, 2, 2, 8))
        eager = pahq_fx.discover(model, task, threshold=1e-4, precision="fp8", progress=False, compile=False)
        torch._dynamo.reset()  # count this run's compilations, not what an earlier run left in dynamo's cache
        compiled = pahq_fx.discover(model, task, threshold=1e-4, precision="fp8", progress=False, compile=True)
        assert len(compiled.nodes) > 2 * layers, "too few nodes left for every component kind to run"
        _assert_same_decisions_but_ties(eager, compiled, threshold=1e-4)
        assert eager.stats.compilations == 0 and eager.stats.execution.startswith("eager")
        assert compiled.stats.execution.startswith("compiled") and compiled.stats.compile_s > 0
        compilations[layers] = compiled.stats.compilations
    # A kind compiles where a query first runs it: the MLP on every row only where a query's cone reaches an
    # attention layer's keys and values through it, which the circuit decides. Depth must add none.
    assert 3 <= compilations[6] <= compilations[2] <= 4, compilations


def test_auto_defaults_name_their_choice_on_this_device():
    model = build(Spec("gpt2", 1, 2, 2, 8))
    circuit = pahq_fx.discover(model, make_task(4), threshold=0.01, progress=False)
    # A search this short would not repay measuring another format: FP32 without measuring, and the note says why.
    assert circuit.precision == "fp32" and circuit.precision_note.startswith("auto: fp32 without measuring")
    assert circuit.stats.execution.startswith("eager (compile='auto'")
    assert circuit.stats.forward_s > 0 and circuit.stats.forward_equivalents > 0 and circuit.stats.state_bytes > 0
    with pytest.raises(pahq_fx.PahqError, match="compile must be"):
        pahq_fx.discover(model, make_task(4), threshold=0.01, progress=False, compile="sometimes")


def test_circuit_roundtrip_dot_and_evaluate(tmp_path):
    model = build(Spec("llama", 2, 2, 1, 8))
    task = make_task(9)
    circuit = pahq_fx.discover(model, task, threshold=0.01, precision="bf16", progress=False, compile=False)
    path = tmp_path / "circuit.json"
    circuit.save(path)
    loaded = pahq_fx.Circuit.load(path)
    assert loaded == circuit
    dot = circuit.to_dot()
    assert dot.startswith("digraph circuit {") and dot.count("[label=") == len(circuit.edges)
    assert circuit.groups == {"a0.g0": ["a0.h0", "a0.h1"], "a1.g0": ["a1.h0", "a1.h1"]}
    arrows = [line.split('"')[1::2][:2] for line in dot.splitlines() if " -> " in line]
    assert sorted(map(tuple, arrows)) == sorted((e.sender, node_of(e.receiver)) for e in circuit.edges), "circuit edges only"
    for group, heads in circuit.groups.items():
        assert (
            f'subgraph "cluster_{group.replace(".", "_")}" {{ label="{group}: keys and values of {", ".join(heads)}"' in dot
        ) == (group in circuit.nodes)
    faith = circuit.evaluate(model, task)
    assert faith.full_model == pytest.approx(0.0, abs=1e-6)
    assert faith.empty_circuit >= faith.circuit - 1e-6
    assert circuit.stats.queries > 0 and circuit.stats.peak_memory_mb > 0
    assert set(circuit.versions) >= {"torch", "torchao", "transformers", "pahq_fx"}
    grouped = dataclasses.replace(loaded, edges=(CircuitEdge("embed", "a0.g0.k", 1.0),))  # GPT-2 has no key/value groups
    with pytest.raises(
        pahq_fx.PahqError,
        match=r"the circuit \(found on LlamaForCausalLM\) has 1 edge that this model "
        r"\(GPT2LMHeadModel\) does not have: \[\('embed', 'a0.g0.k'\)\]",
    ):
        grouped.evaluate(build(Spec("gpt2", 2, 2, 2, 8)), task)


def test_logit_difference_metric_needs_answers():
    model = build(Spec("gpt2", 1, 2, 2, 8))
    with pytest.raises(pahq_fx.TaskError, match="needs correct_ids"):
        pahq_fx.discover(model, make_task(1), threshold=0.1, metric="logit_diff", progress=False, compile=False)
    task = pahq_fx.Task(
        token_ids(3, 5), token_ids(3, 5, seed=4), correct_ids=torch.tensor([1, 2, 3]), incorrect_ids=torch.tensor([4, 5, 6])
    )
    circuit = pahq_fx.discover(model, task, threshold=0.1, metric="logit_diff", progress=False, compile=False)
    assert circuit.metric == "logit_diff"


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), "0.1"])
def test_bad_threshold(threshold):
    with pytest.raises(pahq_fx.PahqError, match="threshold"):
        pahq_fx.discover(build(Spec("gpt2", 1, 2, 2, 8)), make_task(1), threshold=threshold, progress=False)


@pytest.mark.parametrize(("model_name", "task_name"), [("llama-ioi", "ioi"), ("gpt2-induction", "induction")])
def test_fp8_and_bf16_circuits_agree_with_fp32_on_trained_models(model_name, task_name):
    from pahq_fx import zoo
    from pahq_fx.tasks import make_task

    model, tokenizer = zoo.load(model_name)
    task = make_task(task_name, tokenizer, n=16, seed=0)
    circuits = {
        p: pahq_fx.discover(model, task, threshold=0.05, precision=p, progress=False, compile=False)
        for p in ("fp32", "fp8", "bf16")
    }
    assert circuits["fp32"].edges
    for precision in ("fp8", "bf16"):
        jaccard = circuits[precision].jaccard(circuits["fp32"])
        print(f"{model_name}: {precision} vs fp32 edge Jaccard {jaccard:.3f}")
        assert jaccard >= 0.9


def test_a_float64_model_is_searched_exactly_and_its_report_says_so():
    """ "fp32" leaves a float64 model's unlowered heads in float64: the circuit is the float64 reference's, and the
    precision note says what fp32 meant; a float32 model's note does not mention it."""
    model = build(Spec("llama", 2, 4, 2, 8)).double()
    task = make_task(3)
    expected, _ = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask).run(1e-3)
    circuit = pahq_fx.discover(model, task, threshold=1e-3, precision="fp32", progress=False, allow_weak_task=True)
    assert circuit.edge_set() == expected and len(expected) > 1
    assert "float64" in circuit.precision_note
    single = pahq_fx.discover(model.float(), task, threshold=1e-3, precision="fp32", progress=False, allow_weak_task=True)
    assert "float64" not in single.precision_note
