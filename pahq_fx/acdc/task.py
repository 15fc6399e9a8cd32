"""A circuit-discovery task: clean and corrupted token ids, the positions the metric reads, answers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import TaskError
from .text_task import tensors_from_jsonl

# Token ids as embeddings and gather take them: an int8/uint8 tensor would wrap large ids, a bool one is no id.
ID_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True, eq=False, init=False)
class Task:
    """Clean ``input_ids`` [N, T], corrupted ``input_ids`` [N, T], a boolean ``metric_mask`` [N, T] of the
    positions the metric reads (default: the last position), and optional answer token ids [N] for
    logit- and probability-difference metrics. Validated on construction."""

    clean_input_ids: torch.Tensor
    corrupted_input_ids: torch.Tensor
    metric_mask: torch.Tensor
    correct_ids: torch.Tensor | None = None
    incorrect_ids: torch.Tensor | None = None
    name: str = "task"

    def __init__(
        self,
        clean_input_ids: torch.Tensor,
        corrupted_input_ids: torch.Tensor,
        metric_mask: torch.Tensor | None = None,
        correct_ids: torch.Tensor | None = None,
        incorrect_ids: torch.Tensor | None = None,
        name: str = "task",
    ) -> None:
        clean, corrupted = clean_input_ids, corrupted_input_ids
        for label, t in (("clean_input_ids", clean), ("corrupted_input_ids", corrupted)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in ID_DTYPES:
                raise TaskError(f"{label} must be an integer tensor (int64 or int32) of shape [N, T], got {_describe(t)}")
        if clean.shape != corrupted.shape:
            raise TaskError(f"clean and corrupted input_ids differ in shape: {tuple(clean.shape)} vs {tuple(corrupted.shape)}")
        if clean.numel() == 0:
            raise TaskError(f"the task is empty (input_ids of shape {tuple(clean.shape)})")
        mask = metric_mask
        if mask is None:
            mask = torch.zeros(clean.shape, dtype=torch.bool, device=clean.device)
            mask[:, -1] = True
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != clean.shape:
            raise TaskError(f"metric_mask must be a bool tensor of shape {tuple(clean.shape)}, got {_describe(mask)}")
        if not mask.any(dim=1).all():
            rows = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise TaskError(f"metric_mask selects no position in example(s) {rows[:10]}")
        if (correct_ids is None) != (incorrect_ids is None):
            raise TaskError("give both correct_ids and incorrect_ids, or neither")
        for label, ids in (("correct_ids", correct_ids), ("incorrect_ids", incorrect_ids)):
            if ids is not None and (
                not isinstance(ids, torch.Tensor) or ids.shape != (clean.shape[0],) or ids.dtype not in ID_DTYPES
            ):
                raise TaskError(
                    f"{label} must be an integer tensor (int64 or int32) of shape [{clean.shape[0]}], got {_describe(ids)}"
                )
        # the fields set as a frozen dataclass's generated __init__ sets them, with the default mask filled in
        for field, value in zip(fields(self), (clean, corrupted, mask, correct_ids, incorrect_ids, name), strict=True):
            object.__setattr__(self, field.name, value)

    @property
    def n_examples(self) -> int:
        return self.clean_input_ids.shape[0]

    @property
    def has_answers(self) -> bool:
        return self.correct_ids is not None

    def answers_at_metric_positions(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Correct and incorrect answer ids for every position the metric reads, in row-major order of
        ``metric_mask`` (the order of ``logits[metric_mask]``); ``(None, None)`` for a task without answers."""
        if self.correct_ids is None or self.incorrect_ids is None:
            return None, None
        rows = self.metric_mask.nonzero()[:, 0]
        return self.correct_ids[rows], self.incorrect_ids[rows]

    def validate_vocab(self, vocab_size: int, max_positions: int | None = None) -> None:
        """Raise :class:`TaskError` if a token id is outside ``[0, vocab_size)``, or the prompts are longer than
        ``max_positions`` (the model's position embeddings)."""
        length = self.clean_input_ids.shape[1]
        if max_positions is not None and length > max_positions:
            raise TaskError(
                f"the task's prompts are {length} tokens long, longer than the model's {max_positions} "
                "positions; use shorter prompts"
            )
        for label, t in self._tensors().items():
            if label == "metric_mask":
                continue
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= vocab_size:
                raise TaskError(
                    f"{label} holds token id {high if high >= vocab_size else low} outside the vocabulary [0, {vocab_size})"
                )

    def fingerprint(self) -> str:
        """A hash of the task's contents, to recognise it in checkpoints and reports."""
        digest = hashlib.sha256()
        for label, t in sorted(self._tensors().items()):
            digest.update(label.encode())
            digest.update(t.to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "clean_input_ids": self.clean_input_ids,
            "corrupted_input_ids": self.corrupted_input_ids,
            "metric_mask": self.metric_mask,
        }
        if self.correct_ids is not None and self.incorrect_ids is not None:
            tensors.update(correct_ids=self.correct_ids, incorrect_ids=self.incorrect_ids)
        return tensors

    def to(self, device: str | torch.device) -> Task:
        """The same task with its tensors on ``device``: a search runs where the task's ids are."""
        correct, incorrect = self.correct_ids, self.incorrect_ids
        return Task(
            self.clean_input_ids.to(device),
            self.corrupted_input_ids.to(device),
            self.metric_mask.to(device),
            None if correct is None else correct.to(device),
            None if incorrect is None else incorrect.to(device),
            self.name,
        )

    def save(self, path: str | Path) -> None:
        """Write the task as safetensors (the name goes into the metadata)."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self._tensors().items()}
        save_file(tensors, str(path), metadata={"name": self.name, "format": "pahq_fx.Task/1"})

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Any, name: str | None = None) -> Task:
        """A task from a JSON Lines file of prompt pairs, tokenized with ``tokenizer`` (format:
        :mod:`pahq_fx.acdc.text_task`); every problem is a :class:`TaskError` naming the line."""
        return cls(**tensors_from_jsonl(path, tokenizer), name=name or Path(path).stem)

    @classmethod
    def load(cls, path: str | Path) -> Task:
        """Read a task written by :meth:`save`; every problem is a :class:`TaskError`."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = Path(path)
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open handle is not iterable
        except (SafetensorError, OSError, ValueError) as error:
            raise TaskError(f"task file {path} is not a readable safetensors file: {error}") from None
        missing = {"clean_input_ids", "corrupted_input_ids"} - tensors.keys()
        if missing:
            raise TaskError(f"task file {path} lacks {', '.join(sorted(missing))}")
        return cls(
            tensors["clean_input_ids"],
            tensors["corrupted_input_ids"],
            tensors.get("metric_mask"),
            tensors.get("correct_ids"),
            tensors.get("incorrect_ids"),
            name=metadata.get("name", path.stem),
        )


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
