"""Task generators: shapes, determinism, and clean/corrupted differing only where they should."""

import pytest
import torch

import pahq_fx
from pahq_fx.tasks import GENERATORS, build_tokenizer, make_task, single_token_ids

TOKENIZER = build_tokenizer()


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_shapes_and_determinism(name):
    task = make_task(name, TOKENIZER, n=12, seed=3)
    again = make_task(name, TOKENIZER, n=12, seed=3)
    other = make_task(name, TOKENIZER, n=12, seed=4)
    assert task.clean_input_ids.shape[0] == 12 and task.clean_input_ids.shape == task.corrupted_input_ids.shape
    assert task.fingerprint() == again.fingerprint() != other.fingerprint()
    assert task.metric_mask.any(dim=1).all()
    if name != "induction":
        assert task.has_answers and (task.correct_ids != task.incorrect_ids).all()


def test_induction_corrupts_only_the_first_half():
    task = make_task("induction", TOKENIZER, n=10, seed=1)
    half = task.clean_input_ids.shape[1] // 2
    clean, corrupted = task.clean_input_ids, task.corrupted_input_ids
    assert torch.equal(clean[:, :half], clean[:, half:])
    assert torch.equal(clean[:, half:], corrupted[:, half:])
    assert (clean[:, :half] != corrupted[:, :half]).all()
    assert task.metric_mask[:, half:-1].all() and not task.metric_mask[:, :half].any()


def test_ioi_corrupts_only_the_repeated_name():
    task = make_task("ioi", TOKENIZER, n=20, seed=2)
    differs = task.clean_input_ids != task.corrupted_input_ids
    assert (differs.sum(1) == 1).all()
    for row in range(20):
        position = int(differs[row].nonzero())
        repeated = task.clean_input_ids[row, position]
        assert repeated == task.incorrect_ids[row]
        assert (task.clean_input_ids[row, :position] == repeated).sum() == 1  # B appeared once before
        assert (task.clean_input_ids[row] == task.correct_ids[row]).sum() == 1  # A appears once
    first_names = task.clean_input_ids[:, 1]
    assert (first_names == task.correct_ids).any() and (first_names == task.incorrect_ids).any()  # ABBA and BABA


def test_greater_than_corrupts_only_the_year():
    task = make_task("greater_than", TOKENIZER, n=20, seed=2)
    differs = task.clean_input_ids != task.corrupted_input_ids
    assert (differs.sum(1) <= 1).all() and differs[:, 7].sum() >= 19

    def year(i):
        return int(TOKENIZER.convert_ids_to_tokens(int(i)))

    for row in range(20):
        assert year(task.correct_ids[row]) > year(task.clean_input_ids[row, 7]) > year(task.incorrect_ids[row])


def test_docstring_corrupts_only_the_signature():
    task = make_task("docstring", TOKENIZER, n=20, seed=2)
    differs = task.clean_input_ids != task.corrupted_input_ids
    assert differs[:, 10:].sum() == 0 and (differs.sum(1) == 3).all()
    assert (task.clean_input_ids[:, 9] == task.correct_ids).all()


def test_unknown_task_and_multi_token_words():
    with pytest.raises(pahq_fx.TaskError, match="unknown task 'ioi2'"):
        make_task("ioi2", TOKENIZER)
    with pytest.raises(pahq_fx.TaskError, match="not a single known token"):
        single_token_ids(TOKENIZER, ["Zebediah"])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_a_tokenizer_with_only_special_tokens_is_named_as_the_problem(name, tmp_path):
    """What AutoTokenizer gives for a checkpoint folder without tokenizer files: every word would read as unknown."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    empty = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab={"<|endoftext|>": 0}, unk_token="<|endoftext|>")),
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )
    message = r"the tokenizer \(\w+\) has no tokens besides its 1 special one\(s\): .*tokenizer files"
    with pytest.raises(pahq_fx.TaskError, match=message):
        make_task(name, empty)
    lines = tmp_path / "task.jsonl"
    lines.write_text('{"clean": "When Alice went", "corrupted": "When Peter went"}\n')
    with pytest.raises(pahq_fx.TaskError, match=message):
        pahq_fx.Task.from_jsonl(lines, empty)
