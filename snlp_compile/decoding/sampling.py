"""Turning logits into tokens: the sampler, and the speculative-sampling rule that verifies drafts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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

    def sample(self, probs: Tensor) -> Tensor:
        """One token per distribution: probs [..., V] (unnormalised allowed) -> int64 [...]."""
        if self.greedy:
            return probs.argmax(-1)
        flat = probs.reshape(-1, probs.size(-1))
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])

    def next_token(self, logits: Tensor) -> Tensor:
        """The token [B, 1] after the last position of logits [B, T, V]."""
        return self.sample(self.probs(logits[:, -1]))[:, None]


def verify_drafts(drafts: Tensor, p: Tensor, q: Tensor, sampler: Sampler) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule on drafts [B, k] drawn from q [B, k, V], given the target p [B, k+1, V].

    Returns (accepted [B], tokens [B, k+1]): row r accepts its first accepted[r] drafts, each with
    probability min(1, p/q); tokens[r, j] for j <= accepted[r] is the token to emit at j if the row
    stops there: the draft when accepted, else a sample of norm(max(0, p - q)), and at j = k a
    bonus sample of p. Stopping every row at any j <= accepted[r] keeps the exact distribution p.
    """
    k = drafts.size(1)
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    if sampler.greedy:
        ok = p_draft > 0
    else:
        u = torch.rand(p_draft.shape, generator=sampler.generator, device=p.device)
        ok = u * q_draft < p_draft
    accepted = ok.long().cumprod(-1).sum(-1)
    residual = (p[:, :k] - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :k])
    fixed = torch.where(ok, drafts, sampler.sample(residual))
    return accepted, torch.cat([fixed, sampler.sample(p[:, k])[:, None]], dim=1)
