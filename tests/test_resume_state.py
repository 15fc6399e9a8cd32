"""A resume loads the runtime's saved state and replays only the decisions after it: the resumed runtime is the
uninterrupted run's bit for bit, object identities included; a state file that does not belong is never used."""

import copy
import json

import pytest
import torch

import pahq_fx
from pahq_fx.acdc import checkpoint as checkpoint_module
from pahq_fx.acdc import search as search_module
from pahq_fx.acdc import state_io
from tests.builders import Spec, build, token_ids

THRESHOLD = 0.005


class Stop(Exception):
    pass


def _task() -> pahq_fx.Task:
    return pahq_fx.Task(token_ids(4, 6, seed=7), token_ids(4, 6, seed=1007))


def _describe(runtime) -> dict:
    """Everything :meth:`PatchingRuntime.reset` lists, as bytes, with which slots share one tensor object and which
    are their clean cache or clean read."""
    ids: dict[int, int] = {}

    def tensor(x: torch.Tensor) -> tuple:
        raw = x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        return ids.setdefault(id(x), len(ids)), x.dtype, tuple(x.shape), raw

    reads = {id(x): k for k, x in enumerate(runtime.clean_reads)}
    return {
        "outputs": [
            "clean" if out is runtime.clean[s] else tuple(tensor(t) for t in runtime.codec.tensors(out))
            for s, out in enumerate(runtime.outputs)
        ],
        "inputs": [None if x is None else ("read", reads[id(x)]) if id(x) in reads else tensor(x) for x in runtime.inputs],
        "projections": {k: tensor(p) for k, p in sorted(runtime.projections.items())},
        "final": tensor(runtime.final),
        "scalars": copy.deepcopy((runtime.metric, runtime.active_from, runtime.plan, runtime.rows_only)),
        "edges": copy.deepcopy((runtime.edge_state.removed_from, runtime.edge_state.kept_in, runtime.edge_state.kept_out)),
    }


def _interrupted(model, task, path, monkeypatch, stop_at: int, write_budget: float, **options) -> None:
    monkeypatch.setattr(checkpoint_module, "WRITE_BUDGET", write_budget)

    def stop(done):
        if done.index == stop_at:
            raise Stop

    with pytest.raises(Stop):
        pahq_fx.discover(model, task, threshold=THRESHOLD, progress=False, checkpoint=path, callback=stop, **options)


@pytest.mark.parametrize(
    "storage, speculation, inputs",
    [
        ("fp32", "off", "stored"),
        ("bf16", "off", "stored"),
        ("fp32", "removed", "stored"),
        ("fp8", "removed", "stored"),
        ("fp32", "off", "recomputed"),
        ("fp8", "removed", "recomputed"),
    ],
    ids=str,
)
def test_the_resumed_runtime_is_the_uninterrupted_ones_bit_for_bit(tmp_path, monkeypatch, storage, speculation, inputs):
    """State saved after receiver 5, decisions after receiver 9: the resume loads 5 and replays 6 to 9."""
    model, task = build(Spec("llama", 2, 4, 2, 8)), _task()
    options = dict(precision="fp8", storage=storage, speculation=speculation, receiver_inputs=inputs)
    session = search_module.prepare(model, task, precision="fp8", storage=storage, receiver_inputs=inputs)
    at_nine = {}

    def snapshot(done):
        if done.index == 9:
            at_nine.update(_describe(session.runtime))

    search_module.search(session, THRESHOLD, progress=False, callback=snapshot, speculation=speculation)

    path = tmp_path / "checkpoint.json"
    _interrupted(model, task, path, monkeypatch, 4, 0, **options)  # state after every receiver: after 4
    _interrupted(model, task, path, monkeypatch, 9, 1e12, **options)  # the first write only (5), decisions on interrupt (9)
    saved = json.loads(path.read_text())
    assert saved["state"]["receivers"] == 5 and len(saved["done"]) == 9

    resumed = search_module.prepare(model, task, precision="fp8", storage=storage, receiver_inputs=inputs)
    replayed = []
    monkeypatch.setattr(resumed.runtime, "investigate", lambda r, f=resumed.runtime.investigate: replayed.append(r.name) or f(r))
    loaded = checkpoint_module.resume(resumed.runtime, resumed.edges, checkpoint_module.Checkpoint(path, {}), saved)
    assert loaded == 5 and replayed and set(replayed) <= set(saved["done"][5:])
    assert _describe(resumed.runtime) == at_nine


def test_a_state_file_that_does_not_belong_is_ignored_with_a_warning(tmp_path, monkeypatch):
    model, task = build(Spec("gpt2", 2, 2, 2, 8)), _task()
    uninterrupted = pahq_fx.discover(model, task, threshold=THRESHOLD, precision="fp32", progress=False, compile=False)
    path = tmp_path / "checkpoint.json"
    _interrupted(model, task, path, monkeypatch, 6, 0, precision="fp32")
    state = path.with_name("checkpoint.state.safetensors")
    data = bytearray(state.read_bytes())
    data[-1] ^= 1  # one bit of a tensor: a file the checkpoint does not name
    state.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not belong to checkpoint .*SHA-256.*replaying every decision"):
        resumed = pahq_fx.discover(model, task, threshold=THRESHOLD, precision="fp32", progress=False, checkpoint=path)
    assert [e.effect for e in resumed.edges] == [e.effect for e in uninterrupted.edges]
    assert not path.exists() and not state.exists(), "a finished run removes its state file with its checkpoint"


def test_a_checkpoint_that_contradicts_its_state_file_is_refused(tmp_path, monkeypatch):
    """Removed edges taken out of a checkpoint, its digest written again to match: the state file it names, written
    with it, still holds them, so the checkpoint is refused rather than replayed without them."""
    from pahq_fx.acdc.checkpoint import _digest

    model, task = build(Spec("gpt2", 2, 2, 2, 8)), _task()
    path = tmp_path / "checkpoint.json"
    _interrupted(model, task, path, monkeypatch, 6, 0, precision="fp32")
    saved = json.loads(path.read_text())
    held = saved["state"]["receivers"]
    dropped = next(pair for pair in saved["removed"] if pair[0] < held)
    saved["removed"].remove(dropped)
    saved["digest"] = _digest(saved)
    path.write_text(json.dumps(saved))
    with pytest.raises(pahq_fx.CheckpointError, match="disagree on the removed edges"):
        pahq_fx.discover(model, task, threshold=THRESHOLD, precision="fp32", progress=False, checkpoint=path)


def test_a_state_of_another_model_is_refused_untouched():
    small = search_module.prepare(build(Spec("gpt2", 1, 2, 2, 8)), _task(), precision="fp32")
    other = search_module.prepare(build(Spec("gpt2", 2, 2, 2, 8)), _task(), precision="fp32")
    before = _describe(other.runtime)
    with pytest.raises(state_io.StateMismatch, match="a model with other edges"):
        state_io.restore(other.runtime, state_io.encode(small.runtime))
    assert _describe(other.runtime) == before


@pytest.mark.parametrize("threshold, pruned", [(0.05, True), (1e-4, False)], ids=["sparse", "dense"])
def test_the_eta_counts_the_step_being_searched_exactly_and_ends_at_zero(threshold, pruned):
    """Every edge out of the nodes of the step being searched is decided: the expected work of its receivers left is
    the work they then take, whichever are pruned. Lower steps are estimates; the last ETA is 0."""
    from pahq_fx.acdc.eta import Remaining

    session = search_module.prepare(build(Spec("gpt2", 3, 2, 2, 8)), _task(), precision="fp32")
    runtime, receivers = session.runtime, len(session.edges.receivers)
    remaining, counted = Remaining(runtime, session.edges), [0]
    taken: dict[int, float] = {}
    expected: dict[int, tuple[range, float]] = {}
    etas = []

    def record(done) -> None:
        row = done.index - 1
        taken[row] = remaining.finish(row, done.queries > counted[0])
        counted[0] = done.queries
        step = runtime.index.row_step[row + 1] if row + 1 < receivers else None
        rows = range(row + 1, next((r for r in range(row + 1, receivers) if runtime.index.row_step[r] != step), receivers))
        expected[row] = rows, remaining.expected(rows)
        etas.append(done.eta_s)

    circuit = search_module.search(session, threshold, progress=False, callback=record)
    assert any(taken.values()) and (not all(taken.values())) == pruned
    for rows, units in expected.values():
        assert units == sum(taken[r] for r in rows)
    assert etas[-1] == 0.0 and all(e is None or e >= 0 for e in etas) and circuit.edges
