"""Lossless self-speculative decoding: SNLP drafts, one sequential forward verifies them.

Drafts write approximate K/V; the verifying forward overwrites those positions with exact K/V and
`rewind` drops the rejected ones, so the cache only ever keeps exact K/V of emitted tokens. The
tokens follow the sequential model's distribution exactly (greedy: the sequential greedy tokens,
up to float rounding of near ties).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .cache import KVCache
from .compiled import Forward
from .sampling import Sampler, verify_drafts
from .stats import GenerationStats, PhaseTimer


@torch.no_grad()
def speculative(
    draft: Forward,
    exact: Forward,
    prompt: Tensor,
    n_new: int,
    cache: KVCache,
    sampler: Sampler,
    draft_len: int,
    stats: GenerationStats,
) -> Iterator[Tensor]:
    """Draft up to draft_len tokens with `draft`, verify them in one `exact` forward; yields accepted chunks.
    The draft and verify times go to stats.phase_seconds once the stream is exhausted."""
    token = sampler.next_token(exact(prompt, cache))  # invariant: `token` is emitted, not yet in the cache
    stats.model_calls, emitted = 1, 1
    timer = PhaseTimer(prompt.device, ("draft", "verify"))
    yield token
    while emitted < n_new:
        k = min(draft_len, n_new - emitted - 1)
        drafts, qs = [token], []
        with timer.phase("draft"):
            for _ in range(k):
                qs.append(sampler.probs(draft(drafts[-1], cache)[:, -1]))
                drafts.append(sampler.sample(qs[-1])[:, None])
        cache.rewind(k)  # k drafts were written after the emitted tokens: no host sync needed
        with timer.phase("verify"):  # the verifying forward and the acceptance rule
            p = sampler.probs(exact(torch.cat(drafts, dim=1), cache))
            q = torch.stack(qs, dim=1) if qs else p[:, :0]
            accepted, tokens = verify_drafts(torch.cat(drafts[1:], dim=1) if k else token[:, :0], p, q, sampler)
        n = int(accepted.min())
        cache.rewind(k - n)  # 0 <= n <= k
        chunk = tokens[:, : n + 1]
        token = chunk[:, -1:].contiguous()  # same strides every round: no dynamo recompile
        stats.model_calls += k + 1
        stats.drafted += k
        stats.accepted += n
        emitted += n + 1
        yield chunk
    stats.phase_seconds = timer.totals()
