"""Transform a tiny Llama-style model (rotary, grouped-query attention): head (1, 2) in FP32, the rest in FP8."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pahq_fx

torch.manual_seed(0)
config = LlamaConfig(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=128,
    vocab_size=100,
    max_position_embeddings=32,
)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 100, (2, 10))

pahq = pahq_fx.transform(model, head=(1, 2), precision="fp8", compile=False)
print(pahq)

with torch.no_grad():
    reference = model(ids).logits
    logits = pahq(ids)
    pahq.set_head((0, 1))  # switch the investigated head: no retrace, no recompile
    logits_other = pahq(ids)
sqnr = 10 * torch.log10(reference.pow(2).mean() / (reference - logits).pow(2).mean())
print(f"logits {tuple(logits.shape)}, SQNR vs FP32 model: {sqnr:.1f} dB")
print(f"switching the FP32 head moved the logits by {(logits - logits_other).abs().max():.2e}")
