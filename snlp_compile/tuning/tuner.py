"""`tune`: the fastest SNLP setting of a model whose quality stays within a budget of the sequential model's."""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import Tensor, nn

from ..backends.report import find_layer_stack
from ..config import SNLPConfig
from .arguments import check_arguments, check_token_range
from .measure import Measure, ModelMeasure
from .model_io import model_device, random_tokens, vocab_size
from .quality import Criterion
from .result import OUT_OF_TIME, TIMED, Baseline, Point, TuneResult
from .search import search
from .space import Space, StackDepth, default_space, expand

logger = logging.getLogger("snlp_compile")


def _stack_depths(model: nn.Module, tokens: Tensor) -> list[StackDepth]:
    """The depth of every layer stack the compiler finds in `model(tokens)`; ValueError when none."""
    reports = find_layer_stack(model, (tokens,))
    found = [StackDepth.of(r) for r in reports if r.found]
    if not found:
        raise ValueError(f"tune: the compiler finds no layer stack in this model: {reports[0].reason}")
    return found


def _choose(frontier: list[Point], baseline: Baseline) -> tuple[Point | None, str]:
    """The fastest timed setting if it beats the baseline, else None and why."""
    timed = [p for p in frontier if p.status == TIMED]
    if not timed:
        cut_short = any(p.status == OUT_OF_TIME for p in frontier)
        return None, f"no setting {'measured within the time limit ' if cut_short else ''}is within budget"
    best = min(timed, key=lambda p: p.ms)
    if best.ms >= baseline.ms:
        times = f"best {best.ms:.3f} ms vs {baseline.ms:.3f} ms"
        return None, f"no setting within budget is faster than sequential ({times})"
    return best, ""


def tune(
    model: nn.Module,
    data: Tensor | None = None,
    budget: float = 0.01,
    *,
    space: Space | None = None,
    base: SNLPConfig | dict[str, Any] | None = None,
    inputs: Tensor | None = None,
    measure: Measure | None = None,
    warmup: int = 2,
    reps: int = 5,
    progress: bool = True,
    time_limit: float | None = None,
) -> TuneResult:
    """The fastest setting of (n_seq, fuse, blocks, iters, init) whose quality stays within `budget`.

    Quality: with `data` (LongTensor [N, T], T >= 2, one forward of the whole tensor), the validation
    loss (next-token cross-entropy) must satisfy loss <= (1 + budget) * the sequential model's loss on
    it; with data None, the top-1 agreement with the sequential model must be >= 1 - budget on
    `inputs`, by default 1 x 64 token ids drawn uniformly from [0, V) (V read off the logits) by a CPU
    generator seeded with 0 (`model_io.random_tokens`). Speed: the median of `reps` forward times
    after `warmup` calls (the first compiles) of torch.compile(..., backend="snlp", options=setting)
    on the model's device, on the same tokens, against the sequential model compiled the same way
    (inductor, or the eager model when base's inner is "eager").

    space: axis -> values (their product is searched) or a list of settings (dicts axis -> value);
    by default `tuning.space.default_space` of the stack's depth L. base: the options every setting
    shares (inner, surrogate, cudagraphs, ...). inputs: the token ids without data (pass data or
    inputs, not both). measure: scores settings instead of the model (`Measure`). Settings are scored
    with inner="eager", and only those within budget that can still win are timed (`search`).
    time_limit: seconds (> 0) after which no further setting is measured (the baseline and the
    settings measured by then decide; the rest are "out of time" in the frontier); None: no limit.
    Returns a TuneResult whose config is None (the sequential model) when no setting within budget
    is faster than the sequential model. Weight values are not changed (like any snlp compile, the
    backend may move layer parameters into one stacked storage); call it on a model in eval mode.
    """
    started = time.monotonic()
    base = check_arguments(model, data, budget, inputs, space, base, measure, warmup, reps, time_limit)
    if model.training:
        logger.warning("snlp tune: the model is in training mode (dropout draws differ per call); call model.eval()")
    device = model_device(model)
    vocab = vocab_size(model, device)
    name, tokens = ("data", data) if data is not None else ("inputs", inputs)
    if tokens is None:
        tokens = random_tokens(vocab, device)
    check_token_range(name, tokens, vocab)
    tokens = tokens.to(device)
    depths = _stack_depths(model, tokens)
    settings = expand(default_space(min(d.total for d in depths)) if space is None else space, base, depths)
    metric = "loss" if data is not None else "agreement"
    measure = measure or ModelMeasure(model, tokens, metric, base, warmup, reps)
    baseline = Baseline(measure.time_ms(None), measure.quality(None))
    criterion = Criterion.of(metric, float(budget), baseline.quality)
    logger.info("snlp tune: %d settings, within budget when %s", len(settings), criterion)
    deadline = None if time_limit is None else started + time_limit
    frontier = search(settings, measure, criterion, progress, deadline)
    chosen, reason = _choose(frontier, baseline)
    result = TuneResult(None if chosen is None else chosen.config, frontier, baseline, criterion, chosen, reason)
    logger.info("snlp tune: chose %s", result.config or f"sequential: {reason}")
    return result
