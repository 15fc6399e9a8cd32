"""The investigated head runs in FP32, the others really run in the low-precision format."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.ir.modules import PerHeadLinear
from pahq_fx.passes.precision import LowPrecisionPerHeadLinear, PrecisionConfig
from tests.builders import Spec, build, keep_only_head, reference_logits, specs, sqnr_db, token_ids

FORMATS = ["fp8", "fp8_e5m2", "bf16", "fp16"]
# Floors for logits SQNR on small random models (measured 27-64 dB); a broken lowering lands far below.
SQNR_FLOOR_DB = {"fp8": 18.0, "fp8_e5m2": 12.0, "bf16": 35.0, "fp16": 40.0}


@settings(max_examples=12, deadline=None)
@given(spec=specs(), data=st.data(), fmt=st.sampled_from(["fp8", "fp8_e5m2"]))
def test_only_investigated_head_is_full_precision(spec, data, fmt):
    layer = data.draw(st.integers(0, spec.layers - 1))
    head = data.draw(st.integers(0, spec.heads - 1))
    model = build(spec)
    keep_only_head(model, spec, layer, head)
    ids = token_ids(2, 7, seed=spec.seed)
    expected = reference_logits(model, ids)
    transformed = pahq_fx.transform(model, head=(layer, head), precision=fmt, compile=False)
    torch.testing.assert_close(transformed(ids), expected, rtol=1e-5, atol=1e-5)
    other = data.draw(
        st.sampled_from([(l, h) for l in range(spec.layers) for h in range(spec.heads) if (l, h) != (layer, head)] or [None])
    )
    transformed.set_head(other)
    assert sqnr_db(expected, transformed(ids)) < 80, "FP8 did not change the only head that writes: it did not run"


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_low_precision_error_is_in_expected_range(family, fmt, granularity):
    spec = Spec(family, layers=2, heads=4, kv_heads=2 if family == "llama" else 4, head_dim=8)
    model = build(spec)
    ids = token_ids(3, 9)
    transformed = pahq_fx.transform(model, head=None, precision=fmt, granularity=granularity, compile=False)
    sqnr = sqnr_db(reference_logits(model, ids), transformed(ids))
    assert math.isfinite(sqnr), "no quantization error at all: the low-precision path did not run"
    assert sqnr >= SQNR_FLOOR_DB[fmt]


@settings(max_examples=30, deadline=None)
@given(
    heads=st.integers(1, 5),
    d_in=st.integers(2, 24),
    d_out=st.integers(1, 24),
    fmt=st.sampled_from(FORMATS),
    granularity=st.sampled_from(["per_row", "per_tensor"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_selected_head_is_bit_identical_to_fp32(heads, d_in, d_out, fmt, granularity, bias, seed, data):
    torch.manual_seed(seed)
    source = PerHeadLinear(torch.randn(heads, d_out, d_in), torch.randn(heads, d_out) if bias else None)
    lowered = LowPrecisionPerHeadLinear(source, PrecisionConfig(fmt, granularity))
    x = torch.randn(2, 3, heads, d_in)
    selected = data.draw(st.integers(0, heads - 1))
    lowered.full_precision_head.fill_(selected)
    y = lowered(x)
    # The head's own tensors, freshly allocated: BLAS results may depend on memory alignment, not only values.
    b = None if source.bias is None else source.bias[selected].clone()
    head_input = x[:, :, selected].clone()
    assert torch.equal(y[:, :, selected], F.linear(head_input, source.weight[selected].clone(), b))
    others = [h for h in range(heads) if h != selected]
    if others:
        exact = source(x)[:, :, others]
        assert not torch.equal(y[:, :, others], exact), "non-selected heads were not lowered"
    assert lowered.lowered.quantized() == heads


def test_precision_report_names_the_kernel():
    transformed = pahq_fx.transform(build(Spec("gpt2", 1, 2, 2, 8)), head=(0, 1), compile=False)
    report = transformed.precision
    assert report.quantized_weights == report.total_weights == 4 * 2
    assert "_scaled_mm" in repr(transformed) and "fp8" in repr(transformed)
    assert "head=(0, 1)" in repr(transformed)


def test_fp8_rejects_one_wide_inputs():
    with pytest.raises(pahq_fx.UnsupportedFormatError, match="at least 2 input features"):
        LowPrecisionPerHeadLinear(PerHeadLinear(torch.randn(2, 3, 1), None), PrecisionConfig("fp8"))


def test_compile_auto_runs_eagerly_on_cuda_too():
    from pahq_fx.acdc.setup import resolve_compile

    compile, note = resolve_compile("auto", torch.device("cuda"))
    assert compile is False and note.startswith("eager (compile='auto'") and "H100" in note
    assert resolve_compile(True, torch.device("cuda")) == (True, "compiled (compile=True)")


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_per_head_buffers_live_on_the_weights_device(fmt):
    """The head selector and head ids index tensors on the weights' device; made on the CPU they broke every forward
    of a model on CUDA. The meta device stands in for a second device here."""
    source = PerHeadLinear(torch.randn(3, 4, 8, device="meta"), None)
    lowered = LowPrecisionPerHeadLinear(source, PrecisionConfig(fmt))
    assert source.full_precision_head.device.type == "meta"
    assert {b.device.type for b in lowered.buffers()} == {"meta"}


@settings(max_examples=25, deadline=None)
@given(
    heads=st.integers(1, 4),
    out_features=st.sampled_from([8, 16]),
    in_features=st.sampled_from([8, 32]),
    fmt=st.sampled_from(["fp8", "fp8_e5m2", "bf16", "fp16"]),
    granularity=st.sampled_from(["per_row", "per_tensor"]),
    bias=st.booleans(),
    data=st.data(),
)
def test_shared_input_equals_the_per_head_copies(heads, out_features, in_features, fmt, granularity, bias, data):
    """``shared`` (one matmul over the stacked weights where the format allows) gives ``forward`` on per-head copies:
    the same low-precision values to round-off and the selected head in FP32, exactly."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    source = PerHeadLinear(torch.randn(heads, out_features, in_features), torch.randn(heads, out_features) if bias else None)
    lowered = LowPrecisionPerHeadLinear(source, PrecisionConfig(fmt, granularity))
    selected = data.draw(st.integers(-1, heads - 1))
    lowered.full_precision_head.fill_(selected)
    x = torch.randn(2, 5, in_features) * data.draw(st.sampled_from([1e-3, 1.0, 30.0]))
    shared = lowered.shared(x)
    copies = lowered(x.unsqueeze(-2).expand(2, 5, heads, in_features))
    assert shared.shape == copies.shape == (2, 5, heads, out_features)
    assert sqnr_db(copies, shared) > 100
    if selected >= 0:
        assert torch.equal(shared[..., selected, :], source.fp32_unit(x, selected))


@settings(max_examples=30, deadline=None)
@given(
    heads=st.integers(1, 5),
    fmt=st.sampled_from(["fp32", "fp8", "bf16", "fp16"]),
    granularity=st.sampled_from(["per_row", "per_tensor"]),
    bias=st.booleans(),
    data=st.data(),
)
def test_units_of_one_shared_input_equal_the_units_of_its_copies(heads, fmt, granularity, bias, data):
    """``units(..., shared_input=True)`` (one input every listed head reads, one matmul over their stacked weights
    where the format allows) gives what ``units`` gives on per-head copies of that input: FP32 to round-off,
    low-precision heads to
    their own round-off, the FP32 unit exactly."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    source = PerHeadLinear(torch.randn(heads, 16, 32), torch.randn(heads, 16) if bias else None)
    projection = source if fmt == "fp32" else LowPrecisionPerHeadLinear(source, PrecisionConfig(fmt, granularity))
    units = sorted(data.draw(st.sets(st.integers(0, heads - 1), min_size=1)))
    fp32_unit = data.draw(st.sampled_from([-1, *units]))
    x = torch.randn(2, 5, 32)
    shared = projection.units(x, units, fp32_unit, shared_input=True)
    copies = projection.units(x.unsqueeze(-2).expand(2, 5, len(units), 32).contiguous(), units, fp32_unit)
    assert shared.shape == copies.shape == (2, 5, len(units), 16)
    assert sqnr_db(copies, shared) > 100
    if fp32_unit >= 0:
        assert torch.equal(shared[..., units.index(fp32_unit), :], source.fp32_unit(x, fp32_unit))
