"""The counters of one decoding run, and the wrapper that times it and counts its tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


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


def timed(chunks: Iterator[Tensor], stats: GenerationStats, device: torch.device) -> Iterator[Tensor]:
    """`chunks` [B, n], counted into `stats.new_tokens`; `stats.seconds` runs from the first request
    to exhaustion (device synchronised)."""
    start = time.perf_counter()
    for chunk in chunks:
        stats.new_tokens += chunk.size(1)
        yield chunk
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
