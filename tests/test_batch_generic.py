"""A trace at a fixed batch size, made batch-generic, is exact at every batch size (pahq_fx.passes.batch_generic)."""

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx
from transformers import PretrainedConfig

from pahq_fx.passes import batch_generic, trace
from pahq_fx.passes.trace_cache import ENV
from tests.builders import RUNTIME_FAMILIES, Spec, build, reference_logits, specs, token_ids

trace_module = importlib.import_module("pahq_fx.passes.trace")  # the name pahq_fx.passes.trace is the function

aten = torch.ops.aten


@pytest.fixture
def traces(monkeypatch):
    """Every trace of the test, trace cache off: ("fixed", batch) for a trace at a fixed shape,
    ("export", batch, dynamic_shapes) for an export."""
    monkeypatch.setenv(ENV, "off")
    calls = []
    fixed, export = trace_module._fixed_shape_graph, torch.export.export

    def recording_fixed(module, input_ids):
        calls.append(("fixed", input_ids.shape[0]))
        return fixed(module, input_ids)

    def recording_export(module, args, *rest, **kwargs):
        calls.append(("export", args[0].shape[0], kwargs.get("dynamic_shapes")))
        return export(module, args, *rest, **kwargs)

    monkeypatch.setattr(trace_module, "_fixed_shape_graph", recording_fixed)
    monkeypatch.setattr(torch.export, "export", recording_export)
    return calls


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=specs(families=RUNTIME_FAMILIES),
    batches=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    seq=st.integers(2, 8),
    example_batch=st.integers(1, 3),
)
def test_a_batch_only_trace_is_one_fixed_batch_trace_exact_at_every_batch(traces, spec, batches, seq, example_batch):
    traces.clear()
    model = build(spec).eval()
    example = token_ids(example_batch, seq)
    gm = trace(model, example, dynamic_shapes="batch")
    assert gm.meta["dynamic_dims"] == (0,)
    assert traces == [("fixed", batch_generic.tracing_batch(model, example))]
    for batch in batches:
        ids = token_ids(batch, seq, seed=batch)
        torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)


@given(known=st.lists(st.integers(-(10**6), 10**6), max_size=30), seq=st.integers(1, 300))
def test_the_tracing_batch_exceeds_every_small_integer_of_the_config_and_divides_none(known, seq):
    """No index or size of the model can equal it, and no product of its sizes can be a multiple of it."""
    model = build(Spec("gpt2", 1, 2, 2, 8))
    for i, value in enumerate(known):
        setattr(model.config, f"extra_{i}", value)
    model.config.nested_extra = {"chunk_sizes": [64, 2 * 67]}
    example = token_ids(2, seq)
    batch = batch_generic.tracing_batch(model, example)
    assert all(batch % d for d in range(2, batch))
    integers = [
        abs(v) for v in (*known, 64, 2 * 67, *example.shape, *model.config.to_dict().values(), 2**63 - 1) if type(v) is int and v
    ]
    assert all(v % batch for v in integers)
    assert batch > max(v for v in integers if v <= 8192)


class _ChunkLoop(torch.nn.Module):
    """Fills a 64-slot state slot by slot, as Qwen3-Next's chunked recurrence does: its graph spells out every index
    0..63, so a tracing batch among them would be taken for the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.config = PretrainedConfig(chunk_size=64)
        self.embed = torch.nn.Embedding(40, 8)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> tuple[torch.Tensor]:
        x = self.embed(input_ids)
        state = x.new_zeros(x.shape[0], 64, 8)
        for i in range(64):
            state[:, i] = x.mean(1) * (i + 1) + state[:, i - 1]
        return (x + state.sum(1, keepdim=True),)


def test_a_model_that_spells_out_loop_indices_gets_a_batch_generic_trace(traces):
    """Its slot writes are hidden from data flow, so the fixed-batch graph is exported again (functionalised) at the
    same batch, never with a dynamic batch."""
    module = _ChunkLoop().eval()
    gm = trace(module, token_ids(2, 5), dynamic_shapes="batch")
    batch = batch_generic.tracing_batch(module, token_ids(2, 5))
    assert gm.meta["dynamic_dims"] == (0,) and traces == [("fixed", batch), ("export", batch, None)]
    for batch in (1, 3, 4):
        ids = token_ids(batch, 5, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), module(ids)[0])


class _Flattening(torch.nn.Module):
    """Uses its batch size as a literal the ways model code does: a flattened view, a new tensor, a slice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        flat = x.reshape(batch * seq, width) * 2
        offsets = torch.arange(batch, dtype=x.dtype).view(batch, 1, 1)
        return flat.view(batch, seq, width)[:batch] + offsets


@given(batch=st.integers(1, 9))
def test_generalise_makes_every_batch_literal_symbolic(batch):
    traced_at = 61
    module = _Flattening()
    gm = trace_module._fixed_shape_graph(module, torch.randn(traced_at, 3, 4))
    replaced = batch_generic.generalise(gm, traced_at)
    assert replaced >= 4
    assert any(n.target is aten.sym_size.int for n in gm.graph.nodes)
    x = torch.randn(batch, 3, 4)
    torch.testing.assert_close(gm(x), module(x))


def test_a_graph_without_batch_literals_is_left_as_it_is():
    gm = fx.symbolic_trace(torch.nn.Linear(4, 5))
    before = gm.code
    assert batch_generic.generalise(gm, 61) == 0
    assert gm.code == before
