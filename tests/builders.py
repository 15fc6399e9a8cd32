"""Small real Hugging Face models for the tests, and hypothesis strategies over their configurations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

FAMILIES = ("gpt2", "neox", "llama")
# Gemma 2: post-attention norms, so heads send to a{L}.out; OLMo 2 also norms queries and keys across heads.
RUNTIME_FAMILIES = (*FAMILIES, "opt", "gemma2", "olmo2")
VOCAB = 40
MAX_POS = 16


@dataclass(frozen=True)
class Spec:
    family: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    parallel: bool = True
    seed: int = 0

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim


def build(spec: Spec) -> torch.nn.Module:
    """A randomly initialised model of the spec, in eval mode. Weights are scaled up so heads matter."""
    torch.manual_seed(spec.seed)
    d = spec.d_model
    if spec.family == "gpt2":
        config = GPT2Config(
            n_layer=spec.layers,
            n_head=spec.heads,
            n_embd=d,
            vocab_size=VOCAB,
            n_positions=MAX_POS,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    elif spec.family == "neox":
        config = GPTNeoXConfig(
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            hidden_size=d,
            intermediate_size=2 * d,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POS,
            rotary_pct=0.5,
            use_parallel_residual=spec.parallel,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPTNeoXForCausalLM(config)
    elif spec.family == "llama":
        config = LlamaConfig(
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            hidden_size=d,
            intermediate_size=2 * d,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POS,
            head_dim=spec.head_dim,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = LlamaForCausalLM(config)
    elif spec.family == "opt":
        config = OPTConfig(
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            hidden_size=d,
            ffn_dim=2 * d,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POS,
            word_embed_proj_dim=d,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = OPTForCausalLM(config)
    elif spec.family == "gemma2":
        config = Gemma2Config(
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            hidden_size=d,
            intermediate_size=2 * d,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POS,
            head_dim=spec.head_dim,
            sliding_window=4,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = Gemma2ForCausalLM(config)
    elif spec.family == "olmo2":
        config = Olmo2Config(
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            hidden_size=d,
            intermediate_size=2 * d,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POS,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = Olmo2ForCausalLM(config)
    else:
        raise ValueError(spec.family)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval()


@st.composite
def specs(draw, families: tuple[str, ...] = FAMILIES) -> Spec:
    family = draw(st.sampled_from(families))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = heads
    if family in ("llama", "gemma2", "olmo2"):
        kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    return Spec(
        family=family,
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8])),
        parallel=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def token_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def output_projection(model: torch.nn.Module, layer: int) -> tuple[torch.Tensor, bool]:
    """The output-projection weight of a layer and whether its input features are the rows (GPT-2 Conv1D)."""
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer.h[layer].attn.c_proj.weight, True
    if isinstance(model, GPTNeoXForCausalLM):
        return model.gpt_neox.layers[layer].attention.dense.weight, False
    return model.model.layers[layer].self_attn.o_proj.weight, False


def keep_only_head(model: torch.nn.Module, spec: Spec, layer: int, head: int) -> None:
    """Zero every head's output weights except (layer, head): only that head writes to the residual stream."""
    with torch.no_grad():
        for l in range(spec.layers):
            weight, rows_are_inputs = output_projection(model, l)
            for h in range(spec.heads):
                if (l, h) == (layer, head):
                    continue
                block = slice(h * spec.head_dim, (h + 1) * spec.head_dim)
                if rows_are_inputs:
                    weight[block, :] = 0
                else:
                    weight[:, block] = 0


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    noise = (reference - other).double().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(reference.double().pow(2).mean() / noise))
