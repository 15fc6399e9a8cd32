"""Causal attention without a materialised mask, for traces at a fixed sequence length.

Under ``torch.export`` Hugging Face models build their causal mask op by op (position ids, a packed-sequence check,
the mask function broadcast over batch, query and key positions): about a fifth of the export's time on a small
GPT-2 and a quarter of its nodes, only to feed SDPA a lower-triangular mask that its ``is_causal`` flag expresses
for free. Outside a trace transformers skips the mask itself; under one it must not, since an exported graph may
meet other lengths or a cache. ACDC's traces fix the sequence length and never use a cache, so the question can be
answered once, on the example, by running the model eagerly:

1. with an attention function that records every mask it is given (masks built as for ``"sdpa"``), whether each
   call's mask is absent or exactly the causal pattern and the call itself causal;
2. if so, with :data:`CAUSAL_SDPA`, an implementation that transformers builds no mask for (it is registered as an
   attention function only), whose logits must then match the first run's: a layer that bypasses the attention
   interface and needed the mask would differ.

Only then is the model traced with :data:`CAUSAL_SDPA`; anything else (a sliding window shorter than the sequence,
a padding mask, ALiBi biases, a model that cannot switch its attention implementation) keeps the usual masked trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..model_io import model_logits

CAUSAL_SDPA = "pahq_fx_causal_sdpa"
_MASK_PROBE = "pahq_fx_mask_probe"


def _is_causal_pattern(mask: torch.Tensor) -> bool:
    """Whether an SDPA mask ([..., q, kv]) allows exactly the causal positions: a boolean mask equal to the lower
    triangle, or an additive one that is 0 there and at most half the dtype's minimum elsewhere."""
    q, kv = mask.shape[-2:]
    if q != kv:
        return False
    causal = torch.ones(q, kv, dtype=torch.bool, device=mask.device).tril().expand(mask.shape)
    if mask.dtype == torch.bool:
        return torch.equal(mask, causal)
    blocked = torch.finfo(mask.dtype).min / 2
    return torch.equal(mask == 0, causal) and bool((mask[~causal] <= blocked).all())


class _MaskRecorder:
    """An SDPA attention function that notes, per call, whether dropping its mask for ``is_causal`` is exact."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        causal_call = kwargs.get("is_causal")
        causal_call = getattr(module, "is_causal", True) if causal_call is None else causal_call
        exact = attention_mask is None or (
            bool(causal_call) and kwargs.get("position_bias") is None and _is_causal_pattern(attention_mask)
        )
        self.calls.append(exact)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@runtime_checkable
class SwitchesAttention(Protocol):
    """A model whose attention implementation can be switched (a Hugging Face ``PreTrainedModel``)."""

    def set_attn_implementation(self, implementation: str) -> None: ...


def _switched(model: nn.Module, implementation: str) -> bool:
    """Switch the model's attention implementation; whether it took (models outside the attention interface only
    log a warning)."""
    if not isinstance(model, SwitchesAttention):
        return False
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError, AttributeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == implementation


def _mask_free_is_exact(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Steps 1 and 2 of the module's docstring; leaves the model on :data:`CAUSAL_SDPA` when it answers True."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    recorder = _MaskRecorder()
    AttentionInterface.register(_MASK_PROBE, recorder)
    AttentionMaskInterface.register(_MASK_PROBE, sdpa_mask)
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    if not _switched(model, _MASK_PROBE):
        return False
    masked = model_logits(model, input_ids)
    if not recorder.calls or not all(recorder.calls) or not _switched(model, CAUSAL_SDPA):
        return False
    unmasked = model_logits(model, input_ids)
    tolerance = 64 * torch.finfo(masked.dtype).eps * float(masked.abs().max())
    return masked.shape == unmasked.shape and bool(((masked - unmasked).abs() <= tolerance).all())


@contextlib.contextmanager
def mask_free_attention(model: nn.Module, input_ids: torch.Tensor) -> Iterator[bool]:
    """Within: the model on :data:`CAUSAL_SDPA` where that is exact at ``input_ids``'s shape (yields whether it
    is). Expects a model already on ``"sdpa"`` (the trace's setup) and restores that on exit."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa" or not hasattr(
        model, "set_attn_implementation"
    ):
        yield False
        return
    try:
        try:
            with torch.no_grad():
                exact = _mask_free_is_exact(model, input_ids)
        # An eager forward can fail where the export does not: Dots3-Note's attention indexes the mask that
        # transformers skips outside a trace. The masked trace then decides, and reports its own errors.
        except Exception:
            exact = False
        if not exact:
            _switched(model, "sdpa")
        yield exact
    finally:
        _switched(model, "sdpa")
