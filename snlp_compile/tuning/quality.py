"""What quality means for the tuner: the two scores and the budget criterion on them.

Invariants: with data, the score is the mean cross-entropy of next-token prediction (logits[:, :-1]
against tokens[:, 1:], in float32), lower is better; without, the top-1 agreement with the
sequential model's predictions over all positions, higher is better (1.0 for the sequential model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Metric = Literal["loss", "agreement"]


def next_token_loss(logits: Tensor, tokens: Tensor) -> float:
    """Mean cross-entropy of logits[:, :-1] [B, T-1, V] against tokens[:, 1:] [B, T-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()).item()


def top1_agreement(logits: Tensor, reference_top1: Tensor) -> float:
    """Fraction of positions whose argmax over the vocabulary is the reference's."""
    return (logits.argmax(-1) == reference_top1).float().mean().item()


@dataclass(frozen=True)
class Criterion:
    """A setting is within budget when its score is at most `threshold` (loss) or at least it (agreement).

    loss: threshold = (1 + budget) * the sequential loss; agreement: threshold = 1 - budget. A NaN
    score is never within budget.
    """

    metric: Metric
    budget: float
    threshold: float

    @classmethod
    def of(cls, metric: Metric, budget: float, sequential: float) -> Criterion:
        """The criterion for a budget, given the sequential model's score."""
        threshold = (1.0 + budget) * sequential if metric == "loss" else 1.0 - budget
        return cls(metric, budget, threshold)

    def within(self, score: float) -> bool:
        return score <= self.threshold if self.metric == "loss" else score >= self.threshold

    def __str__(self) -> str:
        """E.g. "loss <= 4.6284" or "agreement >= 0.9900"."""
        return f"{self.metric} {'<=' if self.metric == 'loss' else '>='} {self.threshold:.4f}"
