"""generate / stream: decoding with a KV cache in sequential, SNLP or self-speculative mode.

Invariants:

- `generate` is `stream` drained; `stream` validates every argument before any model call.
- The cache holds exact (or, in mode "snlp", SNLP) K/V of every token fed back so far and
  nothing else: the last new token is never fed back, so a run needs
  `prompt_len + max_new_tokens - 1` positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..config import SNLPConfig, check_int, is_int_in
from .cache import DecodableModel, KVCache, check_cache, decodable
from .compiled import Forward, compiled_forward, eager_forward
from .cuda_graph import graphs_for
from .sampling import Sampler
from .speculative import RoundGraphs, speculative
from .stats import GenerationStats, timed

MODES = ("snlp", "sequential", "speculative")


@dataclass
class Generation:
    """tokens: [B, prompt_len + new_tokens] int64 (prompt included); stats: the run's counters."""

    tokens: Tensor
    stats: GenerationStats


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
    model: DecodableModel,
    prompt_ids: Tensor,
    max_new_tokens: int,
    mode: str,
    temperature: float,
    top_k: int | None,
    draft_len: int,
) -> Tensor:
    """Validate everything that needs no cache; return the prompt as [B, T]."""
    vocab_size, context = model.vocab_size, model.max_seq_len
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("draft_len", draft_len)):
        check_int(name, value, 1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not is_int_in(top_k, 1, vocab_size):
        raise ValueError(f"top_k must be None or an integer in [1, vocab_size={vocab_size}], got {top_k!r}")
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
    if length > context:
        raise ValueError(f"prompt length {length} exceeds the model's context max_seq_len={context}")
    if length + max_new_tokens > context:
        raise ValueError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} exceeds the model's context "
            f"max_seq_len={context}; max_new_tokens must be <= {context - length}"
        )
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
        raise ValueError(f"prompt_ids must be token ids in [0, vocab_size={vocab_size})")
    return prompt


@torch.no_grad()
def _stepwise(
    prefill: Forward,
    step: Forward,
    prompt: Tensor,
    n_new: int,
    cache: KVCache,
    sampler: Sampler,
    stats: GenerationStats,
) -> Iterator[Tensor]:
    """One forward per new token; yields [B, 1] chunks."""
    token = sampler.next_token(prefill(prompt, cache))
    stats.model_calls = 1
    yield token
    for _ in range(n_new - 1):
        token = sampler.next_token(step(token, cache))
        stats.model_calls += 1
        yield token


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
    kv_cache: KVCache | None = None,
    compile_sequential: bool = False,
) -> TokenStream:
    """Decode `max_new_tokens` tokens after `prompt_ids`, yielding them as they are produced.

    model: a decoder that meets `DecodableModel` (`forward(idx, kv_cache=cache) -> logits`, a cache
        factory and its limits), such as the `snlp_compile.models` decoders, or a Hugging Face
        decoder-only causal LM (decoded through `hf_decoder`, with a StackedStaticCache).
    prompt_ids: int tensor [T] or [B, T], ids in [0, vocab_size), T + max_new_tokens <= max_seq_len.
    config: SNLPConfig (or its fields) of the SNLP model; None = SNLPConfig(); in "sequential" mode
        only its cudagraphs field is used (for compile_sequential).
    mode: "sequential" (the model itself), "snlp" (decode steps through the SNLP-compiled model;
        the prompt too when config.prefill == "snlp"), "speculative" (SNLP drafts, sequential
        verification: the sequential model's output distribution, exactly).
    temperature: 0 = greedy, > 0 samples from softmax(logits / temperature), restricted to top_k.
    draft_len: speculative tokens drafted per verification, >= 1.
    generator: random source for sampling, on the model's device.
    kv_cache: a cache (a `KVCache`) to reuse, reset first, instead of one from `model.make_kv_cache`;
        reusing one of fixed size avoids dynamo recompiling for a new cache shape.
    compile_sequential: run the sequential forwards (mode "sequential", prefill, verification)
        through torch.compile with inductor, with CUDA graphs ("reduce-overhead") when
        config.cudagraphs is on; in speculative mode on CUDA, config.cudagraphs captures each full
        round's drafting and verifying as two CUDA graphs instead (kept per cache while the model's
        parameters keep their addresses: speculative.RoundGraphs).

    Returns a TokenStream of [B, n] chunks: one token per step, or each verified chunk in
    speculative mode. Grad mode is off inside each step only; the model's weights are not touched.
    """
    decoder = decodable(model)
    prompt = _check_arguments(decoder, prompt_ids, max_new_tokens, mode, temperature, top_k, draft_len)
    snlp_config = SNLPConfig.from_options(config)
    weight = next(model.parameters())
    prompt = prompt.to(weight.device)
    batch, needed = prompt.size(0), prompt.size(1) + max_new_tokens - 1
    if kv_cache is None:
        kv_cache = decoder.make_kv_cache(batch, needed, weight.device, weight.dtype)
    cache = check_cache(kv_cache, decoder, batch, needed, weight.device)
    cache.reset()

    # speculative rounds as CUDA graphs of their own (speculative.RoundGraphs), so their forwards are
    # compiled without inductor's CUDA graphs
    round_graphs = mode == "speculative" and compile_sequential and snlp_config.cudagraphs and prompt.is_cuda
    exact = (
        compiled_forward(decoder, None, snlp_config.cudagraphs and not round_graphs)
        if compile_sequential
        else partial(eager_forward, decoder)
    )
    sampler = Sampler(float(temperature), top_k, generator)
    stats = GenerationStats(mode=mode, batch_size=batch, prompt_len=prompt.size(1))
    if mode == "sequential":
        chunks = _stepwise(exact, exact, prompt, max_new_tokens, cache, sampler, stats)
    elif mode == "snlp":
        snlp = compiled_forward(decoder, snlp_config)
        prefill = snlp if snlp_config.prefill == "snlp" else exact
        chunks = _stepwise(prefill, snlp, prompt, max_new_tokens, cache, sampler, stats)
    else:
        graphs = None
        if round_graphs:
            setting = (id(model), model.training, snlp_config, draft_len, float(temperature), top_k, batch)
            graphs = RoundGraphs(graphs_for(cache, setting, model), model)
            snlp_config = snlp_config.replace(cudagraphs=False)
        draft = compiled_forward(decoder, snlp_config)
        chunks = speculative(draft, exact, prompt, max_new_tokens, cache, sampler, draft_len, stats, graphs)
    return TokenStream(timed(chunks, stats, prompt.device), prompt, stats)


def generate(model: nn.Module, prompt_ids: Tensor, max_new_tokens: int, *args: Any, **kwargs: Any) -> Generation:
    """`stream(model, prompt_ids, max_new_tokens, *args, **kwargs)` drained (the arguments are
    `stream`'s, checked there): the prompt and its new tokens [B, T + max_new_tokens], and stats."""
    tokens = stream(model, prompt_ids, max_new_tokens, *args, **kwargs)
    return Generation(torch.cat([tokens.prompt, *tokens], dim=1), tokens.stats)
