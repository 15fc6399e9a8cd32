"""What a run records about where it ran: the model's identity, library versions, peak memory, one eager forward."""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from typing import Any

import torch
from torch import nn

from ..model_io import as_traced


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Class, name and a fingerprint of the weights (to recognise the model in checkpoints and reports)."""
    digest = hashlib.sha256()
    n_params = 0
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            digest.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}{float(p.double().abs().sum()):.10e}".encode())
            n_params += p.numel()
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "parameters": n_params,
        "fingerprint": digest.hexdigest()[:16],
    }


def library_versions() -> dict[str, str]:
    import torchao
    import transformers

    from .. import __version__

    return {
        "pahq_fx": __version__,
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def eager_forward_seconds(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5, warm_up: bool = True) -> list[float]:
    """Times of ``repeats`` eager forwards of the original model on ``input_ids``, after one untimed warm-up unless
    the caller has just run the model (``warm_up=False``): the unit of forward-equivalents is their median."""
    call = as_traced(model)  # built once, outside the timed calls
    times = []
    for _ in range(repeats + warm_up):
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        start = time.perf_counter()
        call(input_ids)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        times.append(time.perf_counter() - start)
    return times[warm_up:]
