"""Decoding with a static KV cache: sequential, SNLP, and lossless self-speculative decoding.

Invariants:

- `generate` is `stream` drained; both validate every argument before any model call.
- The cache holds exact (or, in mode "snlp", SNLP) K/V of every token fed back so far and
  nothing else: `cache.pos` equals the number of tokens fed back, and the last new token is
  never fed back, so a run needs `prompt_len + max_new_tokens - 1` positions.
- Speculative mode: drafts come from the SNLP-compiled model and write approximate K/V; one
  sequential forward then overwrites those positions with exact K/V and `rollback` drops the
  rejected ones. Its tokens follow the sequential model's distribution exactly (greedy: the
  same tokens as sequential greedy decoding, up to float rounding of near ties).
- The SNLP model is compiled once per (model, SNLPConfig) and cached without keeping the model
  alive; each compiled callable has its own dynamo recompile budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.dynamo import snlp_backend
from .config import SNLPConfig
from .fresh_code import fresh_function
from .models.config import GPTConfig
from .models.kv_cache import StaticKVCache

logger = logging.getLogger("snlp_compile")

MODES = ("snlp", "sequential", "speculative")

Forward = Callable[[Tensor, StaticKVCache], Tensor]

_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[Any, Callable]] = weakref.WeakKeyDictionary()


def _forward(model: nn.Module, idx: Tensor, kv_cache: StaticKVCache) -> Tensor:
    """The function handed to torch.compile (as a `fresh_function` copy per compile, so that the graphs
    of different models and configs never push each other into eager fallbacks): the model is an
    argument, so the cache does not own it."""
    return model(idx, kv_cache=kv_cache)


def compiled_forward(model: nn.Module, config: SNLPConfig | None, cudagraphs: bool = False) -> Forward:
    """`(idx, kv_cache) -> logits` of `model` compiled with the snlp backend (inductor when config is None).

    cudagraphs applies to the sequential (config None) compile only: inductor's "reduce-overhead"
    mode; an SNLP config carries its own. Compiled once per (model, config), or per (model,
    cudagraphs) when config is None, and cached while the model is alive. The snlp callable uses
    static shapes (one graph per new-token count: decode steps, and each prompt length of an snlp
    prefill): kernels specialised to each shape, and a decode step that never recompiles into a
    dynamic one. Past dynamo's recompile limit (`torch._dynamo.config.recompile_limit`, 8 by
    default) new prompt lengths run eagerly and dynamo logs it: pad prompts to a few lengths, or
    use prefill="sequential".
    """
    per_model = _COMPILED.setdefault(model, {})
    key = config if config is not None else ("sequential", cudagraphs)
    if key not in per_model:
        if config is None:
            mode = "reduce-overhead" if cudagraphs else None
            per_model[key] = torch.compile(fresh_function(_forward), mode=mode)
        else:
            options = dataclasses.asdict(config)
            per_model[key] = torch.compile(
                fresh_function(_forward), backend=snlp_backend, options=options, dynamic=False
            )
        what = config or f"inductor (sequential{', CUDA graphs' if cudagraphs else ''})"
        logger.info("snlp: compiled %s for decoding with %s", type(model).__name__, what)
    compiled = per_model[key]
    return lambda idx, kv_cache: compiled(model, idx, kv_cache)


@dataclass
class GenerationStats:
    """Counters of one decoding run; complete once its stream is exhausted.

    model_calls counts every forward (prefill, decode steps, drafts and verifications); drafted
    and accepted count speculative draft tokens (per sequence; a batch accepts the shortest row's
    agreeing prefix). seconds is wall time from the first token request to the end (synchronised),
    including any compilation the run triggers.
    """

    mode: str
    batch_size: int
    prompt_len: int
    new_tokens: int = 0
    model_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole batch (batch_size * new_tokens / seconds)."""
        return self.batch_size * self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens in [0, 1]; None outside speculative mode."""
        if self.mode != "speculative":
            return None
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Generation:
    """tokens: [B, prompt_len + new_tokens] int64 (prompt included); stats: the run's counters."""

    tokens: Tensor
    stats: GenerationStats


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


class TokenStream:
    """Iterator over chunks of new tokens [B, n] (n >= 1); `stats` is complete once exhausted.

    prompt: the prompt as int64 [B, T] on the model's device.
    """

    def __init__(self, chunks: Iterator[Tensor], prompt: Tensor, stats: GenerationStats) -> None:
        self._chunks = chunks
        self.prompt = prompt
        self.stats = stats

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Tensor:
        return next(self._chunks)


def _check_arguments(
    config: GPTConfig,
    prompt_ids: Tensor,
    max_new_tokens: int,
    mode: str,
    temperature: float,
    top_k: int | None,
    draft_len: int,
) -> Tensor:
    """Validate everything that needs no cache; return the prompt as [B, T]."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("draft_len", draft_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= config.vocab_size
    ):
        raise ValueError(f"top_k must be None or an integer in [1, vocab_size={config.vocab_size}], got {top_k!r}")
    if (
        not isinstance(prompt_ids, Tensor)
        or prompt_ids.dtype not in (torch.int32, torch.int64)
        or prompt_ids.dim() not in (1, 2)
    ):
        raise ValueError("prompt_ids must be an int32/int64 tensor [T] or [B, T]")
    prompt = prompt_ids.long().reshape(1, -1) if prompt_ids.dim() == 1 else prompt_ids.long()
    batch, length = prompt.shape
    if batch == 0 or length == 0:
        raise ValueError(f"prompt_ids must hold at least one token per row, got shape {tuple(prompt_ids.shape)}")
    if length > config.sequence_len:
        raise ValueError(f"prompt length {length} exceeds the model's context sequence_len={config.sequence_len}")
    if length + max_new_tokens > config.sequence_len:
        raise ValueError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} exceeds the model's context "
            f"sequence_len={config.sequence_len}; max_new_tokens must be <= {config.sequence_len - length}"
        )
    if int(prompt.min()) < 0 or int(prompt.max()) >= config.vocab_size:
        raise ValueError(f"prompt_ids must be token ids in [0, vocab_size={config.vocab_size})")
    return prompt


def _check_cache(
    kv_cache: StaticKVCache, config: GPTConfig, batch_size: int, needed: int, device: torch.device
) -> None:
    expected = {"n_layer": config.n_layer, "n_kv_head": config.n_kv_head, "head_dim": config.head_dim}
    found = dict(zip(expected, (kv_cache.k.size(0), kv_cache.k.size(2), kv_cache.k.size(4)), strict=True))
    if found != expected:
        raise ValueError(f"kv_cache was built for another model: it has {found}, the model needs {expected}")
    if kv_cache.batch_size != batch_size:
        raise ValueError(f"kv_cache batch size {kv_cache.batch_size} must equal the prompt batch size {batch_size}")
    if kv_cache.max_seq_len < needed:
        raise ValueError(
            f"kv_cache max_seq_len={kv_cache.max_seq_len} must be >= prompt length + max_new_tokens - 1 = {needed}"
        )
    if kv_cache.k.device != device:
        raise ValueError(f"kv_cache must be on the model's device {device}, got {kv_cache.k.device}")


def _first_token(forward: Forward, prompt: Tensor, cache: StaticKVCache, sampler: Sampler) -> Tensor:
    """Prefill the cache with the prompt; the first new token [B, 1]."""
    return sampler.sample(sampler.probs(forward(prompt, cache)[:, -1]))[:, None]


def _finish(stats: GenerationStats, start: float, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start


@torch.no_grad()
def _stepwise(
    prefill: Forward,
    step: Forward,
    prompt: Tensor,
    n_new: int,
    cache: StaticKVCache,
    sampler: Sampler,
    stats: GenerationStats,
) -> Iterator[Tensor]:
    """One forward per new token; yields [B, 1] chunks."""
    start = time.perf_counter()
    token = _first_token(prefill, prompt, cache, sampler)
    stats.model_calls, stats.new_tokens = 1, 1
    yield token
    for _ in range(n_new - 1):
        token = sampler.sample(sampler.probs(step(token, cache)[:, -1]))[:, None]
        stats.model_calls += 1
        stats.new_tokens += 1
        yield token
    _finish(stats, start, prompt.device)


@torch.no_grad()
def _speculative(
    draft: Forward,
    exact: Forward,
    prompt: Tensor,
    n_new: int,
    cache: StaticKVCache,
    sampler: Sampler,
    draft_len: int,
    stats: GenerationStats,
) -> Iterator[Tensor]:
    """Draft up to draft_len tokens with `draft`, verify them in one `exact` forward; yields accepted chunks."""
    start = time.perf_counter()
    token = _first_token(exact, prompt, cache, sampler)  # invariant: `token` is emitted, not yet in the cache
    stats.model_calls, stats.new_tokens = 1, 1
    yield token
    while stats.new_tokens < n_new:
        k = min(draft_len, n_new - stats.new_tokens - 1)
        drafts, qs = [token], []
        for _ in range(k):
            qs.append(sampler.probs(draft(drafts[-1], cache)[:, -1]))
            drafts.append(sampler.sample(qs[-1])[:, None])
        cache.rewind(k)  # k drafts were written after the emitted tokens: no host sync needed
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
        stats.new_tokens += n + 1
        yield chunk
    _finish(stats, start, prompt.device)


def stream(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    config: SNLPConfig | Mapping[str, Any] | None = None,
    mode: str = "snlp",
    temperature: float = 0.0,
    top_k: int | None = None,
    draft_len: int = 4,
    generator: torch.Generator | None = None,
    kv_cache: StaticKVCache | None = None,
    compile_sequential: bool = False,
) -> TokenStream:
    """Decode `max_new_tokens` tokens after `prompt_ids`, yielding them as they are produced.

    model: a `snlp_compile.models` decoder (forward(idx, kv_cache) -> logits, `.config` a GPTConfig).
    prompt_ids: int tensor [T] or [B, T], ids in [0, vocab_size), T + max_new_tokens <= sequence_len.
    config: SNLPConfig (or its fields) of the SNLP model; None = SNLPConfig(); in "sequential" mode
        only its cudagraphs field is used (for compile_sequential).
    mode: "sequential" (the model itself), "snlp" (decode steps through the SNLP-compiled model;
        the prompt too when config.prefill == "snlp"), "speculative" (SNLP drafts, sequential
        verification: the sequential model's output distribution, exactly).
    temperature: 0 = greedy, > 0 samples from softmax(logits / temperature), restricted to top_k.
    draft_len: speculative tokens drafted per verification, >= 1.
    generator: random source for sampling, on the model's device.
    kv_cache: a cache to reuse (reset first) instead of allocating one; reusing one of fixed size
        avoids dynamo recompiling for a new cache shape.
    compile_sequential: run the sequential forwards (mode "sequential", prefill, verification)
        through torch.compile with inductor, with CUDA graphs ("reduce-overhead") when
        config.cudagraphs is on.

    Returns a TokenStream of [B, n] chunks: one token per step, or each verified chunk in
    speculative mode. Grad mode is off inside each step only; the model's weights are not touched.
    """
    if not isinstance(getattr(model, "config", None), GPTConfig):
        raise ValueError(f"model must be a snlp_compile.models decoder with a GPTConfig .config, got {type(model)}")
    prompt = _check_arguments(model.config, prompt_ids, max_new_tokens, mode, temperature, top_k, draft_len)
    snlp_config = SNLPConfig.from_options(config)
    weight = next(model.parameters())
    prompt = prompt.to(weight.device)
    batch, needed = prompt.size(0), prompt.size(1) + max_new_tokens - 1
    if kv_cache is None:
        kv_cache = StaticKVCache(model.config, batch, needed, dtype=weight.dtype, device=weight.device)
    _check_cache(kv_cache, model.config, batch, needed, weight.device)
    kv_cache.reset()

    exact = compiled_forward(model, None, snlp_config.cudagraphs) if compile_sequential else partial(_forward, model)
    sampler = Sampler(float(temperature), top_k, generator)
    stats = GenerationStats(mode=mode, batch_size=batch, prompt_len=prompt.size(1))
    if mode == "sequential":
        chunks = _stepwise(exact, exact, prompt, max_new_tokens, kv_cache, sampler, stats)
    elif mode == "snlp":
        snlp = compiled_forward(model, snlp_config)
        prefill = snlp if snlp_config.prefill == "snlp" else exact
        chunks = _stepwise(prefill, snlp, prompt, max_new_tokens, kv_cache, sampler, stats)
    else:
        snlp = compiled_forward(model, snlp_config)
        chunks = _speculative(snlp, exact, prompt, max_new_tokens, kv_cache, sampler, draft_len, stats)
    return TokenStream(chunks, prompt, stats)


def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    config: SNLPConfig | Mapping[str, Any] | None = None,
    mode: str = "snlp",
    temperature: float = 0.0,
    top_k: int | None = None,
    draft_len: int = 4,
    generator: torch.Generator | None = None,
    kv_cache: StaticKVCache | None = None,
    compile_sequential: bool = False,
) -> Generation:
    """`stream` drained: the prompt and its `max_new_tokens` new tokens [B, T + max_new_tokens], and stats."""
    tokens = stream(
        model,
        prompt_ids,
        max_new_tokens,
        config,
        mode,
        temperature,
        top_k,
        draft_len,
        generator,
        kv_cache,
        compile_sequential,
    )
    return Generation(torch.cat([tokens.prompt, *tokens], dim=1), tokens.stats)
