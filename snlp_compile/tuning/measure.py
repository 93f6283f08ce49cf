"""How the tuner scores a setting: `Measure` (what any scorer provides) and `ModelMeasure` (the model
itself, compiled with the snlp backend, on fixed token ids).

Invariants of ModelMeasure: a config of None is the sequential model; every compile gets its own
dynamo cache (`fresh_function`), so no number of settings reaches dynamo's recompile limit, and only
the last one is kept (time_ms right after quality of one setting reuses it when both compile the
same); settings compile with fallback="error", so a graph the backend refuses raises
SNLPFallbackError instead of being measured as if it were SNLP. Quality runs with inner="eager"
(the same solve without an inductor compile); time runs the setting as given, against the
sequential model compiled the same way (inductor in the mode of cudagraphs / max_autotune, or the
eager model when inner="eager").
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..config import SNLPConfig
from ..fresh_code import fresh_function
from .model_io import logits_of
from .quality import Metric, next_token_loss, top1_agreement
from .timing import time_calls


class Measure(Protocol):
    """Scores of a setting; config None is the sequential model. `tune` calls quality(config) first
    and time_ms(config) right after it, only for a setting within budget that can still win."""

    def quality(self, config: SNLPConfig | None) -> float: ...

    def time_ms(self, config: SNLPConfig | None) -> float: ...


def forward(model: nn.Module, tokens: Tensor) -> Any:
    """`model(tokens)`: the function compiled, with the model an argument."""
    return model(tokens)


def inductor_mode(config: SNLPConfig) -> str | None:
    """The torch.compile mode that switches on what config's cudagraphs / max_autotune switch on."""
    return {
        (False, False): None,
        (True, False): "reduce-overhead",
        (False, True): "max-autotune-no-cudagraphs",
        (True, True): "max-autotune",
    }[(config.cudagraphs, config.max_autotune)]


class ModelMeasure:
    """Quality (`metric` of `quality.py`) and median forward time of `model` on `tokens`."""

    def __init__(
        self, model: nn.Module, tokens: Tensor, metric: Metric, base: SNLPConfig, warmup: int, reps: int
    ) -> None:
        self.model, self.tokens, self.metric, self.base = model, tokens, metric, base
        self.warmup, self.reps = warmup, reps
        self._last: tuple[SNLPConfig, Callable[[], Any]] | None = None
        with torch.no_grad():
            logits = logits_of(model(tokens))
        self.reference_top1 = logits.argmax(-1)
        self.sequential_score = self._score(logits)

    def _score(self, logits: Tensor) -> float:
        if self.metric == "loss":
            return next_token_loss(logits, self.tokens)
        return top1_agreement(logits, self.reference_top1)

    def _compiled(self, config: SNLPConfig) -> Callable[[], Any]:
        """The forward under config; the last one is kept, for time_ms right after quality of one setting."""
        if self._last is None or self._last[0] != config:
            options = dataclasses.asdict(config.replace(fallback="error"))
            compiled = torch.compile(fresh_function(forward), backend="snlp", options=options, dynamic=False)
            self._last = config, lambda: compiled(self.model, self.tokens)
        return self._last[1]

    def _sequential(self) -> Callable[[], Any]:
        if self.base.inner == "eager":
            return lambda: self.model(self.tokens)
        compiled = torch.compile(fresh_function(forward), mode=inductor_mode(self.base), dynamic=False)
        return lambda: compiled(self.model, self.tokens)

    @torch.no_grad()
    def quality(self, config: SNLPConfig | None) -> float:
        if config is None:
            return self.sequential_score
        run = self._compiled(config.replace(inner="eager", cudagraphs=False, max_autotune=False))
        return self._score(logits_of(run()))

    @torch.no_grad()
    def time_ms(self, config: SNLPConfig | None) -> float:
        run = self._sequential() if config is None else self._compiled(config)
        return statistics.median(time_calls(run, self.tokens.device, self.warmup, self.reps))
