"""precision="auto": the format is chosen by measuring queries in each candidate format, and the note says so."""

import pytest
import torch

import pahq_fx
from pahq_fx.acdc import calibration
from pahq_fx.acdc.calibration import MARGIN, Calibration, choose, formats_to_try, probe_receiver, seconds_per_query
from pahq_fx.acdc.search import prepare
from pahq_fx.passes.precision import Format
from tests.builders import Spec, build, token_ids


def test_a_low_precision_format_is_chosen_only_where_it_is_clearly_faster():
    assert choose({Format.FP32: 1.0, Format.BF16: 1.0 / MARGIN}) is Format.BF16
    assert choose({Format.FP32: 1.0, Format.BF16: 0.95}) is Format.FP32
    assert choose({Format.FP32: 1.0, Format.BF16: 2.0}) is Format.FP32
    assert choose({Format.FP32: 1.0, Format.BF16: 0.5, Format.FP8_E4M3: 0.4}) is Format.FP8_E4M3


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), 3), ((8, 9), 3), ((8, 0), 2)])
def test_fp8_is_tried_only_on_gpus_with_fp8_tensor_cores(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert len(formats_to_try(torch.device("cuda"))) == expected
    assert formats_to_try(torch.device("cpu")) == (Format.FP32, Format.BF16)


def test_the_probe_leaves_the_runtime_as_set_up():
    model = build(Spec("llama", 3, 4, 2, 4, seed=2))
    task = pahq_fx.Task(token_ids(3, 6, seed=1), token_ids(3, 6, seed=2))
    session = prepare(model, task, precision="fp32", compile=False, allow_weak_task=True)
    runtime = session.runtime
    receiver = probe_receiver(session.edges)
    assert receiver.is_attention_input and receiver.layer == 1  # the middle of three layers
    before = [o.clone() for o in runtime.outputs]
    assert seconds_per_query(runtime, receiver) > 0
    assert runtime.queries == 0 and not runtime.removed and runtime.active_from == len(runtime.steps)
    assert all(torch.equal(a, b) for a, b in zip(before, runtime.outputs, strict=True))


@pytest.mark.parametrize("faster", [Format.FP32, Format.BF16])
def test_auto_runs_the_measured_fastest_format_and_reports_the_measurement(monkeypatch, faster):
    """With the clock replaced by a fake that makes one format faster, auto picks it, searches in it, and says why."""
    times = {Format.FP32: 1.0, Format.BF16: 1.0}
    times[faster] = 0.5 if faster is not Format.FP32 else 1.0

    def fake_seconds(runtime, receiver):
        return times[Format.BF16 if runtime.low_precision else Format.FP32]

    monkeypatch.setattr("pahq_fx.acdc.search.seconds_per_query", fake_seconds)
    monkeypatch.setattr("pahq_fx.acdc.search.worth_measuring", lambda *a: True)  # measure even this tiny model
    model = build(Spec("gpt2", 2, 2, 2, 8, seed=4))
    task = pahq_fx.Task(token_ids(3, 6, seed=3), token_ids(3, 6, seed=4))
    circuit = pahq_fx.discover(model, task, threshold=0.01, progress=False, allow_weak_task=True)
    assert circuit.precision == faster.value
    assert f"{faster.value} chosen" in circuit.precision_note
    assert f"bf16 {times[Format.BF16] * 1e3:.3g} ms" in circuit.precision_note
    same = pahq_fx.discover(model, task, threshold=0.01, progress=False, allow_weak_task=True, precision=faster.value)
    assert same.edge_set() == circuit.edge_set()


def test_a_low_precision_winner_searches_on_its_probed_runtime(monkeypatch):
    """On a CPU bf16 is the only other format: its runtime, built and reset by the probe, is the search's (the
    runtime is not built a third time), and the search on it equals one on a fresh bf16 runtime."""
    from pahq_fx.acdc import search as search_module

    built = []
    build_runtime = search_module.build_runtime
    monkeypatch.setattr(search_module, "build_runtime", lambda *a: built.append(a[3]) or build_runtime(*a))
    monkeypatch.setattr(search_module, "seconds_per_query", lambda runtime, receiver: 0.5 if runtime.low_precision else 1.0)
    monkeypatch.setattr(search_module, "worth_measuring", lambda *a: True)
    model = build(Spec("gpt2", 2, 2, 2, 8, seed=6))
    task = pahq_fx.Task(token_ids(3, 6, seed=5), token_ids(3, 6, seed=6))
    circuit = pahq_fx.discover(model, task, threshold=0.002, progress=False, allow_weak_task=True)
    assert circuit.precision == "bf16" and built == [Format.FP32, Format.BF16]
    fresh = pahq_fx.discover(model, task, threshold=0.002, progress=False, allow_weak_task=True, precision="bf16")
    assert [(e.sender, e.receiver, e.effect) for e in circuit.edges] == [(e.sender, e.receiver, e.effect) for e in fresh.edges]


def test_the_note_names_the_receiver_the_times_and_the_rule():
    note = Calibration("a1.h0.q", {Format.FP32: 0.02, Format.BF16: 0.01}, Format.BF16).note()
    assert "a1.h0.q" in note and "fp32 20 ms" in note and "bf16 10 ms" in note and "2.00x faster" in note
    assert f"{MARGIN}x" in note and calibration.CANDIDATES > 1


def test_a_search_too_short_to_repay_measuring_runs_fp32_without_measuring(monkeypatch):
    measured = []
    monkeypatch.setattr("pahq_fx.acdc.search.seconds_per_query", lambda *a: measured.append(a) or 1.0)
    model = build(Spec("neox", 1, 2, 2, 4, seed=5))
    task = pahq_fx.Task(token_ids(2, 5, seed=1), token_ids(2, 5, seed=2))
    circuit = pahq_fx.discover(model, task, threshold=0.01, progress=False, allow_weak_task=True)
    assert not measured and circuit.precision == "fp32"
    assert "without measuring" in circuit.precision_note and "estimated at" in circuit.precision_note
    assert calibration.worth_measuring(1.0, 10.0) and not calibration.worth_measuring(1.0, 9.0)
    assert calibration.estimated_search_seconds(1000, 0.5) == pytest.approx(1000 * calibration.FORWARDS_PER_EDGE * 0.5)
