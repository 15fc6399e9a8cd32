"""The weight dtype policy: which parameter dtypes the passes take (float32, or wider with a note), and finite values."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import NonFiniteError, UnsupportedFormatError


def check_float32_weights(weights: Iterable[torch.Tensor]) -> None:
    """Refuse weights (a model's parameters) in a half-precision or 8-bit float format, naming it and the remedy.

    The investigated head, the FP32 layers of ACDC's plan and the split's check against the original all compute in
    float32, and the low-precision formats are the pass's to apply (``precision=...``): a model loaded in bf16
    would compute its "FP32" head in bf16 and fail the split's float32-tolerance check with a misleading message.
    Buffers are not weights: a float32 model may keep one in bf16 on purpose (RecurrentGemma's embedding scale)."""
    low = sorted(name for name, width in _float_dtypes(weights).items() if width < 4)
    if low:
        raise UnsupportedFormatError(
            f"the model's weights are {' and '.join(low)}: pahq_fx keeps the investigated head in float32 and lowers the "
            "other heads itself (precision=...), so it takes a float32 model; load it with dtype=torch.float32 or "
            "call model.float() first (bf16 and fp16 weights convert to float32 exactly)"
        )


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite parameter, naming the first: its logits would be NaN, and every later
    check (the split's, the task's) would blame something else."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
                kind = "NaN" if bool(torch.isnan(weight).any()) else "infinite"
                raise NonFiniteError(
                    f"the model's parameter {name} holds {kind} values; the checkpoint is damaged "
                    "or the model diverged in training"
                )


def wide_weights_note(weights: Iterable[torch.Tensor]) -> str:
    """What "fp32" means for weights (a model's parameters) wider than float32, or "" for none: the pass lowers the
    formats it is asked for and leaves the rest (the investigated head, the FP32 format) in the model's own dtype."""
    wide = " and ".join(sorted(name for name, width in _float_dtypes(weights).items() if width > 4))
    if not wide:
        return ""
    return (
        f"the model's weights are {wide}: the investigated head and every head or layer the format does not lower "
        f"compute in {wide}, not float32"
    )


def _float_dtypes(weights: Iterable[torch.Tensor]) -> dict[str, int]:
    """Each floating dtype among ``weights``, by name (``bfloat16``), with its width in bytes."""
    return {str(w.dtype).removeprefix("torch."): w.element_size() for w in weights if w.is_floating_point()}
