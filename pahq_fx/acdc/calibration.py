"""``precision="auto"``: the run's format chosen by measuring queries in each candidate format at the start of the run.

Whether a low-precision format pays depends on the device and on the model's shapes: a shallow model's queries are
per-operation overhead, where casts only add cost; a wide model's cones are matrix multiplies, where bf16 (CPUs
with native bf16) or FP8 (GPUs with FP8 tensor cores) can be faster. So the choice is measured, not ruled: a few
queries into one mid-depth receiver, in FP32 and in each low-precision candidate, and the fastest
wins if it beats FP32 by :data:`MARGIN` (FP32 is exact; a format has to pay for its round-off). The circuit's
``precision_note`` says what was measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..formats import Format
from .edges import EdgeGraph, Receiver
from .runtime import PatchingRuntime

MARGIN = 1.15  # a low-precision format must be this many times faster per query than FP32 to be chosen
# Measuring costs about a second runtime's setup; it is done only where that is under this share of the search.
MEASURE_SHARE = 0.1
# A search's time, roughly, per edge of the graph, in eager forwards: sparse runs prune most receivers untested
# (0.05 forward-equivalents per edge on GPT-2 small's shape), dense ones query every edge at 0.1-0.3 each.
FORWARDS_PER_EDGE = 0.1
CANDIDATES = 4  # queries per timed batch (the probe runs 1 + REPEATS x CANDIDATES per format)
REPEATS = 2  # timed batches per format, after one untimed query; the fastest counts


def formats_to_try(device: torch.device) -> tuple[Format, ...]:
    """FP32 and the low-precision formats the device has fast kernels for (bf16 everywhere, FP8 on CUDA sm >= 8.9):
    each format says where it is fast."""
    return tuple(fmt for fmt in (Format.FP32, Format.BF16, Format.FP8_E4M3) if fmt.fast_on(device))


def probe_receiver(edges: EdgeGraph) -> Receiver:
    """The receiver whose queries are timed: a query input of the middle attention layer (a cone of about half the
    model), or the receiver with the most senders where there is none."""
    attention = [r for r in edges.receivers if r.is_attention_input]
    if not attention:
        return max(edges.receivers, key=lambda r: len(r.senders))
    layers = sorted({r.attention_input[0] for r in attention})
    middle = layers[len(layers) // 2]
    return next(r for r in attention if r.layer == middle)


def seconds_per_query(runtime: PatchingRuntime, receiver: Receiver) -> float:
    """Seconds per query into ``receiver`` on a fresh state, one query at a time (as the search runs them unless
    speculation is asked for); the runtime is reset afterwards."""
    row = runtime.edges.receiver_index[receiver.name]
    senders = list(receiver.senders)[:CANDIDATES]
    runtime.investigate(receiver)
    runtime.try_remove(row, senders[:1])  # warms up: a process's first query pays one-off costs, the next do not
    runtime.rollback()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for s in senders:
            runtime.try_remove(row, [s])
            runtime.rollback()
        best = min(best, (time.perf_counter() - start) / len(senders))
    runtime.reset()
    return best


@dataclass(frozen=True)
class Calibration:
    """What ``precision="auto"`` measured and chose."""

    receiver: str
    seconds: dict[Format, float]  # per query, by format
    chosen: Format
    failed: dict[Format, str] = field(default_factory=dict)  # formats that could not run, and why

    def note(self) -> str:
        fp32 = self.seconds[Format.FP32]
        times = ", ".join(f"{fmt.value} {s * 1e3:.3g} ms" for fmt, s in self.seconds.items())
        speed = "" if self.chosen is Format.FP32 else f" ({fp32 / self.seconds[self.chosen]:.2f}x faster than fp32)"
        skipped = "".join(f"; {fmt.value} could not run ({why})" for fmt, why in self.failed.items())
        return (
            f"auto: per query into {self.receiver} ({CANDIDATES} queries, best of {REPEATS}): {times}; "
            f"{self.chosen.value} chosen{speed}; a low-precision format must be {MARGIN}x faster than fp32{skipped}"
        )


def estimated_search_seconds(edges: int, forward_s: float) -> float:
    return edges * FORWARDS_PER_EDGE * forward_s


def worth_measuring(setup_s: float, search_s: float) -> bool:
    """Whether timing the other formats (about one more runtime's setup) costs under :data:`MEASURE_SHARE` of the
    search it may speed up."""
    return setup_s <= MEASURE_SHARE * search_s


def unmeasured_note(setup_s: float, search_s: float) -> str:
    return (
        f"auto: fp32 without measuring: timing another format would cost about {setup_s:.2g} s, over "
        f"{MEASURE_SHARE:.0%} of a search estimated at {search_s:.2g} s (edges x {FORWARDS_PER_EDGE} forward)"
    )


def choose(seconds: dict[Format, float]) -> Format:
    """The fastest format if it beats FP32 by :data:`MARGIN`, else FP32."""
    fastest = min(seconds, key=seconds.__getitem__)
    return fastest if seconds[fastest] * MARGIN <= seconds[Format.FP32] else Format.FP32
