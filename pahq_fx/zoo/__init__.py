"""Small trained models shipped with the package, and the loader for them and for any local or hub checkpoint."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import PahqError

ZOO_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    architecture: str
    tasks: tuple[str, ...]
    accuracy: dict[str, float]
    parameters: int
    path: Path
    task_options: dict[str, int]  # generator options the model was trained and measured with (induction: half)


def available() -> dict[str, ZooEntry]:
    """The shipped models, by name."""
    entries = {}
    for info_file in sorted(ZOO_DIR.glob("*/zoo.json")):
        info = json.loads(info_file.read_text())
        entries[info["name"]] = ZooEntry(
            info["name"],
            info["architecture"],
            tuple(info["tasks"]),
            info["accuracy"],
            info["parameters"],
            info_file.parent,
            info.get("task_options", {}),
        )
    return entries


def _source(name_or_path: str) -> tuple[Path, str, dict[str, ZooEntry]]:
    """(local path, what ``from_pretrained`` is given, the shipped models) for a model name, folder or hub id."""
    shipped = available()
    path = shipped[name_or_path].path if name_or_path in shipped else Path(name_or_path)
    if not path.exists() and (name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1):
        raise PahqError(f"model {name_or_path!r}: no such directory")
    return path, str(path) if path.exists() else name_or_path, shipped


def _cannot_load(name_or_path: str, shipped: dict[str, ZooEntry], error: Exception) -> PahqError:
    known = ", ".join(shipped) or "none"
    return PahqError(
        f"cannot load model {name_or_path!r} (shipped models: {known}; otherwise a local checkpoint directory "
        f"or a hub id where the hub is reachable): {str(error).splitlines()[0]}"
    )


def load_tokenizer(name_or_path: str) -> object:
    """The tokenizer of :func:`load`'s model, alone: seconds sooner than the model on a large checkpoint, so that a
    task can be built and checked before the model loads."""
    from transformers import AutoTokenizer

    _, source, shipped = _source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise _cannot_load(name_or_path, shipped, error) from None


def load(name_or_path: str, tokenizer: object | None = None) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) for a shipped model name, a local checkpoint directory, or a hub id
    (``tokenizer``: one :func:`load_tokenizer` gave already, not loaded again).

    A hub id works only where the hub is reachable; every failure is a :class:`PahqError` naming the cause.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path, source, shipped = _source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (SafetensorError, pickle.UnpicklingError) as error:
        files = sorted(p.name for p in path.glob("*") if p.suffix in (".safetensors", ".bin")) if path.is_dir() else []
        weights = f"its weights ({', '.join(files)})" if files else "its weights"
        reason = (
            f"{weights} hold pickled objects besides tensors, which are not loaded (torch.load with "
            "weights_only=True); if you trust the file, convert it to safetensors"
            if isinstance(error, pickle.UnpicklingError)
            else f"{weights} are damaged or truncated: {str(error).splitlines()[0]}"
        )
        raise PahqError(f"cannot load model {name_or_path!r}: {reason}") from None
    except (OSError, ValueError) as error:
        raise _cannot_load(name_or_path, shipped, error) from None
    return model.eval(), tokenizer if tokenizer is not None else load_tokenizer(name_or_path)


@torch.no_grad()
def task_accuracy(model: nn.Module, task, tokenizer) -> float:
    """Fraction of metric positions where the model's top token is the right one.

    With answer tokens: the correct id, or for greater-than any year token above the prompt's year.
    Without: the next clean token (induction).
    """
    logits = model(input_ids=task.clean_input_ids, use_cache=False).logits
    top = logits.argmax(-1)
    if not task.has_answers:
        hits = top[:, :-1] == task.clean_input_ids[:, 1:]
        return float(hits[task.metric_mask[:, :-1]].float().mean())
    predicted = top[:, -1]
    if task.name == "greater_than":
        year_of = {tokenizer.convert_tokens_to_ids(f"{y:02d}"): y for y in range(100)}
        prompt_years = [year_of[int(i)] for i in task.clean_input_ids[:, 7]]
        hits = [year_of.get(int(p), -1) > y for p, y in zip(predicted, prompt_years, strict=True)]
        return sum(hits) / len(hits)
    return float((predicted == task.correct_ids).float().mean())
