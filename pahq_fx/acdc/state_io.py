"""The patching runtime's state as one safetensors file and back: a resume loads it instead of replaying every
decision (:mod:`.checkpoint`).

What the state is, is :meth:`PatchingRuntime.reset`'s list: sender outputs, receiver inputs (none where they are
recomputed: the streams they are rebuilt from are a function of the rest), per-head projections,
the final read, the metric, the running steps, the plan, the row-only steps and the removed edges. Object identity
is part of it and is kept: an output still equal to its clean cache is that cache (``outputs[s] is clean[s]``), an
input still equal to its step's clean read is that read, and receivers that share one input tensor (every q/k/v input
of a layer in a dense circuit) share one tensor again, so a resumed runtime takes the same code paths, bit for bit.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors.torch import load, save

from ..errors import CheckpointError
from ..passes.precision import FullPrecisionUnits
from .runtime import PatchingRuntime
from .storage import ScaledFp8, Stored

# /2: bf16 and FP8 storage hold the clean reads rounded and run setup from them, so a /1 file's outputs belong to
# another clean run (a resume replays its decisions instead).
STATE_FORMAT = "pahq_fx.acdc.state/2"
_CLEAN = "clean"  # an output that is its clean cache
_READ = "read:"  # an input that is its step's clean read


class StateMismatch(CheckpointError):
    """A state file that does not fit this runtime (another model, another version): it is never half-used."""


class _Writer:
    """Tensors by name, each distinct object once, none sharing memory with another (safetensors requires it)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}
        self._storages: set[int] = set()

    def name(self, x: torch.Tensor) -> str:
        key = id(x)
        if key not in self._names:
            x = x.cpu()  # safetensors writes from host memory; a device tensor gets a host copy of its own
            storage = x.untyped_storage()
            whole = x.is_contiguous() and x.storage_offset() == 0 and storage.nbytes() == x.numel() * x.element_size()
            if not whole or storage.data_ptr() in self._storages:  # a view (a head of its step's output): its own copy
                x = x.clone(memory_format=torch.contiguous_format)
            self._storages.add(x.untyped_storage().data_ptr())
            self._names[key] = f"t{len(self.tensors)}"
            self.tensors[self._names[key]] = x
        return self._names[key]


def encode(runtime: PatchingRuntime) -> bytes:
    """The runtime's state as the bytes of a safetensors file; called between receivers, when nothing is tentative."""
    writer = _Writer()
    reads = {id(x): k for k, x in enumerate(runtime.clean_reads)}

    def output(s: int, stored: Stored) -> str | list[str]:
        if stored is runtime.clean[s]:
            return _CLEAN
        if isinstance(stored, ScaledFp8):
            return [writer.name(stored.data), writer.name(stored.scale)]
        return writer.name(stored)

    def input_(x: torch.Tensor | None) -> str | None:
        if x is None:
            return None
        return f"{_READ}{reads[id(x)]}" if id(x) in reads else writer.name(x)

    outputs = [output(s, stored) for s, stored in enumerate(runtime.outputs)]
    layout = {
        "format": STATE_FORMAT,
        "storage": runtime.storage.value,
        "receiver_inputs": runtime.receiver_inputs.value,
        "outputs": outputs,
        "inputs": [input_(x) for x in runtime.inputs],
        "projections": {str(k): writer.name(p) for k, p in runtime.projections.items()},
        "final": writer.name(runtime.final),
        "metric": runtime.metric,
        "active_from": runtime.active_from,
        "plan": {str(k): [u.query_head, u.kv_group] for k, u in runtime.plan.items()},
        "rows_only": sorted(runtime.rows_only),
        "removed_from": runtime.edge_state.removed_from,
    }
    return save(writer.tensors, metadata={"layout": json.dumps(layout)})


def restore(runtime: PatchingRuntime, data: bytes) -> None:
    """Make the state saved by :func:`encode` the runtime's. Everything is read and checked first: a file that does
    not fit is a :class:`StateMismatch` and leaves the runtime untouched."""
    try:
        tensors = load(data)
        layout = json.loads(_metadata(data))
    except Exception as error:  # safetensors' own errors: a damaged file is refused, whatever it raises
        raise StateMismatch(f"the state file is unreadable: {error}") from None
    _check_fields(runtime, layout)
    _check_layout(runtime, layout, tensors)
    device = runtime.device
    moved = {name: t.to(device) for name, t in tensors.items()}

    def output(s: int, ref: str | list[str]) -> Stored:
        if ref == _CLEAN:
            return runtime.clean[s]
        if isinstance(ref, list):
            return ScaledFp8(moved[ref[0]], moved[ref[1]])
        return moved[ref]

    def input_(ref: str | None) -> torch.Tensor | None:
        if ref is None:
            return None
        return runtime.clean_reads[int(ref[len(_READ) :])] if ref.startswith(_READ) else moved[ref]

    outputs = [output(s, ref) for s, ref in enumerate(layout["outputs"])]
    inputs = [input_(ref) for ref in layout["inputs"]]
    runtime.reset()
    runtime.outputs, runtime.inputs = outputs, inputs
    runtime.projections = {int(k): moved[name] for k, name in layout["projections"].items()}
    runtime.final, runtime.metric = moved[layout["final"]], float(layout["metric"])
    runtime.active_from, runtime.rows_only = int(layout["active_from"]), set(layout["rows_only"])
    runtime.plan = {int(k): FullPrecisionUnits(q, kv) for k, (q, kv) in layout["plan"].items()}
    for row, senders in enumerate(layout["removed_from"]):
        runtime.edge_state.mark_removed(row, senders)


def removed_edges(data: bytes) -> set[tuple[int, int]]:
    """The removed edges a state file holds, to check it against the checkpoint's decisions."""
    try:
        layout = json.loads(_metadata(data))
        return {(row, s) for row, senders in enumerate(layout["removed_from"]) for s in senders}
    except (ValueError, KeyError, TypeError) as error:
        raise StateMismatch(f"the state file is unreadable: {error}") from None


def _metadata(data: bytes) -> str:
    """The layout JSON from a safetensors file's header (safetensors' own loader drops the metadata)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]["layout"]


def _check_fields(runtime: PatchingRuntime, layout: Any) -> None:
    """Every field of the layout of the type :func:`encode` writes, each index within this runtime: a file edited by
    hand (its SHA-256 recomputed in the checkpoint) is refused, never half-restored into a runtime that fails later."""
    if not isinstance(layout, dict) or layout.get("format") != STATE_FORMAT:
        raise StateMismatch("the state file was written by another version of pahq_fx")
    steps, senders = len(runtime.steps), len(runtime.clean)

    def index(value: Any, end: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < end

    def step_key(key: Any) -> bool:
        return isinstance(key, str) and key.isdigit() and int(key) < steps

    checks = {
        "outputs": lambda v: (
            isinstance(v, list)
            and all(r == _CLEAN or isinstance(r, str) or (isinstance(r, list) and all(isinstance(p, str) for p in r)) for r in v)
        ),
        "inputs": lambda v: isinstance(v, list) and all(r is None or isinstance(r, str) for r in v),
        "projections": lambda v: isinstance(v, dict) and all(step_key(k) and isinstance(n, str) for k, n in v.items()),
        "final": lambda v: isinstance(v, str),
        "metric": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "active_from": lambda v: index(v, steps + 1),
        "plan": lambda v: isinstance(v, dict) and all(step_key(k) and _units(u) for k, u in v.items()),
        "rows_only": lambda v: isinstance(v, list) and all(index(k, steps) for k in v),
        "removed_from": lambda v: (
            isinstance(v, list) and all(isinstance(row, list) and all(index(s, senders) for s in row) for row in v)
        ),
    }
    for field, valid in checks.items():
        if field not in layout or not valid(layout[field]):
            raise StateMismatch(f"the state file's {field} is not what pahq_fx writes")
    for ref in layout["inputs"]:
        if ref is not None and ref.startswith(_READ) and not ref[len(_READ) :].isdigit():
            raise StateMismatch("the state file's inputs are not what pahq_fx writes")


def _units(value: Any) -> bool:
    """A plan entry: [query head, key/value group], each an index or NO_HEAD."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _fits(x: torch.Tensor, like: torch.Tensor, rows: int) -> bool:
    """``x`` has ``like``'s dtype and shape, or the shape ``like`` has at the final read's ``rows`` (a rows-only step)."""
    return x.dtype == like.dtype and tuple(x.shape) in (tuple(like.shape), (*like.shape[:-3], rows, like.shape[-1]))


def _check_layout(runtime: PatchingRuntime, layout: Any, tensors: dict[str, torch.Tensor]) -> None:
    """The layout was written by this version for a runtime of this shape, and every tensor it names exists (outputs
    with the dtypes and shapes the runtime stores, inputs, projections and the final read with the stream's)."""
    rows = len(runtime.final_rows)
    if layout.get("storage") != runtime.storage.value:
        raise StateMismatch(f"the state file holds {layout.get('storage')} storage, this run {runtime.storage.value}")
    mode = layout.get("receiver_inputs", "stored")  # files written before the choice hold stored inputs
    if mode != runtime.receiver_inputs.value:
        raise StateMismatch(f"the state file holds {mode} receiver inputs, this run {runtime.receiver_inputs.value} ones")
    sizes = (len(layout["outputs"]), len(layout["inputs"]), len(layout["removed_from"]))
    if sizes != (len(runtime.clean), len(runtime.inputs), len(runtime.inputs)):
        raise StateMismatch("the state file belongs to a model with other edges")
    for s, ref in enumerate(layout["outputs"]):
        if ref == _CLEAN:
            continue
        clean = runtime.codec.tensors(runtime.clean[s])
        parts = ref if isinstance(ref, list) else [ref]
        if len(parts) != len(clean) or any(
            p not in tensors or not _fits(tensors[p], c, rows) for p, c in zip(parts, clean, strict=False)
        ):
            raise StateMismatch(f"the state file's output of sender {s} does not fit this model")
    read = runtime.clean_read(0)
    for row, ref in enumerate(layout["inputs"]):
        if ref is None:
            continue
        if ref.startswith(_READ) and int(ref[len(_READ) :]) != runtime.index.row_step[row]:
            raise StateMismatch("the state file gives a receiver the clean read of a step other than its own")
        if not ref.startswith(_READ) and (ref not in tensors or not _fits(tensors[ref], read, rows)):
            raise StateMismatch("the state file's receiver inputs do not fit this model")
    if any(name not in tensors for name in (*layout["projections"].values(), layout["final"])):
        raise StateMismatch("the state file lacks tensors its layout names")
    final = tensors[layout["final"]]
    if final.dtype != runtime.final.dtype or final.shape != runtime.final.shape:
        raise StateMismatch("the state file's final read does not fit this model")
    for name in layout["projections"].values():
        x = tensors[name]
        if x.dtype != read.dtype or x.shape[:-1] not in (read.shape[:-1], (*read.shape[:-3], rows)):
            raise StateMismatch("the state file's projections do not fit this model")
