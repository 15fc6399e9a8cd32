"""The metrics ACDC minimises, as a registry: smaller always means "more like the clean model".

A metric is a function of the patched logits at the metric positions, registered with :func:`register_metric`
under its name with its sign convention (a metric where larger is better is negated, so that the search minimises
every one) and whether it reads the task's answer tokens. Adding a metric is one decorated function in this module
(or in a user's own code). The module imports no torch when it is imported: the command line offers the names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .errors import PahqError

if TYPE_CHECKING:
    import torch

# (logits [..., P, vocab] in float32, the clean distribution, correct and incorrect answers [P] or None) -> [...]
MetricFunction = Callable[..., "torch.Tensor"]


@dataclass(frozen=True)
class CleanDistribution:
    """The clean model's next-token distribution at the metric positions ([P, vocab]): log-probabilities, and the
    probabilities that weight KL, computed once per run rather than once per query."""

    logprobs: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> CleanDistribution:
        logprobs = logits.float().log_softmax(dim=-1)
        return cls(logprobs, logprobs.exp())


@dataclass(frozen=True, eq=False)
class Metric:
    """A registered metric. One object per name: compare with ``is``."""

    value: str  # the name users pass (``metric="kl"``)
    function: MetricFunction
    larger_is_better: bool  # the search minimises: such a metric is negated
    needs_answers: bool  # reads the task's correct and incorrect answer tokens
    help: str

    KL: ClassVar[Metric]
    LOGIT_DIFF: ClassVar[Metric]
    PROB_DIFF: ClassVar[Metric]

    def __reduce__(self) -> tuple:
        return metric_named, (self.value,)  # unpickled as the registered object itself

    def __repr__(self) -> str:
        return f"Metric({self.value!r})"


METRICS: dict[str, Metric] = {}


def register_metric(
    name: str, *, help: str, larger_is_better: bool = False, needs_answers: bool = False
) -> Callable[[MetricFunction], Metric]:
    """Register the decorated function as metric ``name`` (which must be new) and return the :class:`Metric`."""

    def register(function: MetricFunction) -> Metric:
        if name in METRICS:
            raise ValueError(f"metric name {name!r} is taken")
        METRICS[name] = Metric(name, function, larger_is_better, needs_answers, help)
        return METRICS[name]

    return register


def metric_named(name: str | Metric) -> Metric:
    """The registered metric called ``name`` (any case)."""
    if isinstance(name, Metric):
        return name
    metric = METRICS.get(str(name).lower())
    if metric is None:
        raise PahqError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return metric


def _answer_difference(values: torch.Tensor, correct: torch.Tensor, incorrect: torch.Tensor) -> torch.Tensor:
    """``values`` [..., P, vocab] of the correct answer minus the incorrect one, averaged over positions."""
    shape = (*values.shape[:-1], 1)
    picked = values.gather(-1, correct.view(-1, 1).expand(shape)) - values.gather(-1, incorrect.view(-1, 1).expand(shape))
    return picked.squeeze(-1).mean(-1)


@register_metric("kl", help="KL(clean || patched) of the next-token distribution, summed over the vocabulary")
def _kl(logits: torch.Tensor, clean: CleanDistribution, correct: object, incorrect: object) -> torch.Tensor:
    return (clean.probs * (clean.logprobs - logits.log_softmax(dim=-1))).sum(-1).mean(-1)


@register_metric(
    "logit_diff", help="logit of the correct answer minus the incorrect one", larger_is_better=True, needs_answers=True
)
def _logit_diff(logits: torch.Tensor, clean: CleanDistribution, correct: torch.Tensor, incorrect: torch.Tensor) -> torch.Tensor:
    return _answer_difference(logits, correct, incorrect)


@register_metric(
    "prob_diff", help="probability of the correct answer minus the incorrect one", larger_is_better=True, needs_answers=True
)
def _prob_diff(logits: torch.Tensor, clean: CleanDistribution, correct: torch.Tensor, incorrect: torch.Tensor) -> torch.Tensor:
    return _answer_difference(logits.log_softmax(dim=-1).exp(), correct, incorrect)


Metric.KL, Metric.LOGIT_DIFF, Metric.PROB_DIFF = _kl, _logit_diff, _prob_diff


def metric_value(
    metric: Metric,
    logits: torch.Tensor,
    clean: CleanDistribution,
    correct: torch.Tensor | None,
    incorrect: torch.Tensor | None,
) -> torch.Tensor:
    """``logits`` are [..., P, vocab] at the metric positions (leading dimensions: a batch of patched passes, one
    value each); answers are [P]. Averaged over positions; negated where larger is better, so that smaller is better."""
    value = metric.function(logits.float(), clean, correct, incorrect)
    return -value if metric.larger_is_better else value
