"""Tasks written as text: a JSON Lines file of clean/corrupted prompt pairs, tokenized with the model's tokenizer.

One example per line::

    {"clean": "When Mary and John went to the store , John gave a drink to",
     "corrupted": "When Mary and John went to the store , Paul gave a drink to",
     "correct": " Mary", "incorrect": " John"}

``correct`` / ``incorrect`` (one token each) are optional but all-or-none; ``positions`` (token indices,
negative from the end) names where the metric reads, by default the last token. Clean and corrupted prompts of
a line must tokenize to the same length; lines may differ in length: shorter ones are padded on the right,
which a causal model cannot see from the positions the metric reads. Every problem names its line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TaskError

REQUIRED = ("clean", "corrupted")
OPTIONAL = ("correct", "incorrect", "positions")


@dataclass(frozen=True)
class _Example:
    clean: list[int]
    corrupted: list[int]
    positions: list[int]
    correct: int | None
    incorrect: int | None


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer that has nothing but special tokens. ``AutoTokenizer`` returns one for a checkpoint folder
    without tokenizer files (transformers 5 builds an empty tokenizer of the model's family), and every word would
    then read as unknown, which would blame the task's words instead of the missing files."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if len(tokenizer) <= len(special):
        raise TaskError(
            f"the tokenizer ({describe_tokenizer(tokenizer)}) has no tokens besides its {len(special)} special "
            "one(s): the checkpoint folder holds no tokenizer files. Save the tokenizer beside the model "
            "(tokenizer.save_pretrained(folder)), or give a task already tokenized (.safetensors)"
        )


def describe_tokenizer(tokenizer: Any) -> str:
    """The tokenizer's class and where it came from, for errors that may be the tokenizer's fault."""
    origin = getattr(tokenizer, "name_or_path", "")
    return type(tokenizer).__name__ + (f", from {origin}" if origin else "")


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The examples of a JSON Lines task file as checked JSON objects, each with where it stands ("file, line N"),
    before any tokenizer is at hand: every problem of the file itself is a :class:`TaskError` naming its line."""
    path = Path(path)
    if path.is_dir():
        raise TaskError(f"task file {path} is a folder, not a file")
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        content = path.read_bytes()
    except OSError as error:
        raise TaskError(f"task file {path} is unreadable: {error.strerror or error}") from None
    records = []
    for number, raw in enumerate(content.split(b"\n"), start=1):
        where = f"{path.name}, line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TaskError(
                f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1}); save the file as UTF-8"
            ) from None
        if line.strip():
            records.append((where, _record(line, where)))
    if not records:
        raise TaskError(f"task file {path} holds no example")
    return records


def tensors_from_jsonl(path: str | Path, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Read a JSON Lines task file (module docstring) into the tensors of a :class:`~pahq_fx.acdc.task.Task`
    (``clean_input_ids``, ``corrupted_input_ids``, ``metric_mask``, and the answers where the lines give them);
    every problem is a :class:`TaskError`. ``Task.from_jsonl`` builds the task from them."""
    path = Path(path)
    records = read_records(path)
    check_tokenizer(tokenizer)
    examples = [_tokenized(record, tokenizer, where) for where, record in records]
    with_answers = {e.correct is not None for e in examples}
    if len(with_answers) > 1:
        raise TaskError(
            f"{path.name}: some lines give correct/incorrect answers and others do not; give them on every line or none"
        )
    pad = _pad_id(tokenizer)
    length = max(len(e.clean) for e in examples)
    clean = torch.full((len(examples), length), pad, dtype=torch.long)
    corrupted = clean.clone()
    mask = torch.zeros(clean.shape, dtype=torch.bool)
    for row, e in enumerate(examples):
        clean[row, : len(e.clean)] = torch.tensor(e.clean)
        corrupted[row, : len(e.corrupted)] = torch.tensor(e.corrupted)
        mask[row, e.positions] = True
    tensors = {"clean_input_ids": clean, "corrupted_input_ids": corrupted, "metric_mask": mask}
    if with_answers == {True}:
        tensors["correct_ids"] = torch.tensor([e.correct for e in examples])
        tensors["incorrect_ids"] = torch.tensor([e.incorrect for e in examples])
    return tensors


def _record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TaskError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object with 'clean' and 'corrupted', got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise TaskError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise TaskError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} (known: {', '.join(REQUIRED + OPTIONAL)})"
        )
    for key in ("clean", "corrupted", "correct", "incorrect"):
        if key in record and (not isinstance(record[key], str) or not record[key].strip()):
            raise TaskError(f"{where}: {key!r} must be a non-empty string, got {record[key]!r}")
    if ("correct" in record) != ("incorrect" in record):
        raise TaskError(f"{where}: give both 'correct' and 'incorrect', or neither")
    return record


def _tokenized(record: dict[str, Any], tokenizer: Any, where: str) -> _Example:
    clean = _encode(tokenizer, record["clean"], where, "clean", special=True)
    corrupted = _encode(tokenizer, record["corrupted"], where, "corrupted", special=True)
    if len(clean) != len(corrupted):
        raise TaskError(
            f"{where}: clean and corrupted prompts tokenize to different lengths ({len(clean)} vs {len(corrupted)} tokens); "
            "patching needs them aligned token by token"
        )
    positions = _positions(record.get("positions"), len(clean), where)
    correct = incorrect = None
    if "correct" in record:
        correct = _single_token(tokenizer, record["correct"], where, "correct")
        incorrect = _single_token(tokenizer, record["incorrect"], where, "incorrect")
    return _Example(clean, corrupted, positions, correct, incorrect)


def _encode(tokenizer: Any, text: str, where: str, key: str, special: bool) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=special))
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        words = [repr(w) for w in text.split() if unk in tokenizer.encode(w, add_special_tokens=False)] or [repr(text)]
        raise TaskError(f"{where}: {key!r} has word(s) the tokenizer does not know: {', '.join(words)}")
    if not ids:
        raise TaskError(
            f"{where}: {key!r} tokenizes to nothing with the tokenizer {describe_tokenizer(tokenizer)}; "
            "is it the model's tokenizer? (--tokenizer names another)"
        )
    return ids


def _single_token(tokenizer: Any, text: str, where: str, key: str) -> int:
    ids = _encode(tokenizer, text, where, key, special=False)
    if len(ids) != 1:
        raise TaskError(f"{where}: {key!r} answer {text!r} is {len(ids)} tokens; an answer must be exactly one token")
    return ids[0]


def _positions(value: Any, length: int, where: str) -> list[int]:
    if value is None:
        return [length - 1]
    if not isinstance(value, list) or not value or not all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        raise TaskError(f"{where}: 'positions' must be a non-empty list of token indices, got {value!r}")
    out = []
    for p in value:
        if not -length <= p < length:
            raise TaskError(f"{where}: position {p} is outside the prompt's {length} tokens")
        out.append(p % length)
    return out


def _pad_id(tokenizer: Any) -> int:
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0
