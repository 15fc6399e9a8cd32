"""Calling a model and reading its inputs: how the trace, the task check and the transformed model call a causal LM
(no KV cache, logits only), the ways users pass ``input_ids``, and the limits a model sets on them (vocabulary,
positions). Shared by the trace, the passes and ACDC, so that none of them imports another for these."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputsError


class LogitsOnly(nn.Module):
    """Calls a causal LM the way ACDC needs it: no KV cache, logits only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


class TensorOutputs(nn.Module):
    """Calls a module that is not a Hugging Face model on ``input_ids`` alone, keeping the tensors of a tuple it
    returns: nanoGPT returns ``(logits, None)`` without targets, and a ``None`` is nothing the passes can split."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.model(input_ids)
        if not isinstance(out, (tuple, list)):
            return out
        tensors = tuple(t for t in out if t is not None)
        return tensors[0] if len(tensors) == 1 else tensors


def as_traced(model: nn.Module) -> nn.Module:
    """``model`` called the way :func:`trace` calls it: a Hugging Face model (one with a ``config``) through
    :class:`LogitsOnly`, any other module through :class:`TensorOutputs`."""
    return LogitsOnly(model) if hasattr(model, "config") else TensorOutputs(model)


def model_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``model`` on ``input_ids`` (:func:`as_traced`; the first tensor where it returns several)."""
    out = as_traced(model)(input_ids)
    return out[0] if isinstance(out, tuple) else out


ExampleInputs = torch.Tensor | tuple | list | Mapping[str, Any]


def input_ids_from(inputs: ExampleInputs, what: str = "example_inputs") -> torch.Tensor:
    """The ``input_ids`` tensor of inputs given the ways PyTorch and Hugging Face users pass them.

    Accepts a tensor, a tuple or list of positional arguments whose first is ``input_ids`` (the
    ``torch.export`` convention, ``(ids,)``), and a dict or tokenizer ``BatchEncoding`` with an ``input_ids``
    entry. The graph runs on the ids alone: an ``attention_mask`` must mask nothing, token types must be 0, and other
    entries (or a tuple's inputs after the first, unless None) are refused rather than dropped.
    """
    ids: Any = inputs
    if isinstance(inputs, (tuple, list)):
        if not inputs:
            raise InvalidInputsError(f"{what} is an empty {type(inputs).__name__}; pass (input_ids,)")
        if any(x is not None for x in inputs[1:]):
            raise InvalidInputsError(
                f"{what} is a {type(inputs).__name__} of {len(inputs)} positional inputs; the graph takes input_ids "
                "alone, and what the others mean depends on the model's forward: pass (input_ids,), or a dict with "
                "input_ids and an attention_mask"
            )
        ids = inputs[0]
    elif not isinstance(inputs, torch.Tensor) and (
        isinstance(inputs, Mapping) or (hasattr(inputs, "keys") and hasattr(inputs, "__getitem__"))
    ):
        if "input_ids" not in inputs:
            raise InvalidInputsError(f"{what} has no 'input_ids' entry (it has {sorted(inputs.keys())})")
        ids = inputs["input_ids"]
        _refuse_other_entries(inputs, what)
    if not isinstance(ids, torch.Tensor):
        raise InvalidInputsError(f"{what}: input_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InvalidInputsError(
            f"{what}: input_ids must be integer token ids, got a {ids.dtype} tensor (embeddings are not accepted)"
        )
    if ids.dtype not in (torch.int64, torch.int32):
        raise InvalidInputsError(
            f"{what}: input_ids must be int64 or int32 token ids, got a {ids.dtype} tensor; convert them with .long()"
        )
    if ids.dim() == 1:
        raise InvalidInputsError(f"{what}: input_ids have shape {tuple(ids.shape)}; add the batch dimension ([1, seq])")
    if ids.dim() != 2:
        raise InvalidInputsError(f"{what}: input_ids must have shape [batch, seq], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InvalidInputsError(
            f"{what}: input_ids have shape {tuple(ids.shape)}: {'no prompt' if ids.shape[0] == 0 else 'prompts without a token'}"
        )
    low = int(ids.min())
    if low < 0:
        raise InvalidInputsError(f"{what}: input_ids hold the negative token id {low}")
    _refuse_padding(inputs, ids, what)
    return ids


def _refuse_padding(inputs: Any, ids: torch.Tensor, what: str) -> None:
    """An ``attention_mask`` passed with the ids must mask nothing: the traced graph takes ``input_ids`` alone, so a
    padded batch would attend to its padding and give other logits than ``model(**encoding)``."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) or hasattr(inputs, "get") else None
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InvalidInputsError(
            f"{what}: the attention_mask must be a [batch, seq] tensor like input_ids {tuple(ids.shape)}, got {shape}"
        )
    if not bool(mask.bool().all()):
        raise InvalidInputsError(
            f"{what}: the attention_mask marks padding, which pahq_fx cannot honour (its graph takes input_ids alone, "
            "and the padded rows would attend to the padding); pass prompts of one length without padding "
            "(tokenize without padding=True, or one prompt per call)"
        )


# Entries of a dict or BatchEncoding besides input_ids that may come with it, checked rather than used: a mask
# that masks nothing, and token types that are all 0 (what tokenizers of causal LMs give where they give any).
_CHECKED_ENTRIES = ("input_ids", "attention_mask", "token_type_ids")


def _refuse_other_entries(inputs: Any, what: str) -> None:
    """Entries the traced graph would drop (``position_ids``, ``inputs_embeds``, a cache...) change the logits: one
    given is an error, never ignored; so are token types other than 0."""
    others = sorted(str(k) for k in inputs.keys() if k not in _CHECKED_ENTRIES and inputs[k] is not None)  # noqa: SIM118
    if others:
        raise InvalidInputsError(
            f"{what} has entries the graph does not take ({', '.join(others)}): it runs on input_ids alone; "
            "pass input_ids (and an attention_mask that masks nothing) only"
        )
    types = inputs.get("token_type_ids") if hasattr(inputs, "get") else None
    if isinstance(types, torch.Tensor) and bool(types.any()):
        raise InvalidInputsError(f"{what}: token_type_ids other than 0 are not used by the graph; pass input_ids only")


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's config allows (its position embeddings), or None where it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def id_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary size, maximum positions) of a Hugging Face model's config; None for what it does not say."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return (vocab if isinstance(vocab, int) and vocab > 0 else None), max_positions(model)


def check_ids_fit(ids: torch.Tensor, limits: tuple[int | None, int | None], what: str = "input") -> None:
    """Token ids inside the vocabulary and prompts within the model's positions (``limits``: :func:`id_limits`)."""
    vocab, positions = limits
    if vocab is not None:
        high = int(ids.max())
        if high >= vocab:
            raise InvalidInputsError(f"{what}: input_ids hold the token id {high}, outside the model's vocabulary [0, {vocab})")
    if positions is not None and ids.shape[1] > positions:
        raise InvalidInputsError(
            f"{what}: input_ids are {ids.shape[1]} tokens long, longer than the model's {positions} positions"
        )


def default_example_inputs(model: nn.Module, batch: int = 2, seq: int = 6) -> torch.Tensor:
    """Token ids that any config accepts: small, inside the vocabulary and the position range."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or seq
    seq = max(2, min(seq, int(max_pos)))
    generator = torch.Generator().manual_seed(0)
    device = next(iter(model.parameters())).device
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
