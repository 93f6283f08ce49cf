"""Lossless self-speculative decoding: SNLP drafts, one sequential forward verifies them.

Drafts write approximate K/V; the verifying forward overwrites those positions with exact K/V and
`rewind` drops the rejected ones, so the cache only ever keeps exact K/V of emitted tokens. The
tokens follow the sequential model's distribution exactly (greedy: the sequential greedy tokens,
up to float rounding of near ties).

A round is two phases, each a function of tensors with no host sync and no random-number call (the
round's noise is drawn before it): drafting k tokens (which leaves the cache where it found it) and
verifying them (which advances the cache by k + 1). With `graphs` (CUDA), the phases of full rounds
(k = draft_len) are captured once per cache as CUDA graphs and replayed: a round costs two graph
launches and one host sync, the read of how many drafts were accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor, nn

from .cache import KVCache
from .compiled import Forward
from .cuda_graph import CapturedCall, CaptureFailed, GraphStore
from .sampling import RoundNoise, Sampler, verify_drafts
from .stats import GenerationStats, PhaseTimer

logger = logging.getLogger("snlp_compile")


def draft_phase(
    draft: Forward, cache: KVCache, sampler: Sampler, token: Tensor, noise: RoundNoise | None, k: int, vocab: int
) -> tuple[Tensor, Tensor]:
    """k >= 0 drafts after `token` [B, 1]: (drafts [B, k], their distributions q [B, k, vocab]); the cache
    is rewound to where it was (the k approximate K/V are left beyond it, for the verify to overwrite)."""
    if k == 0:
        return token[:, :0], torch.zeros(token.size(0), 0, vocab, device=token.device)
    drafts, qs = [token], []
    for i in range(k):
        qs.append(sampler.probs(draft(drafts[-1], cache)[:, -1]))
        drafts.append(sampler.sample(qs[-1], None if noise is None else noise.draft[:, i])[:, None])
    cache.rewind(k)
    return torch.cat(drafts[1:], dim=1), torch.stack(qs, dim=1)


def verify_phase(
    exact: Forward, cache: KVCache, sampler: Sampler, token: Tensor, drafts: Tensor, q: Tensor, noise: RoundNoise | None
) -> tuple[Tensor, Tensor]:
    """One exact forward of `token` and the drafts (the cache advances by k + 1) and the acceptance
    rule: (accepted [B], tokens [B, k + 1]) of `verify_drafts`."""
    p = sampler.probs(exact(torch.cat([token, drafts], dim=1), cache))
    return verify_drafts(drafts, p, q, sampler, noise)


class RoundGraphs:
    """The phases of a full round (k = draft_len) as CUDA graphs, captured at the first full round into
    `store` (one per cache and setting, see cuda_graph.graphs_for) and replayed after it; a capture that
    fails is logged with its reason and the rounds run without graphs (errors of the warm-up runs, which
    would also stop an uncaptured round, propagate)."""

    def __init__(self, store: GraphStore, model: nn.Module) -> None:
        self._store, self._model = store, model

    def phases(
        self, draft: Callable, verify: Callable, cache: KVCache, inputs: tuple[Tensor, RoundNoise | None], k: int
    ) -> tuple[Callable, Callable]:
        """(draft, verify) callables for a round of k drafts: captured ones where they exist or can be made."""
        graphs = self._store.graphs
        if not graphs:
            try:
                token, noise = inputs
                graphs["draft"] = CapturedCall(draft, inputs, lambda: None)
                drafts, q = (t.clone() for t in graphs["draft"](token, noise))
                graphs["verify"] = CapturedCall(verify, (token, drafts, q, noise), partial(cache.rewind, k + 1))
                self._store.seal(self._model)
            except CaptureFailed as error:
                graphs.clear()
                graphs["failed"] = error
                logger.warning("snlp: speculative rounds run without CUDA graphs: capturing them failed (%s)", error)
            except BaseException:  # a warm-up's error: no half-made pair of graphs is kept
                graphs.clear()
                raise
        if "failed" in graphs:
            return draft, verify
        return graphs["draft"], graphs["verify"]


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
    graphs: RoundGraphs | None = None,
) -> Iterator[Tensor]:
    """Draft up to draft_len tokens with `draft`, verify them in one `exact` forward; yields accepted chunks.
    graphs: replay full rounds as CUDA graphs. The draft and verify times go to stats.phase_seconds
    once the stream is exhausted."""
    logits = exact(prompt, cache)
    token = sampler.next_token(logits)  # invariant: `token` is emitted, not yet in the cache
    batch, vocab = token.size(0), logits.size(-1)
    stats.model_calls, emitted = 1, 1
    timer = PhaseTimer(prompt.device, ("draft", "verify"))
    yield token
    while emitted < n_new:
        k = min(draft_len, n_new - emitted - 1)
        noise = sampler.round_noise(batch, k, vocab, prompt.device)
        drafting = partial(draft_phase, draft, cache, sampler, k=k, vocab=vocab)
        verifying = partial(verify_phase, exact, cache, sampler)
        if graphs is not None and k == draft_len:
            drafting, verifying = graphs.phases(drafting, verifying, cache, (token, noise), k)
        with timer.phase("draft"):
            drafts, q = drafting(token, noise)
        with timer.phase("verify"):  # the verifying forward and the acceptance rule
            accepted, tokens = verifying(token, drafts, q, noise)
        n = int(accepted.min())  # the round's one host sync
        cache.rewind(k - n)  # 0 <= n <= k
        chunk = tokens[:, : n + 1].clone()  # a graph's outputs are overwritten by its next replay
        token = chunk[:, -1:].contiguous()  # same strides every round: no dynamo recompile
        stats.model_calls += k + 1
        stats.drafted += k
        stats.accepted += n
        emitted += n + 1
        yield chunk
    stats.phase_seconds = timer.totals()
