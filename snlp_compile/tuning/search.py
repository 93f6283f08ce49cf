"""The pruned search: score settings cheapest first, skip those that cannot win, time those that can.

Cost model (the one assumption of the pruning): a setting does no more work than another when both
agree on every option but iters and init, with no more iterations and init "h0" or the same init
(batch_fwd adds one batched evaluation); such a setting is at least as fast. So once a setting is
within budget, every setting that does at least its work is `DOMINATED`: neither scored nor timed.
Settings are visited in an order that puts each after every setting doing no more work than it, so
a setting within budget when visited can no longer be dominated: it is timed right away (a Measure
may reuse the compile it scored with), and settings over budget are never timed. With a deadline,
no setting starts after it: the rest are `OUT_OF_TIME` (cheapest first, so the fastest candidates
are the ones measured).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from tqdm import tqdm

from ..backends.fallback import SNLPFallbackError
from ..config import SNLPConfig
from .measure import Measure
from .quality import Criterion
from .result import DOMINATED, OUT_OF_TIME, OVER_BUDGET, REFUSED, TIMED, Point

logger = logging.getLogger("snlp_compile")


def no_more_work(a: SNLPConfig, b: SNLPConfig) -> bool:
    """a does no more work than b: the same options but iters <= b's, and init h0 or b's init."""
    return a.replace(iters=b.iters, init=b.init) == b and a.iters <= b.iters and a.init in ("h0", b.init)


def _work_order(config: SNLPConfig) -> tuple[int, bool]:
    """A sort key that lists a setting after every setting that does no more work than it."""
    return config.iters, config.init == "batch_fwd"


def _measure(point: Point, measure: Measure, criterion: Criterion) -> None:
    """Score the point; time it when within budget; a refused graph marks it REFUSED."""
    try:
        point.quality = measure.quality(point.config)
        point.within_budget = criterion.within(point.quality)
        if not point.within_budget:
            point.status = OVER_BUDGET
            return
        point.ms, point.status = measure.time_ms(point.config), TIMED
    except SNLPFallbackError as error:
        point.status, point.detail = REFUSED, str(error).splitlines()[0]
        logger.info("snlp tune: %s refused: %s", point.label(), point.detail)


def search(
    settings: Sequence[SNLPConfig],
    measure: Measure,
    criterion: Criterion,
    progress: bool,
    deadline: float | None = None,
) -> list[Point]:
    """Every setting as a Point, in the given order: scored unless dominated, timed when within budget;
    deadline: a `time.monotonic()` after which no setting is measured (OUT_OF_TIME)."""
    points = {config: Point(config) for config in settings}
    within: list[Point] = []
    skipped = 0
    for config in tqdm(sorted(settings, key=_work_order), desc="snlp tune", disable=not progress):
        point = points[config]
        cheaper = next((p for p in within if no_more_work(p.config, config)), None)
        if cheaper is not None:
            point.status, point.detail = DOMINATED, f"{cheaper.label()} is within budget with no more work"
            continue
        if deadline is not None and time.monotonic() >= deadline:
            point.status, point.detail, skipped = OUT_OF_TIME, "the time limit ran out first", skipped + 1
            continue
        _measure(point, measure, criterion)
        if point.within_budget:
            within.append(point)
    if skipped:
        logger.warning("snlp tune: the time limit ran out: %d of %d settings not measured", skipped, len(settings))
    return list(points.values())
