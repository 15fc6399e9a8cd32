"""Speculative ACDC: several of a receiver's edge queries evaluated in one batched cone pass, decided in order.

ACDC's greedy search is sequential: whether edge i is removed depends on the decisions before it. A predictor
guesses those decisions; candidate i is evaluated on the state the guessed decisions of candidates 0..i-1 would
give (:meth:`PatchingRuntime.try_remove_each`). Decisions are then taken in ACDC's order against the threshold,
exactly as the sequential search takes them; at the first decision that differs from its guess the later
candidates' results are dropped and the search goes on from the true state. The kept removals are committed one at
a time, as the sequential search commits them, so the state is the sequential search's bit for bit and every
decision is taken on it; only a candidate's metric may differ, by round-off (a batched matrix multiply may round
differently from an unbatched one). A branch predictor for an exact algorithm.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PahqError
from .edges import Receiver
from .runtime import PatchingRuntime

OFF = "off"  # no predictor: one query at a time
MAX_CANDIDATES = 32
MEMORY_SHARE = 8  # on a GPU, candidate batches may use 1/MEMORY_SHARE of the device's memory
CACHE_SHARE = 2  # on a CPU, candidate batches may use this many times the last-level cache
DEFAULT_CACHE = 32 << 20  # where the cache size cannot be read
# The batch size is the largest whose expected share of dropped candidates stays under this, at the hit rate so far.
WASTE = 0.25
WINDOW = 64  # recent predictions the hit rate and the adaptive guess are taken over
# An effect this close to the threshold (relative to the metric, at least this much absolutely) could be decided
# either way by round-off: a batched matrix multiply may round differently from an unbatched one.
ROUND_OFF = 1e-5


class Prediction(enum.Enum):
    """How the next decisions are guessed. ``KEPT``: every edge stays (a batch is exact until the first removal:
    dense circuits). ``REMOVED``: every edge goes (prefix removals: sparse circuits). ``ADAPTIVE``: the more frequent
    of the recent decisions. ``RANDOM``: a coin per edge, seeded (an adversary for tests, not for use)."""

    KEPT = "kept"
    REMOVED = "removed"
    ADAPTIVE = "adaptive"
    RANDOM = "random"


@dataclass
class Predictor:
    """Guesses decisions and sizes candidate batches from its hit rate; counts what it evaluated and decided.
    Deterministic: the same decisions give the same batches, so a run (and its resume) is reproducible (the seeded
    random adversary's resume aside: its generator's state is not checkpointed). One instance serves one run: a
    predictor passed to ``discover`` keeps counting, and its window carries over, if it is passed again."""

    kind: Prediction = Prediction.ADAPTIVE
    max_candidates: int = MAX_CANDIDATES
    seed: int = 0
    evaluated: int = 0
    decided: int = 0
    hits: int = 0
    batches: int = 0
    near_threshold: int = 0  # decisions whose effect lay within round-off of the threshold
    _recent_decisions: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _recent_hits: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.kind, str):
            self.kind = Prediction(self.kind)
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be at least 1, got {self.max_candidates}")
        self._rng = random.Random(self.seed)

    def guesses(self, n: int) -> list[bool]:
        """Guessed decisions (True: removed) for the next ``n`` edges."""
        if self.kind is Prediction.RANDOM:
            return [self._rng.random() < 0.5 for _ in range(n)]
        if self.kind is Prediction.ADAPTIVE:
            removed = sum(self._recent_decisions)
            return [2 * removed > len(self._recent_decisions)] * n
        return [self.kind is Prediction.REMOVED] * n

    def batch_size(self, remaining: int, limit: int) -> int:
        """Candidates for the next batch: the largest count whose expected dropped share stays under
        :data:`WASTE` at the recent hit rate (with one hit and one miss as prior), within ``limit``."""
        p = (sum(self._recent_hits) + 1) / (len(self._recent_hits) + 2)
        size = 1
        while size < min(remaining, limit, self.max_candidates):
            expected = (1 - p ** (size + 1)) / (1 - p)  # decisions a batch of size + 1 yields, on average
            if expected / (size + 1) < 1 - WASTE:
                break
            size += 1
        return size

    def record(self, guessed: bool, removed: bool) -> None:
        self._recent_decisions.append(removed)
        self._recent_hits.append(guessed == removed)
        self.hits += guessed == removed
        self.decided += 1

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run batches as the uninterrupted one would."""
        return {
            "decisions": [int(d) for d in self._recent_decisions],
            "hits": [int(h) for h in self._recent_hits],
            "counts": [self.evaluated, self.decided, self.hits, self.batches, self.near_threshold],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._recent_decisions.clear()
        self._recent_hits.clear()
        self._recent_decisions.extend(bool(d) for d in state["decisions"])
        self._recent_hits.extend(bool(h) for h in state["hits"])
        self.evaluated, self.decided, self.hits, self.batches, self.near_threshold = (int(c) for c in state["counts"])

    @property
    def hit_rate(self) -> float:
        return self.hits / self.decided if self.decided else math.nan


def check_speculation(speculation: str | Predictor) -> Prediction | None:
    """The predictor a ``speculation`` argument names (None: ``off``); a clear error for anything else."""
    if isinstance(speculation, Predictor):
        return speculation.kind
    if speculation == OFF:
        return None
    if speculation == Prediction.RANDOM.value:
        raise PahqError("speculation 'random' is an adversary for tests; use adaptive, kept, removed or off")
    try:
        return Prediction(speculation)
    except ValueError:
        raise PahqError(f"unknown speculation {speculation!r}; choose one of adaptive, kept, removed, off") from None


def candidate_memory(device: torch.device) -> int:
    """Bytes a candidate batch may hold. On a GPU a share of the device's total memory: its cones are bound by
    kernel launches, which a batch divides among its candidates. On a CPU twice the last-level cache: a batch pays
    where a cone is bound by per-operation overhead (small cones), while a deep cone's batch outgrows the cache and
    its elementwise work slows by as much as the overhead saves (benchmarks/query_depth.py, docs/performance.md),
    so deep cones run one query at a time. Fixed per machine, not read from what is free now: batch sizes, and with
    them the round-off of every effect, must not depend on what else runs."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // MEMORY_SHARE
    return CACHE_SHARE * last_level_cache()


def last_level_cache() -> int:
    """Bytes of this CPU's largest cache (Linux sysfs), :data:`DEFAULT_CACHE` where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=DEFAULT_CACHE)


def search_receiver(
    runtime: PatchingRuntime,
    row: int,
    receiver: Receiver,
    threshold: float,
    abs_threshold: bool,
    effects: dict[tuple[int, int], float],
    predictor: Predictor,
    memory_limit: int,
) -> None:
    """ACDC at one live receiver, in candidate batches; the same decisions as the sequential search."""
    baseline = runtime.investigate(receiver)
    senders = list(receiver.senders)
    limit = max(1, memory_limit // max(runtime.candidate_bytes(row), 1))
    start = 0
    while start < len(senders):
        size = predictor.batch_size(len(senders) - start, limit)
        batch = senders[start : start + size]
        guesses = predictor.guesses(len(batch))
        metrics = runtime.try_remove_each(row, batch, guesses)
        predictor.evaluated += len(batch)
        predictor.batches += 1
        kept_index, decided = None, 0
        for i, (sender, metric) in enumerate(zip(batch, metrics, strict=True)):
            effect = metric - baseline
            effects[(row, sender)] = effect
            measured = abs(effect) if abs_threshold else effect
            removed = measured < threshold
            predictor.record(guesses[i], removed)
            predictor.near_threshold += abs(measured - threshold) <= ROUND_OFF * max(1.0, abs(metric))
            decided += 1
            if removed:
                baseline, kept_index = metric, i
            if removed != guesses[i]:
                break
        committed = runtime.keep_candidate(kept_index, decided)
        if kept_index is not None:
            baseline = committed  # the committed state's metric, as the sequential search's baseline is
        start += decided
