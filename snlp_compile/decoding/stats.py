"""The counters of one decoding run, the wrapper that times it and counts its tokens, and the timer of
its phases (drafting, verifying) that syncs with the device once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class GenerationStats:
    """Counters of one decoding run; complete once its stream is exhausted.

    model_calls counts every forward (prefill, decode steps, drafts and verifications); drafted
    and accepted count speculative draft tokens (per sequence; a batch accepts the shortest row's
    agreeing prefix). seconds is wall time from the first token request to the end (synchronised),
    including any compilation the run triggers. phase_seconds (speculative mode): time spent drafting
    ("draft") and verifying ("verify", the verifying forward with its sampling), on the device's
    clock (`PhaseTimer`).
    """

    mode: str
    batch_size: int
    prompt_len: int
    new_tokens: int = 0
    model_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)

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


class PhaseTimer:
    """Time spent in named phases of a loop without a host sync per phase: CUDA events on `device`'s
    current stream (read once, in `totals`), or the host clock on other devices (whose ops run
    synchronously). Every name in `names` has a total, 0.0 when its phase never ran."""

    def __init__(self, device: torch.device, names: tuple[str, ...] = ()) -> None:
        self._device = device
        self._names = names
        self._spans: list[tuple[str, Any, Any]] = []

    def _now(self) -> Any:
        """A point in time: a recorded CUDA event, or the host clock."""
        if self._device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the code inside as one span of phase `name`."""
        start = self._now()
        yield
        self._spans.append((name, start, self._now()))

    def totals(self) -> dict[str, float]:
        """Seconds per phase name (synchronises with the device once)."""
        cuda = self._device.type == "cuda"
        if cuda and self._spans:
            self._spans[-1][2].synchronize()
        totals = dict.fromkeys(self._names, 0.0)
        for name, start, end in self._spans:
            totals[name] = totals.get(name, 0.0) + (start.elapsed_time(end) / 1000 if cuda else end - start)
        return totals
