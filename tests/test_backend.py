"""``pahq_fx.backend`` inside someone else's ``torch.compile`` call, with the model called the usual way."""

from __future__ import annotations

import pytest
import torch

import pahq_fx
from pahq_fx.compile import CountingBackend
from tests.builders import Spec, build, token_ids

SPECS = [Spec("gpt2", layers=2, heads=2, kv_heads=2, head_dim=8), Spec("llama", layers=2, heads=4, kv_heads=2, head_dim=8)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_compiled_hf_model_returns_its_output_object_with_cache(spec):
    model = build(spec)
    ids = token_ids(2, 6)
    expected = pahq_fx.transform(model, head=(1, 0), example_inputs=ids, compile=False)(ids)
    with torch.no_grad():
        plain = model(ids)
        out = torch.compile(model, backend=pahq_fx.backend(head=(1, 0), inner="eager"))(ids)
    assert type(out) is type(plain)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert not torch.allclose(out.logits, plain.logits), "the FP8 heads changed nothing"
    assert len(out.past_key_values.layers) == spec.layers
    for mine, theirs in zip(out.past_key_values.layers, plain.past_key_values.layers, strict=True):
        assert mine.keys.shape == theirs.keys.shape and mine.values.shape == theirs.values.shape
        # computed by the split graph: FP8 projections, close to but not equal to the FP32 model's cache
        assert not torch.equal(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=0.2, atol=0.2 * float(theirs.keys.abs().max()))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_fp32_backend_reproduces_cache_and_hidden_states(spec):
    model = build(spec)
    ids = token_ids(2, 6)
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True)
        out = torch.compile(model, backend=pahq_fx.backend(head=(0, 1), precision="fp32", inner="eager"))(
            ids, output_hidden_states=True
        )
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(out.hidden_states, plain.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(out.past_key_values.layers, plain.past_key_values.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-4)


def test_inner_is_any_backend_callable_and_graphs_without_attention_pass_through():
    model = build(SPECS[0])
    ids = token_ids(2, 6)
    seen: list[torch.fx.GraphModule] = []

    def inner(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    counted = CountingBackend(inner)

    def fn(x):
        logits = model(x, use_cache=False).logits
        torch._dynamo.graph_break()
        return logits.float().softmax(-1).max(-1).values  # a second graph, without attention

    with torch.no_grad():
        got = torch.compile(fn, backend=pahq_fx.backend(head=(1, 1), inner=counted))(ids)
    expected = pahq_fx.transform(model, head=(1, 1), compile=False)(ids).softmax(-1).max(-1).values
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert counted.compilations == 2
    assert any("_a0_" in n.name for n in seen[0].graph.nodes), "the inner backend did not get the per-head graph"
    assert not any("attention" in str(n.target) for n in seen[1].graph.nodes)


def test_decoding_with_a_cache_is_a_clear_error():
    model = build(SPECS[1])
    ids = token_ids(2, 6)
    compiled = torch.compile(model, backend=pahq_fx.backend(head=(0, 0), inner="eager"))
    with torch.no_grad():
        first = compiled(ids)
        with pytest.raises(Exception, match=r"past_key_values.*only input_ids may vary"):
            compiled(ids[:, -1:], past_key_values=first.past_key_values)
