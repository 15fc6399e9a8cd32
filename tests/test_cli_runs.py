"""The CLI as a long job: a killed run resumes with the same command, and a task the model cannot do stops loudly."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import pahq_fx
from pahq_fx import zoo
from pahq_fx.acdc import check_task
from pahq_fx.tasks import make_task
from tests.test_cli import SCRIPT, run


def test_task_the_model_cannot_do_stops_loudly_unless_allowed(tmp_path):
    common = (
        "discover",
        "--model",
        "gpt2-induction",
        "--task",
        "ioi",
        "--n",
        "8",
        "--threshold",
        "0.05",
        "--precision",
        "fp32",
        "--no-progress",
    )
    stopped = run(*common, "--out", str(tmp_path / "stopped"))
    assert stopped.returncode == 2
    assert "does not exercise the model" in stopped.stderr and "--allow-weak-task" in stopped.stderr
    assert not (tmp_path / "stopped" / "circuit.json").exists()
    allowed = run(*common, "--allow-weak-task", "--out", str(tmp_path / "allowed"))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stderr.count("this task does not exercise the model") == 1, "the warning prints once"
    assert "WARNING: this task does not exercise the model" in allowed.stderr
    assert "WARNING" in (tmp_path / "allowed" / "report.md").read_text()
    assert json.loads((tmp_path / "allowed" / "report.json").read_text())["task_check"]["problems"]


@pytest.mark.parametrize("name", sorted(zoo.available()))
def test_shipped_pairs_pass_the_task_check(name):
    model, tokenizer = zoo.load(name)
    entry = zoo.available()[name]
    for task_name in entry.tasks:
        task = make_task(task_name, tokenizer, n=16, seed=5, **entry.task_options)
        check = check_task(model, task, "kl")
        assert not check.weak, check.warning()
        assert check.clean_accuracy is None or check.clean_accuracy > 0.9


def _save_deep_model(path) -> None:
    """A 4-layer, 8-head GPT-2 with the shipped word tokenizer: enough queries (about 1800 at threshold 0) that a
    run can be killed half way."""
    _, tokenizer = zoo.load("gpt2-induction")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_head=8, n_embd=64, vocab_size=len(tokenizer), n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_killed_run_resumes_with_the_same_command(tmp_path):
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
        "8",
        "--threshold",
        "0",
        "--precision",
        "fp32",
        "--no-progress",
        "--allow-weak-task",
        "--out",
        str(out),
    ]
    command = [str(SCRIPT)] if SCRIPT.exists() else ["python", "-m", "pahq_fx.cli"]
    process = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoint.json"
    done = 0
    while process.poll() is None:
        try:
            done = len(json.loads(checkpoint.read_text())["done"])
        except (OSError, ValueError):
            done = 0
        if done >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {process.stderr.read()}"
    assert not (out / "circuit.json").exists()

    resumed = run(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint}" in resumed.stderr
    assert not checkpoint.exists(), "a finished run leaves no checkpoint behind"

    model, tokenizer = zoo.load(str(model_dir))
    task = make_task("induction", tokenizer, n=8, seed=0)
    with pytest.warns(UserWarning, match="does not exercise the model"):
        uninterrupted = pahq_fx.discover(model, task, threshold=0.0, precision="fp32", progress=False, allow_weak_task=True)
    circuit = pahq_fx.Circuit.load(out / "circuit.json")
    assert circuit.edge_set() == uninterrupted.edge_set()
    assert [e.effect for e in circuit.edges] == [e.effect for e in uninterrupted.edges]
    assert circuit.stats.queries == uninterrupted.stats.queries
