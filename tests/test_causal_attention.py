"""A fixed-length trace leaves a causal mask to SDPA's ``is_causal`` exactly where that changes nothing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import MistralConfig, MistralForCausalLM

from pahq_fx.passes import trace
from pahq_fx.passes.causal_attention import _is_causal_pattern, mask_free_attention
from tests.builders import MAX_POS, RUNTIME_FAMILIES, VOCAB, Spec, build, reference_logits, specs, token_ids

SDPA = torch.ops.aten.scaled_dot_product_attention.default
WINDOW = 4


def _attention_masks(gm: torch.fx.GraphModule) -> list:
    """The mask argument of every SDPA call of the graph (None where there is none)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    assert calls, "the graph has no SDPA call"
    return [n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) for n in calls]


SDPA_FAMILIES = tuple(f for f in RUNTIME_FAMILIES if f != "gemma2")  # Gemma 2 runs eager attention (soft-capping)


@settings(max_examples=10, deadline=None)
@given(spec=specs(families=SDPA_FAMILIES), seq=st.integers(2, 8), batch=st.integers(1, 4))
def test_a_fixed_length_trace_of_a_causal_model_has_no_mask_and_keeps_the_logits(spec, seq, batch):
    model = build(spec)
    gm = trace(model, token_ids(2, seq), dynamic_shapes="batch")
    assert all(m is None for m in _attention_masks(gm))
    assert model.config._attn_implementation == "sdpa"
    ids = token_ids(batch, seq, seed=5)
    torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq", [2, 4, 5, 8])
def test_a_sliding_window_keeps_its_mask_where_it_is_shorter_than_the_sequence(seq):
    """Up to the window's length a sliding-window mask is the causal one; beyond it, it is not."""
    torch.manual_seed(seq)
    config = MistralConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        sliding_window=WINDOW,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = MistralForCausalLM(config).eval()
    gm = trace(model, token_ids(2, seq), dynamic_shapes="batch")
    assert all(m is None for m in _attention_masks(gm)) == (seq <= WINDOW)
    ids = token_ids(3, seq, seed=5)
    torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)


@settings(max_examples=4, deadline=None)
@given(spec=specs(families=("gpt2", "llama")))
def test_a_trace_with_a_dynamic_length_keeps_its_mask(spec):
    """``is_causal`` would be exact at every length too, but transformers' mask is what the export checks guards
    against; a graph for any length is traced as before."""
    gm = trace(build(spec), token_ids(2, 5), dynamic_shapes=True)
    assert gm.meta["dynamic_dims"] == (0, 1)
    assert all(m is not None for m in _attention_masks(gm))


def test_a_model_on_eager_attention_comes_back_on_eager():
    model = build(Spec("llama", 1, 2, 1, 8))
    model.set_attn_implementation("eager")
    gm = trace(model, token_ids(2, 6), dynamic_shapes="batch")
    assert model.config._attn_implementation == "eager"
    assert all(m is None for m in _attention_masks(gm))


def test_a_model_not_on_sdpa_is_left_alone():
    model = build(Spec("gpt2", 1, 2, 2, 8))
    model.set_attn_implementation("eager")
    with mask_free_attention(model, token_ids(2, 6)) as exact:
        assert exact is False
        assert model.config._attn_implementation == "eager"


def _causal(q: int, kv: int) -> torch.Tensor:
    return torch.ones(q, kv, dtype=torch.bool).tril()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_additive_mask_is_causal_only_with_zeros_on_the_triangle_and_blocked_values_above(dtype):
    causal = _causal(5, 5)[None, None].expand(2, 1, 5, 5)
    additive = torch.zeros(causal.shape, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
    assert _is_causal_pattern(additive)
    assert _is_causal_pattern(torch.zeros(causal.shape, dtype=dtype).masked_fill(~causal, float("-inf")))
    biased = additive.clone()
    biased[..., 3, 1] = -0.5  # an ALiBi-like bias on an allowed position
    assert not _is_causal_pattern(biased)
    weak = additive.clone()
    weak[..., 1, 3] = -1.0  # a blocked position that is not blocked
    assert not _is_causal_pattern(weak)


@given(q=st.integers(1, 9), kv_extra=st.integers(0, 3), flip=st.integers(0, 80))
def test_a_boolean_mask_is_causal_only_when_it_is_the_lower_triangle(q, kv_extra, flip):
    mask = _causal(q, q + kv_extra)[None, None]
    if kv_extra:
        assert not _is_causal_pattern(mask)
        return
    assert _is_causal_pattern(mask)
    changed = mask.clone().flatten()
    changed[flip % changed.numel()] ^= True
    assert not _is_causal_pattern(changed.view(mask.shape))


def test_a_model_whose_eager_forward_fails_is_traced_with_its_mask():
    """The checks run the model eagerly; where that fails but the export does not (Dots3-Note's attention indexes
    the mask that transformers skips outside a trace), the masked trace goes on."""
    model = build(Spec("gpt2", 1, 2, 2, 8))

    def export_only(module, args, kwargs):
        if not torch.compiler.is_exporting():
            raise RuntimeError("this model runs under torch.export only")

    model.register_forward_pre_hook(export_only, with_kwargs=True)
    gm = trace(model, token_ids(2, 5), dynamic_shapes="batch")
    assert gm.meta["dynamic_dims"] == (0,)
    assert all(m is not None for m in _attention_masks(gm))
