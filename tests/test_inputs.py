"""``example_inputs`` in every form PyTorch and Hugging Face users pass them, and clear errors for the rest."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

import pahq_fx
from pahq_fx import passes
from tests.builders import Spec, build, token_ids

FORMS = {
    "tensor": lambda ids: ids,
    "tuple": lambda ids: (ids,),
    "list": lambda ids: [ids],
    "dict": lambda ids: {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
    "BatchEncoding": lambda ids: BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
}


@pytest.fixture(scope="module")
def model_and_expected():
    model = build(Spec("llama", layers=1, heads=2, kv_heads=1, head_dim=8))
    ids = token_ids(2, 5)
    expected = pahq_fx.transform(model, head=(0, 1), example_inputs=ids, precision="bf16", compile=False)(ids)
    return model, ids, expected


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_traces_the_same_model(model_and_expected, form):
    model, ids, expected = model_and_expected
    example = FORMS[form](ids)
    pahq = pahq_fx.transform(model, head=(0, 1), example_inputs=example, precision="bf16", compile=False)
    torch.testing.assert_close(pahq(ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(pahq(example), expected, rtol=0, atol=0)
    gm = passes.trace(model, example)
    assert torch.equal(gm.meta["example_input_ids"], ids)
    split = passes.split_heads(gm, example)
    assert split.meta["head_graph"].layers[0].n_kv_groups == 1


@pytest.mark.parametrize(
    "example, message",
    [
        (torch.randn(2, 5), "integer token ids, got a torch.float32"),
        (torch.randint(0, 10, (5,)), r"add the batch dimension"),
        (torch.randint(0, 10, (1, 2, 5)), r"shape \[batch, seq\]"),
        ({"attention_mask": torch.ones(2, 5)}, "no 'input_ids' entry"),
        (BatchEncoding({"attention_mask": torch.ones(2, 5)}), "no 'input_ids' entry"),
        ((), "empty tuple"),
        ([[1, 2, 3]], "must be a torch.Tensor, got list"),
        ((torch.randn(2, 5, 8),), "got a torch.float32"),
    ],
)
def test_bad_example_inputs_name_the_problem(model_and_expected, example, message):
    model = model_and_expected[0]
    with pytest.raises(pahq_fx.InvalidInputsError, match=message):
        pahq_fx.transform(model, example_inputs=example, compile=False)
    with pytest.raises(pahq_fx.InvalidInputsError, match=message):
        passes.trace(model, example)
