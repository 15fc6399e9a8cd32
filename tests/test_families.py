"""Families no issue names go through the same generic pass: exact in FP32, or rejected with a clear reason."""

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.ir import names
from pahq_fx.ir.names import Role

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=64,
    max_position_embeddings=32,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
SUPPORTED = {
    # name: (config class, model class, config, expected kv groups, MLP reads its own layer's attention)
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, num_key_value_heads=2), 2, True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON, num_key_value_heads=2), 2, True),
    "qwen3 (q/k norm)": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, num_key_value_heads=2, head_dim=8), 2, True),
    "gemma (scaled embedding)": ("GemmaConfig", "GemmaForCausalLM", dict(COMMON, num_key_value_heads=1, head_dim=8), 1, True),
    "phi (parallel, partial rotary)": ("PhiConfig", "PhiForCausalLM", dict(COMMON), 4, False),
    "gptj (eager attention, shared norm)": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=32, rotary_dim=4, bos_token_id=0, eos_token_id=0),
        4,
        False,
    ),
    "falcon (multi-query, parallel)": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, bos_token_id=0, eos_token_id=0),
        1,
        False,
    ),
    "gpt_bigcode (multi-query)": (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=32, multi_query=True, bos_token_id=0, eos_token_id=0),
        1,
        True,
    ),
    "granite (residual multiplier)": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(COMMON, num_key_value_heads=2, residual_multiplier=0.5),
        2,
        True,
    ),
    "opt (MLP residual on [batch*seq, d])": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=64,
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            ffn_dim=64,
            max_position_embeddings=32,
            word_embed_proj_dim=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
        4,
        True,
    ),
    "phi3 (fused qkv)": ("Phi3Config", "Phi3ForCausalLM", dict(COMMON, num_key_value_heads=2), 2, True),
    "mixtral (mixture of experts)": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        2,
        True,
    ),
    "qwen2_moe (shared expert beside routed experts)": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),
        2,
        True,
    ),
    "bloom (ALiBi, attention on [batch * heads, ...])": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(vocab_size=64, hidden_size=32, n_head=4, n_layer=2, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        4,
        True,
    ),
    "gpt_oss (attention sinks, sliding window, experts)": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
        ),
        2,
        True,
    ),
    "cohere (parallel)": ("CohereConfig", "CohereForCausalLM", dict(COMMON, num_key_value_heads=2), 2, False),
    "gemma2 (post-attention norm, soft-capping)": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4),
        2,
        True,
    ),
    "gemma3 (post-attention norm, q/k norm)": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
        2,
        True,
    ),
    "olmo2 (post-attention norm, q/k norm across heads)": (
        "Olmo2Config",
        "Olmo2ForCausalLM",
        dict(COMMON, num_key_value_heads=2),
        2,
        True,
    ),
    "olmoe (q/k norm across heads, experts)": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
        2,
        True,
    ),
    "bitnet (sub-norm across heads before the output projection)": (
        "BitNetConfig",
        "BitNetForCausalLM",
        dict(COMMON, num_key_value_heads=2),
        2,
        True,
    ),
    "kolibri1 (post-attention norm, experts summed under a post-MLP norm)": (
        "Kolibri1Config",
        "Kolibri1ForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),
        2,
        True,
    ),
    "afmoe (per-head output gate, post-attention norm, experts under a post-MLP norm)": (
        "AfmoeConfig",
        "AfmoeForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            num_dense_layers=1,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
        ),
        2,
        True,
    ),
    "lfm2 (hybrid: convolution layers before and after attention)": (
        "Lfm2Config",
        "Lfm2ForCausalLM",
        dict(
            COMMON, num_key_value_heads=2, num_hidden_layers=4, layer_types=["conv", "full_attention", "full_attention", "conv"]
        ),
        2,
        True,
    ),
    "jamba (hybrid: Mamba layers, traced at static shapes, attention every other layer)": (
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=2,
            num_hidden_layers=4,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
            num_experts=1,
        ),
        2,
        True,
    ),
    "falcon_h1 (hybrid: a Mamba mixer beside the attention, computed before the heads)": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=2,
            head_dim=8,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=4,
            mamba_n_groups=1,
        ),
        2,
        False,
    ),
}


def build(config_class: str, model_class: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_family_splits_exactly(name):
    config_class, model_class, config, groups, sequential = SUPPORTED[name]
    model = build(config_class, model_class, config)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    transformed = pahq_fx.transform(model, head=(1, 1), example_inputs=ids, precision="fp32", compile=False)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(transformed(ids), expected, rtol=1e-5, atol=1e-5)
    layer = transformed.head_graph.layers[0]
    assert (layer.n_heads, layer.n_kv_groups) == (4, groups)
    assert bool({names.attention(0), names.attention_output(0)} & set(layer.components[0].reads)) is sequential
    assert layer.has_output_norm is ("post-attention norm" in name)
    coupled = {Role.QUERY, Role.KEY} if "q/k norm across heads" in name else set(Role) if "sub-norm across" in name else set()
    assert layer.coupled_roles == coupled
    fp8 = pahq_fx.transform(model, head=(1, 1), example_inputs=ids, precision="fp8", compile=False)
    assert torch.isfinite(fp8(ids)).all()


@settings(max_examples=6, deadline=None)
@given(
    schedule=st.lists(st.sampled_from(["conv", "full_attention"]), min_size=2, max_size=4).filter(
        lambda s: "full_attention" in s
    ),
    heads_and_groups=st.sampled_from([(4, 2), (4, 4), (2, 1)]),
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),
    seed=st.integers(0, 2**16),
)
def test_hybrid_layer_schedules_split_exactly(schedule, heads_and_groups, batch, seq, seed):
    """LFM2 runs convolution layers before, between and after its attention layers: each convolution and each MLP
    is a whole component of its own, named after the attention layer it follows (``m-1...`` before the first),
    in the order the model runs them, and the split reproduces the logits."""
    heads, kv_heads = heads_and_groups
    model = build(
        "Lfm2Config",
        "Lfm2ForCausalLM",
        dict(
            COMMON, num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=len(schedule), layer_types=schedule
        ),
    )
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    transformed = pahq_fx.transform(model, head=(0, heads - 1), example_inputs=ids, precision="fp32", compile=False)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(transformed(ids), expected, rtol=1e-5, atol=1e-5)
    graph = transformed.head_graph
    first = schedule.index("full_attention")
    assert len(graph.leading) == 2 * first  # a convolution and an MLP per layer before the first attention layer
    attention_at = [i for i, kind in enumerate(schedule) if kind == "full_attention"]
    assert graph.n_layers == len(attention_at)
    for layer, start in zip(graph.layers, attention_at, strict=True):
        end = next((i for i in attention_at if i > start), len(schedule))
        assert [c.name for c in layer.components] == [names.mlp(layer.index, k) for k in range(1 + 2 * (end - start - 1))]
    every = [graph.leading, *(layer.components for layer in graph.layers)]
    for components in every:  # each reads everything before it: the components before it and the layer's heads
        for k, component in enumerate(components[1:], 1):
            assert components[k - 1].name in component.reads
    assert (graph.leading[-1].name if graph.leading else names.EMBED) in graph.layers[0].attention_reads
    assert names.EMBED in graph.layers[0].attention_reads


def test_hybrid_with_gated_linear_attention_discovers_the_reference_circuit():
    """Qwen3-Next (and Qwen3.5): a gated delta rule layer, written in place chunk by chunk (so the graph is
    functionalised), before a softmax attention layer whose per-head output gate is half of its query projection.
    The mixer and its MLP are components ``m-1`` and ``m-1.1``; the circuit equals the reference's."""
    from tests.acdc_reference import ReferenceACDC

    model = build(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
    )
    generator = torch.Generator().manual_seed(2)  # two prompts: the shape the model is traced at (its shapes are static)
    task = pahq_fx.Task(torch.randint(0, 64, (2, 6), generator=generator), torch.randint(0, 64, (2, 6), generator=generator))
    reference = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask)
    with torch.no_grad():
        torch.testing.assert_close(
            reference.forward(task.clean_input_ids, set(), None)[1],
            model(input_ids=task.clean_input_ids, use_cache=False).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    graph = reference.hg
    assert [c.name for c in graph.leading] == ["m-1", "m-1.1"] and graph.n_layers == 1
    assert graph.layers[0].attention_reads == (names.EMBED, "m-1", "m-1.1")
    expected, effects = reference.run(0.003)
    assert len(expected) > 1 and all(abs(e - 0.003) > 1e-6 for e in effects.values())
    circuit = pahq_fx.discover(model, task, threshold=0.003, precision="fp32", progress=False, compile=False)
    assert circuit.edge_set() == expected


def test_static_trace_rejects_other_shapes_clearly():
    model = build(
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            vocab_size=64,
            hidden_size=32,
            num_heads=4,
            num_layers=2,
            max_position_embeddings=32,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            bos_token_id=0,
            eos_token_id=0,
        ),
    )
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    transformed = pahq_fx.transform(model, example_inputs=ids, precision="fp32", compile=False)
    with torch.no_grad():
        torch.testing.assert_close(transformed(ids), model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    if not transformed.graph.meta["dynamic_dims"]:
        with pytest.raises(pahq_fx.UnsupportedArchitectureError, match="static shapes"):
            transformed(torch.randint(0, 64, (2, 9)))


@pytest.mark.parametrize(
    ("name", "threshold"),
    [
        ("opt (MLP residual on [batch*seq, d])", 0.003),
        ("gptj (eager attention, shared norm)", 0.003),
        ("falcon (multi-query, parallel)", 0.003),
        ("qwen2_moe (shared expert beside routed experts)", 0.003),
        ("bloom (ALiBi, attention on [batch * heads, ...])", 1e-4),
        ("gpt_oss (attention sinks, sliding window, experts)", 0.003),
        ("gemma2 (post-attention norm, soft-capping)", 0.003),
        ("olmo2 (post-attention norm, q/k norm across heads)", 0.003),
        ("bitnet (sub-norm across heads before the output projection)", 0.003),
        ("afmoe (per-head output gate, post-attention norm, experts under a post-MLP norm)", 0.003),
        ("lfm2 (hybrid: convolution layers before and after attention)", 0.003),
        ("jamba (hybrid: Mamba layers, traced at static shapes, attention every other layer)", 0.003),
        ("falcon_h1 (hybrid: a Mamba mixer beside the attention, computed before the heads)", 0.003),
    ],
)
def test_discovery_equals_reference_on_unusual_blocks(name, threshold):
    from tests.acdc_reference import ReferenceACDC

    config_class, model_class, config, _, _ = SUPPORTED[name]
    model = build(config_class, model_class, config)
    generator = torch.Generator().manual_seed(2)
    task = pahq_fx.Task(torch.randint(0, 64, (4, 6), generator=generator), torch.randint(0, 64, (4, 6), generator=generator))
    expected, effects = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask).run(threshold)
    assert all(abs(e - threshold) > 1e-6 for e in effects.values())
    assert len(expected) > 1, "the reference circuit is trivial: pick a threshold that keeps a few edges"
    circuit = pahq_fx.discover(model, task, threshold=threshold, precision="fp32", progress=False, compile=False)
    assert circuit.edge_set() == expected


@pytest.mark.parametrize(
    ("config_class", "model_class", "config"),
    [
        (
            "OPTConfig",
            "OPTForCausalLM",
            dict(
                vocab_size=64,
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                ffn_dim=64,
                max_position_embeddings=32,
                word_embed_proj_dim=16,
                do_layer_norm_before=False,
            ),
        ),
        ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", dict(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=32)),
    ],
)
def test_post_layer_norm_is_rejected_clearly(config_class, model_class, config):
    model = build(config_class, model_class, config)
    with pytest.raises(pahq_fx.UnsupportedArchitectureError, match=r"not carried on by an addition.*post-layer-norm"):
        pahq_fx.transform(model, precision="fp32", compile=False)


def _llama4() -> torch.nn.Module:
    return build(
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            vocab_size=64,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=64,
            intermediate_size_mlp=64,
            head_dim=8,
            max_position_embeddings=64,
            num_local_experts=4,
            num_experts_per_tok=1,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
    )


def test_a_model_that_export_cannot_keep_batch_dynamic_at_a_fixed_length_gets_a_batch_generic_trace():
    """Llama 4's chunked attention leaves a guard that export cannot simplify with a dynamic batch at a fixed length;
    the trace at a fixed batch made batch-generic (pahq_fx.passes.batch_generic) has no such guard."""
    model = _llama4()
    traced = pahq_fx.passes.trace(model, torch.randint(0, 64, (2, 6)), dynamic_shapes="batch")
    assert traced.meta["dynamic_dims"] == (0,)
    for batch in (1, 5):
        ids = torch.randint(0, 64, (batch, 6), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(traced(ids), model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_a_batch_only_trace_that_export_cannot_keep_is_traced_with_both_dimensions_dynamic():
    """Where the batch-generic trace cannot be checked (a model that runs only under export) and export's batch-only
    trace fails (Llama 4's guard), the trace falls back to a dynamic batch and sequence, not to the example's shape."""
    model = _llama4()

    def export_only(module, args, kwargs):
        if not torch.compiler.is_exporting():
            raise RuntimeError("this model runs under torch.export only")

    hook = model.register_forward_pre_hook(export_only, with_kwargs=True)
    traced = pahq_fx.passes.trace(model, torch.randint(0, 64, (2, 6)), dynamic_shapes="batch")
    hook.remove()
    assert traced.meta["dynamic_dims"] == (0, 1)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(traced(ids), model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def _specialises_batch(module, args, kwargs):
    """A forward pre-hook that branches on the batch size, changing the result (above two prompts the prompts are
    rotated): export cannot keep that dimension dynamic, and a trace at another batch made batch-generic does not
    reproduce the model at two."""
    if kwargs["input_ids"].shape[0] > 2:
        kwargs["input_ids"] = kwargs["input_ids"].roll(1, 0)
    return args, kwargs


def test_discovery_on_a_model_that_traces_with_static_shapes_only():
    """``discover`` traces such a model at the task's own shape (four prompts here, not the two it probes with)."""
    from tests.acdc_reference import ReferenceACDC

    model = build(
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=32, bos_token_id=0, eos_token_id=0),
    )
    model.register_forward_pre_hook(_specialises_batch, with_kwargs=True)
    generator = torch.Generator().manual_seed(2)
    task = pahq_fx.Task(torch.randint(0, 64, (4, 6), generator=generator), torch.randint(0, 64, (4, 6), generator=generator))
    assert not pahq_fx.passes.trace(model, task.clean_input_ids[:2], dynamic_shapes="batch").meta["dynamic_dims"]
    expected, _ = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask).run(0.003)
    assert len(expected) > 1
    circuit = pahq_fx.discover(model, task, threshold=0.003, precision="fp32", progress=False, compile=False)
    assert circuit.edge_set() == expected


def test_multi_head_latent_attention_is_rejected_clearly():
    """DeepSeek-V3's keys and values are projected from a normed low-rank projection of the stream, not from it."""
    model = build(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    )
    with pytest.raises(pahq_fx.UnsupportedArchitectureError, match=r"read 2 different inputs \(.* reads .*latent attention"):
        pahq_fx.transform(model, precision="fp32", compile=False)


@settings(max_examples=6, deadline=None)
@given(
    heads=st.sampled_from([2, 4]),
    data=st.data(),
    head_dim=st.sampled_from([4, 8]),
    window=st.integers(1, 8),
    batch=st.integers(1, 3),
    seq=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_attention_sinks_split_exactly_for_random_configurations(heads, data, head_dim, window, batch, seq, seed):
    """GPT-OSS's eager attention (sinks concatenated to the scores, their maximum subtracted before the softmax)
    is found and split exactly, whatever the head count, grouping, window and layer schedule."""
    kv_heads = data.draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    layer_types = data.draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=1, max_size=2))
    config = dict(
        COMMON,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        sliding_window=window,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    model = build("GptOssConfig", "GptOssForCausalLM", config)
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    head = (data.draw(st.integers(0, len(layer_types) - 1)), data.draw(st.integers(0, heads - 1)))
    transformed = pahq_fx.transform(model, head=head, example_inputs=ids, precision="fp32", compile=False)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(transformed(ids), expected, rtol=1e-5, atol=1e-5)
    assert (transformed.head_graph.layers[0].n_heads, transformed.head_graph.layers[0].n_kv_groups) == (heads, kv_heads)


@settings(max_examples=6, deadline=None)
@given(
    family=st.sampled_from(
        [("Gemma2Config", "Gemma2ForCausalLM"), ("Gemma3TextConfig", "Gemma3ForCausalLM"), ("Olmo2Config", "Olmo2ForCausalLM")]
    ),
    heads=st.sampled_from([1, 2, 4]),
    data=st.data(),
    head_dim=st.sampled_from([4, 8]),
    layers=st.integers(1, 3),
    window=st.integers(1, 8),
    batch=st.integers(1, 3),
    seq=st.integers(2, 10),
    seed=st.integers(0, 2**16),
)
def test_post_attention_norms_split_exactly_for_random_configurations(
    family, heads, data, head_dim, layers, window, batch, seq, seed
):
    """Gemma 2 and 3 and OLMo 2 normalise the sum of a layer's heads before the residual add: the split finds the
    norm as a component of its own (a{L}.out), reproduces the logits, and heads send to their norm alone. OLMo 2
    also normalises queries and keys across heads: those inputs feed every head of their layer."""
    kv_heads = data.draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    config = dict(
        COMMON,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        sliding_window=window,
    )
    model = build(*family, config)
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    head = (data.draw(st.integers(0, layers - 1)), data.draw(st.integers(0, heads - 1)))
    transformed = pahq_fx.transform(model, head=head, example_inputs=ids, precision="fp32", compile=False)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(transformed(ids), expected, rtol=1e-5, atol=1e-5)
    graph = pahq_fx.acdc.EdgeGraph(transformed.head_graph)
    for layer in transformed.head_graph.layers:
        assert layer.has_output_norm
        olmo = family[0] == "Olmo2Config"
        assert layer.coupled_roles == {r for r, n in ((Role.QUERY, heads), (Role.KEY, kv_heads)) if olmo and n > 1}
        for h in range(heads):
            sender = graph.sender_index[layer.head_name(h)]
            assert [r.name for r in graph.receivers if sender in r.senders] == [layer.output_norm_name]
