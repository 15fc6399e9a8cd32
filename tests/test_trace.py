"""Tracing keeps the model as it was and yields logits for any batch and sequence length."""

import importlib
import io
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pahq_fx.errors import InvalidInputsError, UnsupportedArchitectureError
from pahq_fx.front_door import PahqModel
from pahq_fx.passes import split_heads, trace, trace_cache
from pahq_fx.passes.pipeline import lower_split
from pahq_fx.passes.precision import PrecisionConfig
from tests.builders import RUNTIME_FAMILIES, Spec, build, reference_logits, specs, token_ids

trace_module = importlib.import_module("pahq_fx.passes.trace")  # the name pahq_fx.passes.trace is the function


@settings(max_examples=8, deadline=None)
@given(spec=specs(), train_mode=st.booleans(), dynamic=st.sampled_from([True, "batch"]))
def test_trace_does_not_mutate_model(spec, train_mode, dynamic):
    """Export's dynamic trace, and the batch-only trace (make_fx at a fixed batch, made batch-generic)."""
    model = build(spec).train(train_mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    gm = trace(model, token_ids(2, 5), dynamic_shapes=dynamic)
    assert model.training == train_mode
    assert model.config._attn_implementation == impl
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    ids = token_ids(3, 8 if dynamic is True else 5, seed=7)
    torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert gm.meta["dynamic_dims"] == ((0, 1) if dynamic is True else (0,))


class _CachedScale(torch.nn.Module):
    """Builds a tensor attribute on its first call, as lazily cached rotary tables do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.out = torch.nn.Linear(16, 50)
        self.scale: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = torch.linspace(0.5, 2.0, 16)
        return self.out(self.embed(input_ids) * self.scale)


def test_a_fixed_shape_trace_leaves_no_fake_tensor_in_the_model(monkeypatch):
    """make_fx runs the forward on fake tensors: an attribute the forward assigns is put back as it was, or the
    model would keep a fake tensor that breaks (or silently feeds) every later eager call."""
    monkeypatch.setenv(trace_cache.ENV, "off")
    module = _CachedScale().eval()
    gm = trace_module._fixed_shape_graph(module, token_ids(3, 5) % 50)
    assert module.scale is None
    gm = trace(module, token_ids(2, 5) % 50, dynamic_shapes="batch")
    assert gm.meta["dynamic_dims"] == (0,)
    assert type(module.scale) is torch.Tensor
    ids = token_ids(4, 5, seed=3) % 50
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), module(ids))


@settings(max_examples=6, deadline=None)
@given(spec=specs(families=RUNTIME_FAMILIES), batch=st.integers(1, 5), seq=st.integers(2, 8))
def test_a_batch_only_trace_runs_any_batch_at_the_example_length_and_refuses_other_lengths(spec, batch, seq):
    """ACDC's trace (``dynamic_shapes="batch"``): its graph and the transformed model on it take any batch at the
    example's sequence length, and the transformed model names the fixed length for any other."""
    model = build(spec).eval()
    gm = trace(model, token_ids(2, seq), dynamic_shapes="batch")
    assert gm.meta["dynamic_dims"] == (0,)
    ids = token_ids(batch, seq, seed=7)
    torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)
    transformed = PahqModel(lower_split(gm, PrecisionConfig("fp32")), None, compiled=False, inner="inductor")
    torch.testing.assert_close(transformed(ids), reference_logits(model, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(UnsupportedArchitectureError, match=f"fixed sequence length at \\(2, {seq}\\)"):
        transformed(token_ids(batch, seq + 1))


def test_dynamic_shapes_takes_only_its_three_values():
    with pytest.raises(InvalidInputsError, match="dynamic_shapes must be True, False or 'batch'"):
        trace(build(Spec("gpt2", 1, 2, 2, 8)), token_ids(2, 5), dynamic_shapes="seq")


def _fresh_trace_forbidden(*args, **kwargs):
    raise AssertionError("traced afresh: the cache should have answered")


@settings(max_examples=8, deadline=None)
@given(spec=specs(families=RUNTIME_FAMILIES), dynamic=st.sampled_from([True, "batch", False]))
def test_a_model_traced_before_is_loaded_from_the_cache_and_splits_the_same(spec, dynamic, tmp_path_factory):
    """The second trace of a model (another instance, another example of the same shape) comes from the cache
    without exporting, binds the second model's own weights, and splits into the same per-head model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(trace_cache.ENV, str(tmp_path_factory.mktemp("cache")))
        first = trace(build(spec), token_ids(2, 5), dynamic_shapes=dynamic)
        other_weights = build(Spec(**{**spec.__dict__, "seed": spec.seed + 1}))
        patch.setattr(trace_module, "_trace_afresh", _fresh_trace_forbidden)
        second = trace(other_weights, token_ids(2, 5, seed=3), dynamic_shapes=dynamic)
    assert second.meta["dynamic_dims"] == first.meta["dynamic_dims"]
    ids = token_ids(3 if 0 in second.meta["dynamic_dims"] else 2, 8 if 1 in second.meta["dynamic_dims"] else 5, seed=7)
    expected = reference_logits(other_weights, ids)
    torch.testing.assert_close(second(ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_heads(second)(ids), expected, rtol=1e-4, atol=1e-4)


def test_a_cache_entry_that_does_not_reproduce_the_model_is_traced_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv(trace_cache.ENV, str(tmp_path))
    model = build(Spec("llama", 2, 4, 2, 8))
    trace(model, token_ids(2, 5))
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"not a pickle")
    calls = []
    original = trace_module._trace_afresh
    monkeypatch.setattr(trace_module, "_trace_afresh", lambda *a: calls.append(1) or original(*a))
    with pytest.warns(UserWarning, match="ignored the trace cache entry"):
        gm = trace(model, token_ids(2, 5))
    assert calls == [1] and entry.stat().st_size > 100  # traced again and the entry written anew
    torch.testing.assert_close(gm(token_ids(3, 8)), reference_logits(model, token_ids(3, 8)), rtol=1e-5, atol=1e-5)


def test_the_cache_key_follows_what_the_graph_depends_on(tmp_path, monkeypatch):
    monkeypatch.setenv(trace_cache.ENV, str(tmp_path))
    model, ids = build(Spec("gpt2", 2, 2, 2, 4)), token_ids(2, 5)
    key = trace_cache.key(model, ids, True)
    assert key == trace_cache.key(build(Spec("gpt2", 2, 2, 2, 4, seed=9)), token_ids(2, 5, seed=4), True)
    assert key != trace_cache.key(model, token_ids(2, 6), True)  # the example's shape
    assert key != trace_cache.key(model, ids, False)  # the trace mode
    assert key != trace_cache.key(build(Spec("gpt2", 3, 2, 2, 4)), ids, True)  # the config
    handle = model.transformer.h[0].register_forward_hook(lambda *a: None)
    assert trace_cache.key(model, ids, True) is None  # a hook the key cannot see: not cached
    handle.remove()
    monkeypatch.setenv(trace_cache.ENV, "off")
    assert trace_cache.key(model, ids, True) is None
    trace(model, ids)
    assert not list(tmp_path.iterdir())


def test_checkpoints_of_one_architecture_in_folders_of_their_own_share_an_entry(tmp_path, monkeypatch):
    """A training run's checkpoints differ in weights and in the folder they load from, neither of which the graph
    depends on: the second checkpoint is loaded from the cache and computes with its own weights."""
    monkeypatch.setenv(trace_cache.ENV, str(tmp_path / "cache"))
    checkpoints = []
    for step in (0, 1):
        folder = tmp_path / f"step-{step}"
        build(Spec("llama", 2, 4, 2, 8, seed=step)).save_pretrained(folder)
        checkpoints.append(type(build(Spec("llama", 1, 2, 2, 4))).from_pretrained(folder).eval())
    assert checkpoints[0].config._name_or_path != checkpoints[1].config._name_or_path
    trace(checkpoints[0], token_ids(2, 5))
    monkeypatch.setattr(trace_module, "_trace_afresh", _fresh_trace_forbidden)
    second = trace(checkpoints[1], token_ids(2, 5))
    ids = token_ids(3, 8, seed=2)
    torch.testing.assert_close(second(ids), reference_logits(checkpoints[1], ids), rtol=1e-5, atol=1e-5)


def test_a_model_class_without_a_readable_source_file_is_still_traced_and_cached(tmp_path, monkeypatch):
    """A class defined in a notebook has no source file to hash: its key names it instead, and tracing goes on."""
    monkeypatch.setenv(trace_cache.ENV, str(tmp_path))
    model = build(Spec("gpt2", 1, 2, 2, 4))
    original = trace_cache.inspect.getsourcefile
    monkeypatch.setattr(
        trace_cache.inspect, "getsourcefile", lambda obj: "<ipython-input-1>" if obj is type(model) else original(obj)
    )
    gm = trace(model, token_ids(2, 5))
    assert len(list(tmp_path.glob("*.pt"))) == 1
    torch.testing.assert_close(gm(token_ids(3, 8)), reference_logits(model, token_ids(3, 8)), rtol=1e-5, atol=1e-5)


class _Sentinel:
    """A pickle that, once loaded, creates a file: what a planted cache entry could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize("signed_as", ["raw pickle", "forged header"])
def test_a_planted_cache_entry_never_runs_and_is_reported(tmp_path, monkeypatch, signed_as):
    cache = tmp_path / "cache"
    monkeypatch.setenv(trace_cache.ENV, str(cache))
    model, ids = build(Spec("gpt2", 1, 2, 2, 4)), token_ids(2, 5)
    trace(model, ids)
    (entry,) = cache.glob("*.pt")
    sentinel = tmp_path / "sentinel"
    planted = io.BytesIO()
    torch.save({"graph": _Sentinel(sentinel)}, planted)
    header = trace_cache._MAGIC + b"\0" * trace_cache._MAC_BYTES if signed_as == "forged header" else b""
    entry.write_bytes(header + planted.getvalue())
    calls = []
    original = trace_module._trace_afresh
    monkeypatch.setattr(trace_module, "_trace_afresh", lambda *a: calls.append(1) or original(*a))
    with pytest.warns(UserWarning, match=r"ignored the trace cache entry .* not written by your pahq_fx"):
        gm = trace(model, ids)
    assert not sentinel.exists() and calls == [1]
    assert entry.with_name(entry.name + ".rejected").read_bytes().endswith(planted.getvalue())  # kept as evidence
    torch.testing.assert_close(gm(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert trace_cache.load(model, ids, entry.stem) is not None  # the entry written afresh verifies
    assert (cache.stat().st_mode & 0o777) == 0o700 and (entry.stat().st_mode & 0o777) == 0o600
    entry.write_bytes(header + b"planted again")
    with pytest.warns(UserWarning, match=r"ignored the trace cache entry"):
        trace(model, ids)
    assert entry.with_name(entry.name + ".rejected").read_bytes().endswith(planted.getvalue())  # the first kept
    assert entry.with_name(entry.name + ".rejected.1").read_bytes() == header + b"planted again"


def test_a_cache_folder_others_can_write_is_not_used(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(trace_cache.ENV, str(shared))
    model, ids = build(Spec("gpt2", 1, 2, 2, 4)), token_ids(2, 5)
    with pytest.warns(UserWarning, match="is writable by other users, so the cache is not used"):
        trace(model, ids)
    assert not list(shared.iterdir())
