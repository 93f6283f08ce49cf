"""Turning logits into tokens: the sampler, the random numbers of one speculative round, and the
speculative-sampling rule that verifies drafts.

A sample is drawn by multinomial, or from given noise by the exponential race: argmax(p / E) with E
i.i.d. Exp(1) per category is a draw from p, exactly. Drawing a round's noise before the round keeps
the round itself free of random-number calls (so it can be replayed as a CUDA graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class RoundNoise(NamedTuple):
    """The random numbers of one speculative round of k drafts over a vocabulary of V, batch B:
    draft [B, k, V] and verify [B, k + 1, V] exponential races, accept [B, k] uniforms in [0, 1)."""

    draft: Tensor
    accept: Tensor
    verify: Tensor


@dataclass
class Sampler:
    """Turns logits into a distribution and draws from it; temperature 0 gives one-hot (greedy)."""

    temperature: float
    top_k: int | None
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        """Distribution [..., V] of the next token; top_k keeps the k largest logits (ties kept)."""
        if self.greedy:
            return F.one_hot(logits.argmax(-1), logits.size(-1)).to(torch.float32)
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return logits.softmax(-1)

    def sample(self, probs: Tensor, race: Tensor | None = None) -> Tensor:
        """One token per distribution: probs [..., V] (unnormalised allowed) -> int64 [...]; drawn by
        multinomial, or by the exponential race `race` [..., V] (Exp(1) noise) when given."""
        if self.greedy:
            return probs.argmax(-1)
        if race is not None:
            return (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(-1)
        flat = probs.reshape(-1, probs.size(-1))
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])

    def round_noise(self, batch: int, k: int, vocab: int, device: torch.device) -> RoundNoise | None:
        """Fresh random numbers for one speculative round of k drafts (None when greedy: it needs none)."""
        if self.greedy:
            return None

        def race(*shape: int) -> Tensor:
            return torch.empty(shape, device=device).exponential_(generator=self.generator)

        accept = torch.rand((batch, k), generator=self.generator, device=device)
        return RoundNoise(race(batch, k, vocab), accept, race(batch, k + 1, vocab))

    def next_token(self, logits: Tensor) -> Tensor:
        """The token [B, 1] after the last position of logits [B, T, V]."""
        return self.sample(self.probs(logits[:, -1]))[:, None]


def verify_drafts(
    drafts: Tensor, p: Tensor, q: Tensor, sampler: Sampler, noise: RoundNoise | None = None
) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule on drafts [B, k] drawn from q [B, k, V], given the target p [B, k+1, V].

    Returns (accepted [B], tokens [B, k+1]): row r accepts its first accepted[r] drafts, each with
    probability min(1, p/q); tokens[r, j] for j <= accepted[r] is the token to emit at j if the row
    stops there: the draft when accepted, else a sample of norm(max(0, p - q)), and at j = k a
    bonus sample of p. Stopping every row at any j <= accepted[r] keeps the exact distribution p.
    noise: the round's random numbers (its accept and verify parts); None draws them here.
    """
    k = drafts.size(1)
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    if sampler.greedy:
        ok = p_draft > 0
    else:
        u = torch.rand(p_draft.shape, generator=sampler.generator, device=p.device) if noise is None else noise.accept
        ok = u * q_draft < p_draft
    accepted = ok.long().cumprod(-1).sum(-1)
    residual = (p[:, :k] - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :k])
    race = (None, None) if noise is None else (noise.verify[:, :k], noise.verify[:, k])
    fixed = torch.where(ok, drafts, sampler.sample(residual, race[0]))
    return accepted, torch.cat([fixed, sampler.sample(p[:, k], race[1])[:, None]], dim=1)
