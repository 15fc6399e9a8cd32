"""JSON Lines tasks: tokenized with the model's own tokenizer, equal to the generated task, every bad line named."""

from __future__ import annotations

import json

import pytest
import torch

import pahq_fx
from pahq_fx import zoo
from pahq_fx.tasks import make_task
from tests.test_cli import run


def write_jsonl(path, task, tokenizer, answers: bool = True) -> None:
    """The text of a tokenized task, one JSON object per example (what a researcher would write by hand)."""
    lines = []
    for i in range(task.n_examples):
        record = {"clean": tokenizer.decode(task.clean_input_ids[i]), "corrupted": tokenizer.decode(task.corrupted_input_ids[i])}
        if answers:
            record.update(
                correct=" " + tokenizer.decode(task.correct_ids[i]), incorrect=" " + tokenizer.decode(task.incorrect_ids[i])
            )
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def ioi():
    model, tokenizer = zoo.load("llama-ioi")
    return model, tokenizer, make_task("ioi", tokenizer, n=8, seed=3)


def test_jsonl_task_equals_the_generated_one(ioi, tmp_path):
    _, tokenizer, task = ioi
    write_jsonl(tmp_path / "ioi.jsonl", task, tokenizer)
    loaded = pahq_fx.Task.from_jsonl(tmp_path / "ioi.jsonl", tokenizer)
    assert loaded.name == "ioi"
    for name in ("clean_input_ids", "corrupted_input_ids", "metric_mask", "correct_ids", "incorrect_ids"):
        assert torch.equal(getattr(loaded, name), getattr(task, name)), name


def test_lines_of_different_lengths_are_padded_and_read_at_their_own_positions(ioi, tmp_path):
    _, tokenizer, _ = ioi
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"clean": "When Mary and John went", "corrupted": "When Tom and John went"}\n\n'
        '{"clean": "Mary went", "corrupted": "Tom went", "positions": [0, -1]}\n'
    )
    task = pahq_fx.Task.from_jsonl(path, tokenizer, name="mixed")
    assert task.clean_input_ids.shape == (2, 5) and not task.has_answers
    assert task.metric_mask.tolist() == [[False] * 4 + [True], [True, True, False, False, False]]
    assert task.clean_input_ids[1, 2:].tolist() == [tokenizer.pad_token_id] * 3


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"clean": "Mary went", "corrupted": "Tom went"', r"line 2: not valid JSON"),
        ('["Mary went", "Tom went"]', r"line 2: expected a JSON object"),
        ('{"clean": "Mary went"}', r"line 2: missing 'corrupted'"),
        ('{"clean": "Mary went", "corrupted": "Tom went", "answer": " Mary"}', r"line 2: unknown key\(s\) 'answer'"),
        ('{"clean": "Mary went", "corrupted": 3}', r"line 2: 'corrupted' must be a non-empty string"),
        (
            '{"clean": "Mary went", "corrupted": "Tom and Tom went"}',
            r"line 2: clean and corrupted prompts tokenize to different lengths \(2 vs 4",
        ),
        (
            '{"clean": "Mary went", "corrupted": "Zyzzyva went"}',
            r"line 2: 'corrupted' has word\(s\) the tokenizer does not know: 'Zyzzyva'",
        ),
        (
            '{"clean": "Mary went", "corrupted": "Tom went", "correct": " Mary John", "incorrect": " Tom"}',
            r"line 2: 'correct' answer ' Mary John' is 2 tokens",
        ),
        ('{"clean": "Mary went", "corrupted": "Tom went", "correct": " Mary"}', r"line 2: give both 'correct' and 'incorrect'"),
        (
            '{"clean": "Mary went", "corrupted": "Tom went", "positions": [5]}',
            r"line 2: position 5 is outside the prompt's 2 tokens",
        ),
        ('{"clean": "Mary went", "corrupted": "Tom went", "positions": "last"}', r"line 2: 'positions' must be a non-empty list"),
    ],
)
def test_each_malformed_line_gets_its_error(ioi, tmp_path, line, message):
    _, tokenizer, _ = ioi
    path = tmp_path / "bad.jsonl"
    path.write_text('{"clean": "John went", "corrupted": "Paul went"}\n' + line + "\n")
    with pytest.raises(pahq_fx.TaskError, match=f"bad.jsonl, {message}"):
        pahq_fx.Task.from_jsonl(path, tokenizer)


def test_answers_on_some_lines_only_and_empty_files_are_errors(ioi, tmp_path):
    _, tokenizer, _ = ioi
    path = tmp_path / "some.jsonl"
    path.write_text(
        '{"clean": "John went", "corrupted": "Paul went", "correct": " Mary", "incorrect": " Tom"}\n'
        '{"clean": "John went", "corrupted": "Paul went"}\n'
    )
    with pytest.raises(pahq_fx.TaskError, match="some lines give correct/incorrect answers"):
        pahq_fx.Task.from_jsonl(path, tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(pahq_fx.TaskError, match="holds no example"):
        pahq_fx.Task.from_jsonl(tmp_path / "empty.jsonl", tokenizer)


def test_jsonl_round_trips_through_the_cli(ioi, tmp_path):
    _, tokenizer, task = ioi
    write_jsonl(tmp_path / "prompts.jsonl", task, tokenizer)
    common = ("--model", "llama-ioi", "--threshold", "0.05", "--precision", "fp32", "--no-progress")
    from_text = run("discover", "--task", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "text"), *common)
    assert from_text.returncode == 0, from_text.stderr
    generated = run("discover", "--task", "ioi", "--n", "8", "--seed", "3", "--out", str(tmp_path / "gen"), *common)
    assert generated.returncode == 0, generated.stderr
    text = pahq_fx.Circuit.load(tmp_path / "text" / "circuit.json")
    gen = pahq_fx.Circuit.load(tmp_path / "gen" / "circuit.json")
    assert text.edges and {(e.sender, e.receiver) for e in text.edges} == {(e.sender, e.receiver) for e in gen.edges}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "Mary went", "corrupted": "Tom went"}\n{"clean": "Mary"}\n')
    failed = run("discover", "--task", str(bad), "--out", str(tmp_path / "bad"), *common)
    assert failed.returncode == 2 and "bad.jsonl, line 2: missing 'corrupted'" in failed.stderr
