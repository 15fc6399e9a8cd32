"""Tracing keeps the model as it was and yields logits for any batch and sequence length."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pahq_fx.passes import trace
from tests.builders import build, reference_logits, specs, token_ids


@settings(max_examples=6, deadline=None)
@given(spec=specs(), train_mode=st.booleans())
def test_trace_does_not_mutate_model(spec, train_mode):
    model = build(spec).train(train_mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    gm = trace(model, token_ids(2, 5))
    assert model.training == train_mode
    assert model.config._attn_implementation == impl
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    ids = token_ids(3, 8, seed=7)
    torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert gm.meta["dynamic_shapes"]
