"""The per-head split is exact in FP32 and finds the structure of every family from the graph."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.ir.modules import AttentionBlock, PerHeadLinear
from tests.builders import RUNTIME_FAMILIES, Spec, build, reference_logits, specs, token_ids


@settings(max_examples=15, deadline=None)
@given(spec=specs(), batch=st.integers(1, 3), seq=st.integers(1, 12), data=st.data())
def test_fp32_plan_reproduces_original_logits(spec, batch, seq, data):
    model = build(spec)
    head = (data.draw(st.integers(0, spec.layers - 1)), data.draw(st.integers(0, spec.heads - 1)))
    transformed = pahq_fx.transform(model, head=head, precision="fp32", compile=False)
    ids = token_ids(batch, seq, seed=spec.seed)
    torch.testing.assert_close(transformed(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(spec=specs())
def test_head_graph_matches_config(spec):
    graph = pahq_fx.transform(build(spec), precision="fp32", compile=False).head_graph
    assert graph.n_layers == spec.layers
    assert graph.d_model == spec.d_model
    for layer in graph.layers:
        assert layer.n_heads == spec.heads
        assert layer.n_kv_groups == spec.kv_heads
        assert layer.kv_group_of_head == tuple(h // (spec.heads // spec.kv_heads) for h in range(spec.heads))
        parallel = spec.family == "neox" and spec.parallel
        assert (f"a{layer.index}" in layer.components[0].reads) is not parallel
    senders, receivers = graph.senders(), graph.receivers()
    assert len(senders) == 1 + spec.layers * (spec.heads + 1)
    assert len(receivers) == spec.layers * (spec.heads + 2 * spec.kv_heads + 1) + 1
    assert len(set(receivers)) == len(receivers)
    if spec.kv_heads != spec.heads:
        assert "a0.g0.k" in receivers and "a0.h0.k" not in receivers
    else:
        assert "a0.h0.k" in receivers


def test_per_head_outputs_sum_to_block_output():
    spec = Spec("gpt2", layers=1, heads=4, kv_heads=4, head_dim=8)
    transformed = pahq_fx.transform(build(spec), precision="fp32", compile=False)
    block = transformed.graph.get_submodule("a0")
    assert isinstance(block, AttentionBlock) and isinstance(block.q, PerHeadLinear)
    x = torch.randn(2, 5, spec.d_model)
    prelude_aux = transformed.graph.prelude(token_ids(2, 5))[1:]
    step = next(s for s in transformed.graph.meta["structure"].steps if s.name == "a0")
    aux = [prelude_aux[i] for i in step.aux]
    q_in = x.unsqueeze(2).expand(-1, -1, 4, -1)
    per_head = block(q_in, q_in, q_in, *aux)
    assert per_head.shape == (2, 5, 4, spec.d_model)
    # Heads are independent: changing head 1's query input changes only head 1's output.
    q_changed = q_in.clone()
    q_changed[:, :, 1] += torch.randn_like(q_changed[:, :, 1])
    changed = block(q_changed, q_in, q_in, *aux)
    differs = (changed - per_head).abs().amax(dim=(0, 1, 3)) > 0
    assert differs.tolist() == [False, True, False, False]


@settings(max_examples=12, deadline=None)
@given(spec=specs(), fmt=st.sampled_from(["fp32", "fp8", "bf16"]), data=st.data())
def test_one_stream_equals_per_head_copies(spec, fmt, data):
    """``from_stream`` (one norm, one matrix multiply per projection) computes what ``forward`` computes on per-head
    copies of the stream, under any precision plan; the block stays one module of the graph."""
    from pahq_fx.passes.precision import FullPrecisionUnits, set_plan

    transformed = pahq_fx.transform(build(spec), precision=fmt, compile=False)
    layer = data.draw(st.integers(0, spec.layers - 1), label="layer")
    head = data.draw(st.integers(-1, spec.heads - 1), label="FP32 head (-1: none)")
    block = transformed.graph.get_submodule(f"a{layer}")
    assert isinstance(block, AttentionBlock)
    set_plan(transformed.graph, lambda b: FullPrecisionUnits(head, -1 if head < 0 else b.kv_group_of_head[head]))
    ids = token_ids(2, 6, seed=spec.seed)
    prelude = transformed.graph.prelude(ids)
    step = next(s for s in transformed.graph.meta["structure"].steps if s.name == f"a{layer}")
    aux = [prelude[1:][i] for i in step.aux]
    read = torch.randn(2, 6, spec.d_model, generator=torch.Generator().manual_seed(spec.seed))
    q_in = read.unsqueeze(2).expand(-1, -1, spec.heads, -1)
    kv_in = read.unsqueeze(2).expand(-1, -1, spec.kv_heads, -1)
    with torch.no_grad():
        per_head = block(q_in, kv_in, kv_in, *aux)
        one_stream = block.from_stream(read, *aux)
    torch.testing.assert_close(one_stream, per_head, rtol=1e-4, atol=1e-4)
    if head >= 0:
        torch.testing.assert_close(one_stream[:, :, head], per_head[:, :, head], rtol=1e-5, atol=1e-5)


def test_split_leaves_its_input_graph_as_it_was_and_missing_passes_are_named():
    from pahq_fx import passes
    from pahq_fx.ir import graph_meta

    model = build(Spec("gpt2", layers=2, heads=2, kv_heads=2, head_dim=8))
    traced = passes.trace(model)
    code, ids = traced.code, token_ids(2, 5)
    expected = traced(ids)
    split = passes.split_heads(traced)
    assert traced.code == code, "split_heads rewrote its input graph"
    torch.testing.assert_close(traced(ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(split(ids), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(pahq_fx.UnsupportedArchitectureError, match=r"run pahq_fx.passes.split_heads"):
        graph_meta.head_graph(traced)
    with pytest.raises(pahq_fx.UnsupportedArchitectureError, match=r"run pahq_fx.passes.split_heads"):
        passes.lower_precision(traced, "fp8")
    assert graph_meta.precision_report(split) is None
    lowered = passes.build(model, ids, pahq_fx.PrecisionConfig("bf16"))
    assert graph_meta.precision_report(lowered).config.low_precision is pahq_fx.Format.BF16


@settings(max_examples=8, deadline=None)
@given(spec=specs(RUNTIME_FAMILIES), batch=st.integers(1, 3), seq=st.integers(1, 9))
def test_probes_packed_by_position_find_the_layout_of_one_feature_at_a_time(spec, batch, seq):
    """Probing one feature per position at once assigns every projection feature to the same (role, head) as
    probing one feature at a time, and the packed probes are really used for these families."""
    from pahq_fx.analysis import probes
    from pahq_fx.passes import split_heads, trace

    model = build(spec)
    traced = trace(model, token_ids(batch, seq, seed=spec.seed))
    decisions = []
    checked = probes.HeadProbe._per_position

    def recorded(self, *args):
        decisions.append(checked(self, *args))
        return decisions[-1]

    def weights(split):
        return {name: t.clone() for name, t in split.named_parameters() if name.split(".")[-2] in ("q", "k", "v", "o")}

    original = probes.HeadProbe._per_position
    try:
        probes.HeadProbe._per_position = recorded
        packed = weights(split_heads(traced))
        probes.HeadProbe._per_position = lambda self, *args: False
        one_at_a_time = weights(split_heads(traced))
    finally:
        probes.HeadProbe._per_position = original
    assert decisions and all(decisions)
    assert packed.keys() == one_at_a_time.keys() and packed
    for name in packed:
        assert torch.equal(packed[name], one_at_a_time[name]), name


@pytest.mark.parametrize("low_precision", ["fp32", "fp8"])
def test_the_per_head_graph_survives_torch_save_and_load(low_precision, tmp_path):
    """Saved with ``torch.save`` and loaded again (FX traces a GraphModule's code anew on load), the per-head graph of
    a GPT-2, whose fused GELU is the ``pahq_fx::gelu_tanh`` operator, gives the same logits bit for bit."""
    model = build(Spec("gpt2", 2, 2, 2, 8))
    graph = pahq_fx.transform(model, precision=low_precision, compile=False).graph
    ids = token_ids(2, 6, seed=3)
    torch.save(graph, tmp_path / "graph.pt")
    loaded = torch.load(tmp_path / "graph.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids), graph(ids))
    targets = {n.target for m in loaded.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes}
    assert torch.ops.pahq_fx.gelu_tanh.default in targets
