"""Nothing lost, nothing run that should not be (issue 33): a finished search survives what comes after it, every write
is whole and follows no planted link, an out folder holds one run, and every bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import BatchEncoding

import pahq_fx
from pahq_fx import atomic, cli, zoo
from pahq_fx.acdc import search as search_module
from pahq_fx.acdc.checkpoint import CHECKPOINT_FORMAT, Checkpoint, _digest
from pahq_fx.acdc.sweep import Sweep, SweepPoint, threshold_folder
from pahq_fx.tasks import make_task

MODEL = "gpt2-induction"
COMMON = ("--model", MODEL, "--task", "induction", "--n", "4", "--precision", "fp32", "--no-progress")


@pytest.fixture(scope="module")
def induction():
    model, tokenizer = zoo.load(MODEL)
    return model, tokenizer, make_task("induction", tokenizer, n=4, seed=0)


@pytest.fixture(scope="module")
def reference(induction):
    model, _, task = induction
    return pahq_fx.discover(model, task, threshold=0.05, precision="fp32", progress=False, faithfulness=True)


def _main(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def _one_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def _injected(*args, **kwargs):
    raise MemoryError("injected: the faithfulness pass ran out of memory")


# A finished search is never lost


def test_a_failure_in_the_faithfulness_pass_loses_no_search(induction, reference, tmp_path, monkeypatch):
    model, _, task = induction
    checkpoint, saved = tmp_path / "checkpoint.json", tmp_path / "circuit.json"
    run = dict(threshold=0.05, precision="fp32", progress=False, checkpoint=checkpoint, faithfulness=True)
    monkeypatch.setattr(search_module, "evaluate_edges", _injected)
    with pytest.raises(MemoryError):
        pahq_fx.discover(model, task, **run)
    assert checkpoint.exists(), "without save_to, the checkpoint stays until the circuit is returned"
    with pytest.raises(MemoryError):  # resumes from the complete checkpoint, saves, then fails again
        pahq_fx.discover(model, task, **run, save_to=saved)
    assert not checkpoint.exists(), "the circuit is on disk: the checkpoint has nothing left to resume"
    circuit = pahq_fx.Circuit.load(saved)
    assert circuit.faithfulness is None
    assert circuit.edge_set() == reference.edge_set()
    assert [e.effect for e in circuit.edges] == [e.effect for e in reference.edges]
    assert circuit.stats.queries == reference.stats.queries
    monkeypatch.undo()
    finished = pahq_fx.discover(model, task, **run, save_to=saved)
    assert pahq_fx.Circuit.load(saved).faithfulness == finished.faithfulness is not None


def test_the_command_writes_the_circuit_before_the_faithfulness_pass(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ("discover", *COMMON, "--threshold", "0.05", "--out", str(out))

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "evaluate_edges", interrupt)
    code, err = _main(capsys, *args)
    assert code == 130 and "run the same command again" in err, err
    circuit = pahq_fx.Circuit.load(out / "circuit.json")
    assert circuit.edge_set() == reference.edge_set() and not (out / "checkpoint.json").exists()
    monkeypatch.undo()
    code, err = _main(capsys, *args)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["edges_kept"] == len(reference.edges)


def test_ctrl_c_during_the_search_says_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    calls = []

    def interrupting_third(original):
        def run(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(*a, **k)

        return run

    for name in ("_search_receiver", "search_receiver"):  # one receiver at a time, or in candidate batches
        monkeypatch.setattr(search_module, name, interrupting_third(getattr(search_module, name)))
    code, err = _main(capsys, "discover", *COMMON, "--threshold", "0.05", "--out", str(out))
    assert code == 130
    _one_line(err, f"finished receivers are in {out / 'checkpoint.json'}: run the same command again to resume")
    assert len(json.loads((out / "checkpoint.json").read_text())["done"]) == 2


# Writes are atomic and follow no planted link; an out folder holds one run


def test_the_writer_replaces_a_planted_symlink_instead_of_following_it(tmp_path, reference):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name, write in (
        ("plain", lambda p: atomic.write_text(p, "new")),
        ("circuit.json", reference.save),
        ("checkpoint.json", lambda p: Checkpoint(p, {}).save([], [], {}, 0)),
        ("circuit.png", lambda p: reference.draw(p)),
    ):
        target = tmp_path / name
        target.symlink_to(victim)
        write(target)
        assert victim.read_text() == "precious" and not target.is_symlink() and target.stat().st_size > 0, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    atomic.write_text(target, "first")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(target, "second, longer")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_second_run_into_the_same_folder_is_refused_unless_asked(tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(capsys, "discover", *COMMON, "--threshold", "0.05", "--out", str(out))[0] == 0
    code, err = _main(capsys, "discover", *COMMON, "--threshold", "0.2", "--out", str(out))
    assert code == 2
    _one_line(
        err, "already holds the run of `pahq-fx discover --model gpt2-induction --task induction --n 4 --seed 0 --threshold 0.05"
    )
    assert "--overwrite" in err and pahq_fx.Circuit.load(out / "circuit.json").threshold == 0.05
    code, err = _main(capsys, "discover", *COMMON, "--threshold", "0.2", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert pahq_fx.Circuit.load(out / "circuit.json").threshold == 0.2
    assert json.loads((out / "run.json").read_text())["threshold"] == 0.2
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(tmp_path / "victim")  # planted in this run's own folder
    assert _main(capsys, "discover", *COMMON, "--threshold", "0.2", "--out", str(out))[0] == 0  # the same run: redone
    assert not (tmp_path / "victim").exists() and not (out / "report.md").is_symlink()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "circuit.json").write_text("{}")
    code, err = _main(capsys, "discover", *COMMON, "--threshold", "0.2", "--out", str(foreign))
    assert code == 2 and "other results (circuit.json)" in err


def test_sweep_folders_are_exact_and_distinct(reference, tmp_path):
    assert threshold_folder(0.1) == "tau=0.1" and threshold_folder(0.1000001) == "tau=0.1000001"
    assert threshold_folder(1e-5) != threshold_folder(1.00000001e-5)
    points = tuple(SweepPoint(t, dataclasses.replace(reference, threshold=t)) for t in (0.1, 0.1000001))
    written = Sweep("fp32", "kl", points, 0.0).save(tmp_path)
    assert pahq_fx.Circuit.load(tmp_path / "tau=0.1" / "circuit.json").threshold == 0.1
    assert pahq_fx.Circuit.load(tmp_path / "tau=0.1000001" / "circuit.json").threshold == 0.1000001
    assert all(p.exists() for p in written) and len(json.loads((tmp_path / "summary.json").read_text())["points"]) == 2
    assert "| 0.1 |" in (tmp_path / "summary.md").read_text() and "| 0.1000001 |" in (tmp_path / "summary.md").read_text()
    clash = tuple(SweepPoint(0.1, reference) for _ in range(2))
    with pytest.raises(pahq_fx.PahqError, match="share a folder"):
        Sweep("fp32", "kl", clash, 0.0).save(tmp_path / "clash")


# Checkpoints: structure and digest


def _checkpoint(path, **fields) -> None:
    data = {"format": CHECKPOINT_FORMAT, "fingerprint": {}, "done": [], "removed": [], "effects": [], "queries": 0, **fields}
    data["digest"] = _digest(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "is not a pahq_fx checkpoint"),
        ("null", "is not a pahq_fx checkpoint"),
        ('{"format": "pahq_fx.acdc.checkpoint/1", "done": []}', "written by another version of pahq_fx"),
        ("{not json", "is unreadable"),
        (dict(done="abc"), "'done' must be a list of distinct receiver names"),
        (dict(removed=[[1, "x"]]), "'removed' must be a list of [receiver, sender] index pairs"),
        (dict(effects=[[0, 1, "big"]]), "'effects' must be a list of [receiver, sender, effect] triples"),
        (dict(queries=-3), "'queries' must be a non-negative integer"),
        (dict(queries=True), "'queries' must be a non-negative integer"),
    ],
)
def test_a_malformed_checkpoint_is_refused_with_its_name(tmp_path, content, message):
    path = tmp_path / "checkpoint.json"
    if isinstance(content, dict):
        _checkpoint(path, **content)
    else:
        path.write_text(content)
    with pytest.raises(pahq_fx.CheckpointError, match=f"checkpoint {path}.*{message}".replace("[", r"\[").replace("]", r"\]")):
        Checkpoint(path, {}).load()


def test_a_tampered_checkpoint_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ("discover", *COMMON, "--threshold", "0.05", "--out", str(out))
    monkeypatch.setattr(Checkpoint, "finish", lambda self: None)  # keep the complete checkpoint
    monkeypatch.setattr(search_module, "evaluate_edges", _injected)
    with pytest.raises(MemoryError):
        cli.main(list(args))
    monkeypatch.undo()
    checkpoint = out / "checkpoint.json"
    data = json.loads(checkpoint.read_text())
    data["removed"] = data["removed"][1:]  # one decision flipped: a different circuit, were it used
    checkpoint.write_text(json.dumps(data))
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    code, err = _main(capsys, *args)
    assert code == 2
    _one_line(err, "was changed after pahq_fx wrote it")


def test_a_checkpoint_of_other_decisions_is_refused_untouched(induction, tmp_path):
    model, _, task = induction
    path = tmp_path / "checkpoint.json"
    with pytest.raises(ZeroDivisionError):
        pahq_fx.discover(
            model,
            task,
            threshold=0.05,
            precision="fp32",
            progress=False,
            checkpoint=path,
            callback=lambda done: 1 / 0 if done.index == 2 else None,
        )
    data = json.loads(path.read_text())
    data["done"] = list(reversed(data["done"]))
    data["digest"] = _digest(data)
    path.write_text(json.dumps(data))
    with pytest.raises(pahq_fx.CheckpointError, match=f"checkpoint {path}: its finished receivers are not the first"):
        pahq_fx.discover(model, task, threshold=0.05, precision="fp32", progress=False, checkpoint=path)


# One-line errors from the command line (exit 2), before the model loads where the model is not needed


@pytest.fixture()
def no_model(monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model was loaded for a check that needs none"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--threshold", "inf"), "threshold must be a finite non-negative number, got 'inf'"),
        (("--threshold", "1e400"), "got '1e400'"),
        (("--threshold", "nan"), "got 'nan'"),
        (("--threshold", "0.1", "--n", "0"), "must be at least 1"),
    ],
)
def test_bad_arguments_are_one_line_before_the_model_loads(args, message, tmp_path, capsys, no_model):
    code, err = _main(capsys, "discover", "--model", MODEL, "--task", "ioi", *args, "--out", str(tmp_path / "o"))
    assert code == 2
    _one_line(err, message)


def test_bad_sweep_thresholds_are_one_line(tmp_path, capsys, no_model):
    code, err = _main(capsys, "sweep", "--model", MODEL, "--task", "ioi", "--thresholds", "0.1,inf", "--out", str(tmp_path))
    assert code == 2
    _one_line(err, "finite non-negative numbers, got 'inf'")


def test_task_files_are_checked_before_the_model_loads(tmp_path, capsys, no_model):
    folder = tmp_path / "tasks"
    folder.mkdir()
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"clean": "a", "corrupted": "b"}\n{"clean": "caf\xe9", "corrupted": "b"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"clean": "a", "corrupted": "b"}\n{"clean": "a"\n')
    uint8 = tmp_path / "uint8.safetensors"
    save_file(
        {"clean_input_ids": torch.ones(2, 3, dtype=torch.uint8), "corrupted_input_ids": torch.ones(2, 3, dtype=torch.uint8)},
        uint8,
    )
    ids = torch.ones(2, 3, dtype=torch.long)
    bool_answers = tmp_path / "bool.safetensors"
    save_file(
        {
            "clean_input_ids": ids,
            "corrupted_input_ids": ids.clone(),
            "correct_ids": torch.ones(2, dtype=torch.bool),
            "incorrect_ids": torch.zeros(2, dtype=torch.bool),
        },
        bool_answers,
    )
    cases = [
        (folder, "is a folder"),
        (latin1, "latin1.jsonl, line 2: not UTF-8 text (byte 0xe9 at column 15)"),
        (broken, "broken.jsonl, line 2: not valid JSON"),
        (uint8, "clean_input_ids must be an integer tensor (int64 or int32) of shape [N, T], got torch.uint8"),
        (bool_answers, "correct_ids must be an integer tensor (int64 or int32) of shape [2], got torch.bool"),
    ]
    for task, message in cases:
        code, err = _main(
            capsys, "discover", "--model", MODEL, "--task", str(task), "--threshold", "0.1", "--out", str(tmp_path / "o")
        )
        assert code == 2, (task, err)
        _one_line(err, message)


def test_mistakes_the_tokenizer_finds_are_told_before_the_model_loads(tmp_path, capsys, no_model):
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"clean": "Mary went", "corrupted": "Zyzzyva went"}\n')
    for args, message in (
        (("--task", str(unknown)), "unknown.jsonl, line 1: 'corrupted' has word(s) the tokenizer does not know"),
        (("--task", "induction", "--metric", "logit_diff"), "metric logit_diff needs correct_ids"),
    ):
        code, err = _main(capsys, "discover", "--model", "llama-ioi", *args, "--threshold", "0.1", "--out", str(tmp_path / "o"))
        assert code == 2
        _one_line(err, message)


def _model_folder(tmp_path, name: str, change) -> str:
    model, tokenizer = zoo.load(MODEL)
    change(model)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_damaged_models_are_one_line_naming_the_file_or_parameter(tmp_path, capsys):
    def poison(value):
        def change(model):
            with torch.no_grad():
                model.transformer.h[1].mlp.c_fc.weight[0, 0] = value

        return change

    truncated = _model_folder(tmp_path, "truncated", lambda m: None)
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as file:
        file.truncate(os.path.getsize(weights) // 2)
    pickled = _model_folder(tmp_path, "pickled", lambda m: None)
    os.remove(os.path.join(pickled, "model.safetensors"))
    torch.save({"weight": torch.ones(1), "code": print}, os.path.join(pickled, "pytorch_model.bin"))
    cases = [
        (truncated, (), "weights (model.safetensors) are damaged or truncated"),
        (pickled, (), "weights (pytorch_model.bin) hold pickled objects besides tensors"),
        (_model_folder(tmp_path, "nan", poison(math.nan)), (), "parameter transformer.h.1.mlp.c_fc.weight holds NaN values"),
        (
            _model_folder(tmp_path, "inf", poison(math.inf)),
            ("--allow-weak-task",),
            "parameter transformer.h.1.mlp.c_fc.weight holds infinite values",
        ),
    ]
    for model, extra, message in cases:
        code, err = _main(
            capsys,
            "discover",
            "--model",
            model,
            "--task",
            "induction",
            "--n",
            "4",
            "--threshold",
            "0.1",
            "--no-progress",
            *extra,
            "--out",
            str(tmp_path / f"o-{os.path.basename(model)}"),
        )
        assert code == 2, (model, err)
        _one_line(err, message)


def test_a_prompt_longer_than_the_model_is_one_line(tmp_path, capsys):
    long = tmp_path / "long.safetensors"
    ids = torch.ones(2, 40, dtype=torch.long)  # the model has 32 positions
    save_file({"clean_input_ids": ids, "corrupted_input_ids": ids.clone()}, long)
    code, err = _main(
        capsys, "discover", "--model", MODEL, "--task", str(long), "--threshold", "0.1", "--out", str(tmp_path / "o")
    )
    assert code == 2
    _one_line(err, "prompts are 40 tokens long, longer than the model's 32 positions")


def test_a_metric_that_is_not_a_number_is_its_own_error(induction):
    _, _, task = induction
    model, _ = zoo.load(MODEL)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e37)  # tied to the embedding: the logits overflow, the KL is NaN
    with pytest.raises(pahq_fx.NonFiniteError, match=r"the metric \(kl\) of the clean model is nan"):
        pahq_fx.discover(model, task, threshold=0.1, progress=False)


# Inputs of transform / PahqModel: one error each, never a raw torch error, and padding never dropped


@pytest.fixture(scope="module")
def transformed(induction):
    model = induction[0]
    return pahq_fx.transform(model, example_inputs=torch.ones(2, 5, dtype=torch.long), precision="fp32", compile=False)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.ones(2, 5, dtype=torch.int8), "int64 or int32 token ids, got a torch.int8"),
        (torch.ones(2, 5, dtype=torch.uint8), "got a torch.uint8"),
        (torch.full((2, 5), 248), "token id 248, outside the model's vocabulary [0, 248)"),
        (torch.full((2, 5), -1), "negative token id -1"),
        (torch.ones(2, 0, dtype=torch.long), "prompts without a token"),
        (torch.ones(0, 5, dtype=torch.long), "no prompt"),
        (torch.ones(1, 33, dtype=torch.long), "33 tokens long, longer than the model's 32 positions"),
        (
            BatchEncoding(
                {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1] * 5])}
            ),
            "the attention_mask marks padding",
        ),
        (
            BatchEncoding(
                {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])}
            ),
            "tokenize without padding=True",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 1, 5, 5, dtype=torch.long)},
            "the attention_mask must be a [batch, seq] tensor like input_ids (2, 5), got (2, 1, 5, 5)",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "position_ids": torch.arange(5).expand(2, 5) + 3},
            "entries the graph does not take (position_ids)",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "token_type_ids": torch.ones(2, 5, dtype=torch.long)},
            "token_type_ids other than 0",
        ),
        ((torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)), "a tuple of 2 positional inputs"),
    ],
)
def test_bad_input_ids_are_an_invalid_inputs_error(induction, transformed, ids, message):
    with pytest.raises(pahq_fx.InvalidInputsError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        transformed(ids)
    with pytest.raises(pahq_fx.InvalidInputsError):
        pahq_fx.transform(induction[0], example_inputs=ids, precision="fp32", compile=False)


def test_a_mask_without_padding_is_accepted(transformed):
    ids = torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(transformed({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), transformed(ids))


def test_the_command_line_imports_no_torch_for_its_cheap_checks(tmp_path):
    import subprocess

    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text('{"command": "discover", "threshold": 1}')
    (out / "circuit.json").write_text("{}")
    check = (
        "import sys\nfrom pahq_fx import cli\n"
        f"assert cli.main(['discover', '--model', 'm', '--task', 'ioi', '--threshold', '2', '--out', {str(out)!r}]) == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]" and "already holds the run of" in result.stderr


# Killed at any moment: a resume to the identical circuit, or the circuit already complete


def test_a_run_killed_at_any_moment_resumes_or_has_its_circuit(tmp_path):
    import random
    import signal
    import subprocess
    import time

    from tests.test_cli import SCRIPT
    from tests.test_cli_runs import _save_deep_model

    model_dir = tmp_path / "deep-gpt2"
    _save_deep_model(model_dir)
    out = tmp_path / "out"
    args = [
        "discover",
        "--model",
        str(model_dir),
        "--task",
        "induction",
        "--n",
        "4",
        "--threshold",
        "0",
        "--precision",
        "fp32",
        "--no-progress",
        "--allow-weak-task",
        "--out",
        str(out),
    ]
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "pahq_fx.cli"]
    model, tokenizer = zoo.load(str(model_dir))
    with pytest.warns(UserWarning, match="does not exercise the model"):
        expected = pahq_fx.discover(
            model,
            make_task("induction", tokenizer, n=4, seed=0),
            threshold=0.0,
            precision="fp32",
            progress=False,
            allow_weak_task=True,
        )

    def searched() -> bool:
        try:
            return len(json.loads((out / "checkpoint.json").read_text())["done"]) >= 2
        except (OSError, ValueError, KeyError):
            return False

    delay = random.Random(33).uniform(0.5, 4.0)
    triggers = {
        "during the search": searched,
        "at a random moment": lambda: time.monotonic() - start > delay,
        "after the search": (out / "circuit.json").exists,
        "while reporting": (out / "report.json").exists,
    }
    killed, progress = [], False
    for moment, trigger in triggers.items():
        if moment == "after the search":
            (out / "circuit.json").unlink(missing_ok=True)  # wait for this run's own
        start = time.monotonic()
        process = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while process.poll() is None and not trigger():
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed.append(moment)
        process.wait(timeout=120)
        assert process.returncode in (0, -signal.SIGKILL), process.stderr.read()
        if (out / "checkpoint.json").exists():  # whole, and the same command resumes from it
            Checkpoint(out / "checkpoint.json", {}).check()
            progress = True
        elif progress or (out / "circuit.json").exists():  # once anything was searched, nothing is lost
            circuit = pahq_fx.Circuit.load(out / "circuit.json")  # whole: written atomically
            assert circuit.edge_set() == expected.edge_set()
            progress = True
        for name in ("report.json", "run.json"):
            if (out / name).exists():
                json.loads((out / name).read_text())
    assert "during the search" in killed, "the run ended before it could be killed"
    final = subprocess.run([*command, *args], check=False, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    circuit = pahq_fx.Circuit.load(out / "circuit.json")
    assert circuit.edge_set() == expected.edge_set()
    assert [e.effect for e in circuit.edges] == [e.effect for e in expected.edges]
    assert not (out / "checkpoint.json").exists() and not list(out.glob(".*.tmp"))
    assert len(killed) >= 3, killed


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_padding_is_refused_never_dropped_on_every_family(family):
    """The graph takes input_ids alone: a padded batch would attend to its padding (logits up to 0.25 off
    ``model(**enc)`` on GPT-2), so a mask with padding is an error that says what to do, on either side."""
    from tests.builders import Spec, build, reference_logits, token_ids

    model = build(Spec(family, 1, 2, 2 if family != "llama" else 1, 8))
    ids = token_ids(2, 5)
    pahq = pahq_fx.transform(model, example_inputs=ids, precision="fp32", compile=False)
    unpadded = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(pahq(unpadded), model(**unpadded, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pahq(unpadded), reference_logits(model, ids), rtol=1e-5, atol=1e-5)
    for mask in ([[0, 0, 1, 1, 1], [1] * 5], [[1, 1, 1, 0, 0], [1] * 5]):
        padded = BatchEncoding({"input_ids": ids, "attention_mask": torch.tensor(mask)})
        with pytest.raises(pahq_fx.InvalidInputsError, match=r"attention_mask marks padding.*without padding"):
            pahq(padded)
        with pytest.raises(pahq_fx.InvalidInputsError, match="attention_mask marks padding"):
            pahq_fx.transform(model, example_inputs=padded, precision="fp32", compile=False)
        with pytest.raises(pahq_fx.InvalidInputsError, match="attention_mask marks padding"):
            pahq(**padded)  # model(**encoding)'s call
        with pytest.raises(pahq_fx.InvalidInputsError, match="positional inputs"):
            pahq((ids, padded["attention_mask"]))  # a tuple's second input is not taken for a mask, nor dropped
    torch.testing.assert_close(pahq(**unpadded), pahq(ids))
    torch.testing.assert_close(pahq((ids, None)), pahq(ids))


def test_another_runs_checkpoint_is_refused_before_the_setup(induction, tmp_path, monkeypatch):
    model, _, task = induction
    path = tmp_path / "checkpoint.json"
    with pytest.raises(ZeroDivisionError):
        pahq_fx.discover(
            model, task, threshold=0.05, progress=False, checkpoint=path, callback=lambda done: 1 / 0 if done.index == 2 else None
        )
    monkeypatch.setattr(search_module, "prepare", lambda *a, **k: pytest.fail("traced before the checkpoint was checked"))
    with pytest.raises(pahq_fx.CheckpointError, match=r"belongs to another run \(its threshold differs from this one's\)"):
        pahq_fx.discover(model, task, threshold=0.06, progress=False, checkpoint=path)


def test_a_sweep_that_dies_keeps_the_thresholds_it_finished(induction, tmp_path, monkeypatch):
    sweep_module = sys.modules["pahq_fx.acdc.sweep"]  # the name pahq_fx.acdc.sweep is the function

    model, _, task = induction
    monkeypatch.setattr(sweep_module, "evaluate_edges", _injected)
    with pytest.raises(MemoryError):
        pahq_fx.sweep(model, task, [0.2, 0.05], precision="fp32", progress=False, save_to=tmp_path)
    for t in (0.05, 0.2):
        assert pahq_fx.Circuit.load(tmp_path / f"tau={t}" / "circuit.json").threshold == t


def test_the_command_says_it_ignored_a_planted_cache_entry(tmp_path, monkeypatch, capsys):
    import io

    from pahq_fx.passes import trace_cache
    from tests.test_trace import _Sentinel

    monkeypatch.setenv(trace_cache.ENV, str(tmp_path / "cache"))
    args = ("discover", *COMMON, "--threshold", "0.05")
    assert _main(capsys, *args, "--out", str(tmp_path / "first"))[0] == 0
    sentinel, planted = tmp_path / "sentinel", io.BytesIO()
    torch.save({"graph": _Sentinel(sentinel)}, planted)
    entries = sorted((tmp_path / "cache").glob("*.pt"))
    for entry in entries:
        entry.write_bytes(planted.getvalue())
    code, err = _main(capsys, *args, "--out", str(tmp_path / "second"))
    assert code == 0 and not sentinel.exists()
    assert err.count("WARNING: ignored the trace cache entry") == len(entries) >= 1, err
