"""A trace at a fixed batch size, made batch-generic, is exact at every batch size (pahq_fx.batch_generic)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

from pahq_fx import batch_generic
from pahq_fx.passes import trace
from pahq_fx.trace_cache import ENV
from tests.builders import RUNTIME_FAMILIES, Spec, build, reference_logits, specs, token_ids

aten = torch.ops.aten


@pytest.fixture
def exports(monkeypatch):
    """Every ``torch.export.export`` call of the test, as (batch of the example, dynamic_shapes), trace cache off."""
    monkeypatch.setenv(ENV, "off")
    calls = []
    export = torch.export.export

    def recording(module, args, *rest, **kwargs):
        calls.append((args[0].shape[0], kwargs.get("dynamic_shapes")))
        return export(module, args, *rest, **kwargs)

    monkeypatch.setattr(torch.export, "export", recording)
    return calls


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs(families=RUNTIME_FAMILIES), batches=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       seq=st.integers(2, 8), example_batch=st.integers(1, 3))
def test_a_batch_only_trace_is_one_fixed_batch_export_exact_at_every_batch(exports, spec, batches, seq, example_batch):
    exports.clear()
    model = build(spec).eval()
    example = token_ids(example_batch, seq)
    gm = trace(model, example, dynamic_shapes="batch")
    assert gm.meta["dynamic_dims"] == (0,)
    assert exports == [(batch_generic.tracing_batch(model, example), None)]
    for batch in batches:
        ids = token_ids(batch, seq, seed=batch)
        torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)


@given(known=st.lists(st.integers(-10**6, 10**6), max_size=30))
def test_the_tracing_batch_divides_no_integer_of_the_config_or_the_example(known):
    """Collisions are avoided, not just unlikely: a config holding the first candidates' multiples moves past them."""
    model = build(Spec("gpt2", 1, 2, 2, 8))
    for i, value in enumerate(known):
        setattr(model.config, f"extra_{i}", value)
    model.config.nested_extra = {"sizes": [batch_generic.TRACING_BATCHES[0] * 3]}
    example = token_ids(2, 5)
    batch = batch_generic.tracing_batch(model, example)
    assert batch in batch_generic.TRACING_BATCHES[1:]
    assert all(v % batch for v in (*known, *example.shape, *model.config.to_dict().values(), 2**63 - 1)
               if type(v) is int and v)


class _Flattening(torch.nn.Module):
    """Uses its batch size as a literal the ways model code does: a flattened view, a new tensor, a slice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        flat = x.reshape(batch * seq, width) * 2
        offsets = torch.arange(batch, dtype=x.dtype).view(batch, 1, 1)
        return flat.view(batch, seq, width)[:batch] + offsets


@given(batch=st.integers(1, 9))
def test_generalise_makes_every_batch_literal_symbolic(batch):
    traced_at = batch_generic.TRACING_BATCHES[0]
    module = _Flattening()
    gm = torch.export.export(module, (torch.randn(traced_at, 3, 4),), strict=False).module(check_guards=False)
    replaced = batch_generic.generalise(gm, traced_at)
    assert replaced >= 4
    assert any(n.target is aten.sym_size.int for n in gm.graph.nodes)
    x = torch.randn(batch, 3, 4)
    torch.testing.assert_close(gm(x), module(x))


def test_a_graph_without_batch_literals_is_left_as_it_is():
    gm = fx.symbolic_trace(torch.nn.Linear(4, 5))
    before = gm.code
    assert batch_generic.generalise(gm, batch_generic.TRACING_BATCHES[0]) == 0
    assert gm.code == before
