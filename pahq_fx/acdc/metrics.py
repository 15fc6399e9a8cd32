"""Metrics ACDC minimises: smaller always means "more like the clean model"."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Metric(enum.Enum):
    KL = "kl"
    LOGIT_DIFF = "logit_diff"
    PROB_DIFF = "prob_diff"

    @property
    def needs_answers(self) -> bool:
        return self is not Metric.KL


@dataclass(frozen=True)
class CleanDistribution:
    """The clean model's next-token distribution at the metric positions ([P, vocab]): log-probabilities, and the
    probabilities that weight KL, computed once per run rather than once per query."""

    logprobs: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> CleanDistribution:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return cls(logprobs, logprobs.exp())


def metric_value(
    metric: Metric,
    logits: torch.Tensor,
    clean: CleanDistribution,
    correct: torch.Tensor | None,
    incorrect: torch.Tensor | None,
) -> torch.Tensor:
    """``logits`` are [..., P, vocab] at the metric positions (leading dimensions: a batch of patched passes, one
    value each); answers are [P].

    KL: KL(clean || patched), summed over the vocabulary and averaged over positions. Logit and
    probability differences are negated (correct minus incorrect, averaged), so that smaller is better.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if metric is Metric.KL:
        return (clean.probs * (clean.logprobs - logprobs)).sum(-1).mean(-1)
    values = logits.float() if metric is Metric.LOGIT_DIFF else logprobs.exp()
    shape = (*values.shape[:-1], 1)
    picked = values.gather(-1, correct.view(-1, 1).expand(shape)) - values.gather(-1, incorrect.view(-1, 1).expand(shape))
    return -picked.squeeze(-1).mean(-1)
