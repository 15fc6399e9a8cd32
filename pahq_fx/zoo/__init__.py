"""Small trained models shipped with the package, and the loader for them and for any local or hub checkpoint."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import PahqError

if TYPE_CHECKING:
    from ..acdc.task import Task

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


def _cannot_load(name_or_path: str, shipped: dict[str, ZooEntry], error: Exception, what: str = "model") -> PahqError:
    known = ", ".join(shipped) or "none"
    hint = "; --tokenizer names another tokenizer" if what == "tokenizer" else ""
    return PahqError(
        f"cannot load {what} {name_or_path!r} (shipped models: {known}; otherwise a local checkpoint directory "
        f"or a hub id where the hub is reachable): {str(error).splitlines()[0].strip()}{hint}"
    )


def check_device(spec: str | torch.device) -> torch.device:
    """``spec`` as a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``...): a mistyped or absent
    device is one line before anything loads, not an error from inside the first forward."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise PahqError(f"device {str(spec)!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cpu":
        return device
    found = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if found is None or found.type != device.type:
        here = f"only {found.type} and cpu" if found is not None else "only cpu"
        raise PahqError(f"device {str(spec)!r} is not available: this machine has {here} (as torch {torch.__version__} sees it)")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise PahqError(
            f"device {str(spec)!r} is not available: this machine has {count} {device.type} device(s), 0 to {count - 1}"
        )
    return device


def load_tokenizer(name_or_path: str) -> object:
    """The tokenizer of :func:`load`'s model (or any tokenizer folder, shipped model or hub id), alone: seconds
    sooner than the model on a large checkpoint, so that a task can be built and checked before the model loads.

    A folder whose ``tokenizer.json`` ``AutoTokenizer`` turns into another kind of tokenizer (transformers 5 builds
    a ``GPT2Tokenizer``'s byte-level BPE afresh, whatever model the file holds, and a saved word-level vocabulary
    then encodes every prompt to nothing) is loaded from the file as it was saved instead."""
    from transformers import AutoTokenizer

    path, source, shipped = _source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise _cannot_load(name_or_path, shipped, error, "tokenizer") from None
    saved = path / "tokenizer.json" if path.is_dir() else None
    if saved is not None and saved.is_file() and _model_type(saved) != _backend_type(tokenizer):
        return _from_file(saved, name_or_path)
    return tokenizer


def _model_type(tokenizer_json: Path) -> str | None:
    """The tokenization model a ``tokenizer.json`` holds (``BPE``, ``WordLevel``, ``Unigram``...)."""
    try:
        return json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _backend_type(tokenizer: object) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else type(backend.model).__name__


def _from_file(tokenizer_json: Path, name_or_path: str) -> object:
    """The tokenizer exactly as ``tokenizer.json`` holds it, with the special tokens ``tokenizer_config.json`` names
    that its vocabulary has (a class's default, such as GPT-2's ``<|endoftext|>``, would otherwise be added as a new
    token the model has no embedding for)."""
    from transformers import PreTrainedTokenizerFast

    config_file = tokenizer_json.with_name("tokenizer_config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (OSError, ValueError) as error:
        raise PahqError(f"cannot load tokenizer {name_or_path!r}: {config_file.name} is not JSON ({error})") from None
    vocabulary = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json)).get_vocab()
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str) and v in vocabulary}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **special)
    tokenizer.name_or_path = name_or_path
    return tokenizer


def load(
    name_or_path: str, tokenizer: object | None = None, *, device: str | torch.device | None = None
) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) for a shipped model name, a local checkpoint directory, or a hub id
    (``tokenizer``: one :func:`load_tokenizer` gave already, not loaded again), on ``device`` (default the CPU;
    :func:`check_device`), where low-precision formats the CPU lacks (FP8 on a GPU) become reachable.

    A hub id works only where the hub is reachable; every failure is a :class:`PahqError` naming the cause.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    target = None if device is None else check_device(device)
    path, source, shipped = _source(name_or_path)
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
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
    if target is not None:
        model = model.to(target)
    return model.eval(), tokenizer if tokenizer is not None else load_tokenizer(name_or_path)


@torch.no_grad()
def task_accuracy(model: nn.Module, task: Task, tokenizer: Any) -> float:
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
