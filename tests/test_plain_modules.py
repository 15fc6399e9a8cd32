"""Models that are not Hugging Face classes: a nanoGPT-style module (its input called ``idx``, no config, attention
through SDPA or written out with a mask) goes through the same passes and the same ACDC as the families."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pahq_fx
from tests.acdc_reference import ReferenceACDC

VOCAB, CONTEXT = 64, 32


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.size()
        q, k, v = (
            t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2) for t in self.c_attn(x).split(width, dim=2)
        )
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, width))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, sdpa)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's shape: returns ``(logits, loss)``, with no loss without targets."""

    def __init__(self, layers: int, heads: int, d_head: int, sdpa: bool) -> None:
        super().__init__()
        d_model = heads * d_head
        self.wte, self.wpe = nn.Embedding(VOCAB, d_model), nn.Embedding(CONTEXT, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, sdpa) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d_model), nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)), None


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "written-out"])
def test_transform_keeps_batch_and_length_dynamic_whatever_the_input_is_called(sdpa):
    torch.manual_seed(0)
    model = NanoGPT(2, 4, 8, sdpa).eval()
    pahq = pahq_fx.transform(model, head=(1, 2), precision="fp32", compile=False, example_inputs=torch.randint(0, VOCAB, (2, 10)))
    assert pahq.graph.meta["dynamic_dims"] == (0, 1)
    for shape in [(1, 3), (5, 17)]:
        ids = torch.randint(0, VOCAB, shape)
        with torch.no_grad():
            torch.testing.assert_close(pahq(ids), model(ids)[0])


@settings(max_examples=4, deadline=None)
@given(
    layers=st.integers(1, 2),
    heads=st.sampled_from([2, 4]),
    sdpa=st.booleans(),
    log_threshold=st.floats(-5, -2),
    seed=st.integers(0, 100),
)
def test_fp32_discovery_equals_the_reference(layers, heads, sdpa, log_threshold, seed):
    torch.manual_seed(seed)
    model = NanoGPT(layers, heads, 8, sdpa).eval()
    clean, corrupted = torch.randint(0, VOCAB, (6, 10)), torch.randint(0, VOCAB, (6, 10))
    mask = torch.zeros_like(clean, dtype=torch.bool)
    mask[:, -3:] = True
    threshold = 10**log_threshold
    circuit = pahq_fx.discover(
        model, pahq_fx.Task(clean, corrupted, mask), threshold=threshold, precision="fp32", progress=False, allow_weak_task=True
    )
    edges, _ = ReferenceACDC(model, clean, corrupted, mask).run(threshold)
    assert {(e.sender, e.receiver) for e in circuit.edges} == set(edges)
