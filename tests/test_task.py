"""Task validation, and the safetensors file format."""

import pytest
import torch

import pahq_fx
from tests.builders import Spec, build, token_ids


def test_default_mask_is_last_position_and_roundtrip(tmp_path):
    task = pahq_fx.Task(
        token_ids(3, 5),
        token_ids(3, 5, seed=2),
        correct_ids=torch.tensor([1, 2, 3]),
        incorrect_ids=torch.tensor([3, 2, 1]),
        name="demo",
    )
    assert task.metric_mask.sum() == 3 and task.metric_mask[:, -1].all()
    task.save(tmp_path / "t.safetensors")
    loaded = pahq_fx.Task.load(tmp_path / "t.safetensors")
    assert loaded.name == "demo" and loaded.fingerprint() == task.fingerprint()
    assert torch.equal(loaded.correct_ids, task.correct_ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(clean_input_ids=token_ids(3, 5), corrupted_input_ids=token_ids(3, 6)), "differ in shape"),
        (
            dict(clean_input_ids=torch.zeros(0, 5, dtype=torch.long), corrupted_input_ids=torch.zeros(0, 5, dtype=torch.long)),
            "empty",
        ),
        (dict(clean_input_ids=torch.randn(3, 5), corrupted_input_ids=token_ids(3, 5)), "integer tensor"),
        (
            dict(
                clean_input_ids=token_ids(3, 5),
                corrupted_input_ids=token_ids(3, 5),
                metric_mask=torch.zeros(3, 5, dtype=torch.bool),
            ),
            "selects no position",
        ),
        (
            dict(
                clean_input_ids=token_ids(3, 5),
                corrupted_input_ids=token_ids(3, 5),
                metric_mask=torch.ones(3, 4, dtype=torch.bool),
            ),
            "metric_mask must be a bool tensor",
        ),
        (
            dict(clean_input_ids=token_ids(3, 5), corrupted_input_ids=token_ids(3, 5), correct_ids=torch.tensor([1, 2, 3])),
            "both correct_ids and incorrect_ids",
        ),
        (
            dict(
                clean_input_ids=token_ids(3, 5),
                corrupted_input_ids=token_ids(3, 5),
                correct_ids=torch.tensor([1, 2]),
                incorrect_ids=torch.tensor([1, 2]),
            ),
            r"shape \[3\]",
        ),
    ],
)
def test_invalid_task(kwargs, message):
    with pytest.raises(pahq_fx.TaskError, match=message):
        pahq_fx.Task(**kwargs)


def test_token_outside_vocabulary_is_rejected_before_discovery():
    model = build(Spec("gpt2", 1, 2, 2, 8))
    task = pahq_fx.Task(token_ids(2, 4) + 100, token_ids(2, 4))
    with pytest.raises(pahq_fx.TaskError, match="outside the vocabulary"):
        pahq_fx.discover(model, task, threshold=0.1, progress=False)


def test_malformed_task_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(pahq_fx.TaskError, match="not a readable safetensors file"):
        pahq_fx.Task.load(garbage)
    with pytest.raises(pahq_fx.TaskError, match="does not exist"):
        pahq_fx.Task.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({"clean_input_ids": token_ids(2, 3)}, str(partial))
    with pytest.raises(pahq_fx.TaskError, match="lacks corrupted_input_ids"):
        pahq_fx.Task.load(partial)
