"""Every documented error is raised, with a message that names the problem."""

import pytest
import torch
from torch import nn

import pahq_fx
from tests.builders import Spec, build


@pytest.fixture(scope="module")
def transformed():
    return pahq_fx.transform(build(Spec("llama", 2, 4, 2, 8)), precision="fp32", compile=False)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ((2, 0), "layer 2 out of range: the model has 2 attention layers"),
        ((-1, 0), "layer -1 out of range"),
        ((0, 4), "head 4 out of range: layer 0 has 4 heads"),
        ((0,), "pair of ints"),
        ((0, 1.0), "pair of ints"),
        ("a0.h1", "pair of ints"),
    ],
)
def test_bad_head_is_rejected(transformed, head, message):
    with pytest.raises(pahq_fx.InvalidHeadError, match=message):
        transformed.set_head(head)
    assert isinstance(pahq_fx.InvalidHeadError("x"), IndexError)


def test_bad_head_rejected_by_transform():
    with pytest.raises(pahq_fx.InvalidHeadError, match="head 9 out of range"):
        pahq_fx.transform(build(Spec("gpt2", 1, 2, 2, 8)), head=(0, 9), compile=False)


def test_failed_set_head_keeps_previous_head(transformed):
    transformed.set_head((1, 1))
    with pytest.raises(pahq_fx.InvalidHeadError):
        transformed.set_head((5, 5))
    assert transformed.head == (1, 1)


@pytest.mark.parametrize("fmt", ["int4", "fp4", ""])
def test_unknown_format(fmt):
    with pytest.raises(pahq_fx.UnsupportedFormatError, match="unknown low-precision format"):
        pahq_fx.PrecisionConfig(fmt)


def test_unknown_granularity():
    with pytest.raises(pahq_fx.UnsupportedFormatError, match="unknown granularity"):
        pahq_fx.PrecisionConfig("fp8", "per_block")


def test_fp8_on_unsupported_device():
    with pytest.raises(pahq_fx.UnsupportedFormatError, match="FP8 is not available on device type 'mps'"):
        pahq_fx.Format.FP8_E4M3.kernel_for(torch.device("mps"), 16, 16)


class NoAttentionLM(nn.Module):
    """A language model without attention: embedding, MLP, unembedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.unembed = nn.Linear(16, 20)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        return self.unembed(x + self.mlp(x))


def test_model_without_attention_is_rejected():
    with pytest.raises(
        pahq_fx.UnsupportedArchitectureError,
        match=r"no attention call found.*scaled_dot_product_attention.*matmul -> softmax -> matmul",
    ):
        pahq_fx.transform(NoAttentionLM(), example_inputs=torch.randint(0, 20, (2, 5)), compile=False)


class FusedAttentionLM(NoAttentionLM):
    """Attention whose query, key and value come straight from the embedding: no projection to split."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids).unsqueeze(1)
        y = nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True).squeeze(1)
        return self.unembed(y)


def test_attention_without_projection_is_rejected():
    with pytest.raises(pahq_fx.UnsupportedArchitectureError, match="no linear query/key/value projection"):
        pahq_fx.transform(FusedAttentionLM(), example_inputs=torch.randint(0, 20, (2, 5)), compile=False)


def test_every_error_is_a_pahq_error():
    for cls in (
        pahq_fx.InvalidHeadError,
        pahq_fx.UnsupportedArchitectureError,
        pahq_fx.UnsupportedFormatError,
        pahq_fx.QuantizationError,
        pahq_fx.TaskError,
        pahq_fx.InvalidInputsError,
        pahq_fx.CheckpointError,
    ):
        assert issubclass(cls, pahq_fx.PahqError)


def test_quantization_that_did_not_happen_is_an_error(monkeypatch):
    """As when torchao skips a weight (dims not multiples of 16, a module type it does not match): loud, not silent."""
    from pahq_fx.passes import precision

    monkeypatch.setattr(precision, "_float8_weight", lambda weight, fmt, granularity, kernel: weight.clone())
    with pytest.raises(pahq_fx.QuantizationError, match="quantized 0 of 8 per-head weights"):
        pahq_fx.transform(build(Spec("gpt2", 1, 2, 2, 8)), precision="fp8", compile=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_refused_with_the_remedy(dtype):
    model = build(Spec("llama", 2, 4, 2, 8)).to(dtype)
    name = str(dtype).removeprefix("torch.")
    message = f"the model's weights are {name}: .*dtype=torch.float32 or call model.float"
    with pytest.raises(pahq_fx.UnsupportedFormatError, match=message):
        pahq_fx.transform(model, compile=False)
    ids = torch.randint(0, model.config.vocab_size, (4, 6))
    task = pahq_fx.Task(ids, ids.flip(0), torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(pahq_fx.UnsupportedFormatError, match=message):
        pahq_fx.discover(model, task, threshold=0.1, progress=False, allow_weak_task=True)
    traced = pahq_fx.passes.trace(model, ids[:2])
    with pytest.raises(pahq_fx.UnsupportedFormatError, match=message):
        pahq_fx.passes.split_heads(traced)
    compiled = torch.compile(model, backend=pahq_fx.backend(head=(0, 1), inner="eager"))
    with pytest.raises(pahq_fx.UnsupportedFormatError, match=message):  # weights reach it as the graph's constants
        compiled(ids)
    assert pahq_fx.transform(model.float(), compile=False, precision="fp32")(ids).dtype == torch.float32


def test_a_float32_model_with_a_half_precision_buffer_is_not_refused():
    """Buffers are not weights: RecurrentGemma keeps its embedding scale in bf16 on purpose, in a float32 model."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(
        num_hidden_layers=2,
        vocab_size=64,
        hidden_size=32,
        lru_width=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        attention_window_size=16,
        block_types=["recurrent", "attention"],
    )
    model = RecurrentGemmaForCausalLM(config).eval()
    assert model.model.normalizer.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 6))
    pahq = pahq_fx.transform(model, head=(0, 0), precision="fp32", compile=False, example_inputs=ids)
    with torch.no_grad():
        torch.testing.assert_close(pahq(ids), model(input_ids=ids, use_cache=False).logits)
