"""Memory sizes as people write them (``20GiB``, ``80GB``, ``1.5e9``), read without importing torch, so that the
command line refuses a bad ``--max-memory`` before the model loads."""

from __future__ import annotations

import math
import re

from .errors import PlanError

_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]?i?b?)\s*")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str | float) -> int:
    """``20GiB``, ``20GB``, ``512MiB``, ``1.5e9``: a positive whole number of bytes; anything else (zero, a negative or
    non-finite size, an unknown unit) is a :class:`PlanError` saying how to write one."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise PlanError(f"not a memory size: {text!r} (say 20GiB, 80GB, 512MiB)")
    if isinstance(text, str):
        match = _SIZE.fullmatch(text.lower())
        if not match or match.group(2).rstrip("b") not in _SCALE:
            raise PlanError(f"not a memory size: {text!r} (say 20GiB, 80GB, 512MiB)")
        value = float(match.group(1)) * _SCALE[match.group(2).rstrip("b")]
    else:
        value = float(text)
    if not math.isfinite(value) or value < 1:
        raise PlanError(f"a memory size must be at least one byte and finite, got {text!r} (say 20GiB, 80GB, 512MiB)")
    return int(value)
