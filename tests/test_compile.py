"""Compiled use: no recompilation when the investigated head changes; backend and passes agree with transform."""

import torch

import pahq_fx
from pahq_fx import passes
from pahq_fx.compile import CountingBackend
from tests.builders import Spec, build, token_ids


def test_switching_head_does_not_recompile():
    spec = Spec("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    transformed = pahq_fx.transform(build(spec), head=(0, 0), compile=True)
    ids = token_ids(2, 6)
    first = transformed(ids)
    assert transformed.compilations == 1
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    outputs = []
    for head in [(0, 3), (1, 1), None, (1, 2), (0, 0)]:
        transformed.set_head(head)
        outputs.append(transformed(ids))
    assert transformed.compilations == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
    torch.testing.assert_close(outputs[-1], first, rtol=0, atol=0)
    assert not torch.equal(outputs[0], outputs[1]), "switching the head changed nothing"
    eager = pahq_fx.transform(build(spec), head=(1, 2), compile=False)
    torch.testing.assert_close(outputs[3], eager(ids), rtol=1e-4, atol=1e-4)


def test_standalone_passes_and_backend_match_transform():
    spec = Spec("gpt2", layers=2, heads=2, kv_heads=2, head_dim=8)
    model = build(spec)
    ids = token_ids(2, 6)
    expected = pahq_fx.transform(model, head=(1, 0), compile=False)(ids)

    gm = passes.split_heads(passes.fuse_activations(passes.trace(model)))
    gm = passes.lower_precision(gm, "fp8", "per_row")
    passes.set_head(gm, (1, 0))
    assert isinstance(gm, torch.fx.GraphModule)
    torch.testing.assert_close(gm(ids), expected, rtol=0, atol=0)

    inner = CountingBackend("inductor")
    compiled = torch.compile(
        lambda x: model(input_ids=x, use_cache=False).logits, backend=pahq_fx.backend(head=(1, 0), inner=inner)
    )
    torch.testing.assert_close(compiled(ids), expected, rtol=1e-4, atol=1e-4)
    assert inner.compilations == 1, "the per-head graph was not compiled by the inner backend"
