"""Formats, metrics and tasks are registries: each entry is found by its names, survives pickling as itself, and a
new one registered from outside the package works wherever the built-in ones do."""

import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pahq_fx
from pahq_fx.formats import FORMATS, Cast, Format, parse_format, register_format
from pahq_fx.metrics import METRICS, CleanDistribution, Metric, metric_named, metric_value, register_metric
from pahq_fx.tasks import GENERATORS, build_tokenizer, make_task
from pahq_fx.tasks.generators import register_task
from tests.builders import Spec, build, token_ids


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_format_is_one_object_under_every_name_and_after_pickling(name):
    fmt = FORMATS[name]
    assert all(parse_format(key) is fmt for key in (name, name.upper(), *fmt.aliases))
    assert pickle.loads(pickle.dumps(fmt)) is fmt
    assert isinstance(fmt.dtype, torch.dtype)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_a_metric_is_one_object_after_pickling(name):
    assert pickle.loads(pickle.dumps(METRICS[name])) is METRICS[name] is metric_named(name.upper())


def test_taken_names_are_refused():
    with pytest.raises(ValueError, match="'e4m3' is taken"):
        register_format(Cast("fp8_again", "float16", ("e4m3",)))
    with pytest.raises(ValueError, match="'kl' is taken"):
        register_metric("kl", help="again")(lambda *args: None)
    with pytest.raises(pahq_fx.UnsupportedFormatError, match="choose one of fp32, fp8"):
        parse_format("int3")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), boost=st.floats(0.1, 5.0))
def test_every_metric_is_smaller_when_the_patched_run_is_more_like_the_clean_one(seed, boost):
    """The sign convention: KL is zero on the clean logits, and raising the correct answer's logit lowers an
    answer metric (larger is better before the registry negates it)."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(3, 11, generator=generator)
    reference = CleanDistribution.of(clean)
    correct, incorrect = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    assert metric_value(Metric.KL, clean, reference, None, None).abs() < 1e-6
    better = clean.clone()
    better[torch.arange(3), correct] += boost
    for metric in METRICS.values():
        if metric.needs_answers:
            before = metric_value(metric, clean, reference, correct, incorrect)
            assert metric_value(metric, better, reference, correct, incorrect) < before, metric


def test_formats_metrics_and_tasks_registered_from_outside_run_like_the_built_in_ones():
    """A user's format (bf16 under another name), metric and task, each one registration, through discover."""
    fp16_again = register_format(Cast("half_again", "float16"))
    top_logit = register_metric("correct_logit", help="the correct answer's logit", larger_is_better=True, needs_answers=True)(
        lambda logits, clean, correct, incorrect: logits.gather(-1, correct.view(-1, 1).expand(*logits.shape[:-1], 1)).mean(
            (-2, -1)
        )
    )

    @register_task(help="ioi with the names of one seed")
    def fixed_ioi(tokenizer, n=32, seed=0, names_seed=1):
        return GENERATORS["ioi"](tokenizer, n=n, seed=names_seed)

    try:
        tokenizer = build_tokenizer()
        task = make_task("fixed_ioi", tokenizer, n=3, seed=5)
        assert GENERATORS["fixed_ioi"].options == {"names_seed": 1}
        assert task.fingerprint() == make_task("ioi", tokenizer, n=3, seed=1).fingerprint()
        model = build(Spec("llama", 1, 2, 2, 8))
        ids = token_ids(2, 6)
        half = pahq_fx.transform(model, precision="half_again", compile=False)
        assert half.precision.config.low_precision is fp16_again
        torch.testing.assert_close(half(ids), pahq_fx.transform(model, precision="fp16", compile=False)(ids), rtol=0, atol=0)
        assert top_logit.value == "correct_logit" and metric_named("correct_logit") is top_logit
    finally:
        del FORMATS["half_again"], METRICS["correct_logit"], GENERATORS["fixed_ioi"]


def test_low_precision_is_a_deprecated_name_of_precision():
    model = build(Spec("gpt2", 1, 2, 2, 8))
    ids = token_ids(2, 5)
    with pytest.warns(DeprecationWarning, match=r"transform\(low_precision=\.\.\.\) is deprecated.*use precision="):
        old = pahq_fx.transform(model, low_precision="bf16", compile=False)
    assert old.precision.config.low_precision is Format.BF16
    torch.testing.assert_close(old(ids), pahq_fx.transform(model, precision="bf16", compile=False)(ids), rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match=r"backend\(low_precision="):
        pahq_fx.backend(low_precision="fp32")
    with warnings.catch_warnings(), pytest.raises(TypeError, match="both low_precision= and precision="):
        warnings.simplefilter("ignore")
        pahq_fx.transform(model, low_precision="bf16", precision="fp32", compile=False)
