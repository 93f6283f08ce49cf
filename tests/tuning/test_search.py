"""The tuner's choice and pruning on synthetic cost tables: the fastest setting within budget, found
without scoring dominated settings or timing settings that cannot win."""

import pytest
import torch

from snlp_compile import SNLPConfig, tune
from snlp_compile.tuning.result import DOMINATED, OUT_OF_TIME, OVER_BUDGET, REFUSED, TIMED
from snlp_compile.tuning.search import no_more_work
from tests.tuning.synthetic import TableMeasure, table_ms

SPACE = {"n_seq": [0, 1, 2], "fuse": [1, 2], "blocks": [1, 2], "iters": [1, 2, 3], "init": ["h0", "batch_fwd"]}
DATA = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _within(measure: TableMeasure, metric: str, budget: float, quality: float) -> bool:
    if metric == "loss":
        return quality <= (1 + budget) * measure.sequential_quality
    return quality >= 1 - budget


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(
    "metric, sequential, spread, budget",
    [("loss", (2.0, 10.0), (0.95, 1.4), 0.1), ("agreement", (1.0, 10.0), (0.6, 1.0), 0.2)],
)
def test_choice_is_the_fastest_setting_within_budget(tiny_gpt, seed, metric, sequential, spread, budget):
    measure = TableMeasure(sequential, spread, seed)
    data = DATA if metric == "loss" else None
    result = tune(tiny_gpt, data, budget, space=SPACE, measure=measure, progress=False)
    assert result.metric == metric
    settings = [p.config for p in result.frontier]
    assert len(set(settings)) == len(settings)
    for config in settings:
        config.check_depth(4)
    # Brute force over the whole table, scored or not.
    within = [c for c in settings if _within(measure, metric, budget, measure.table_quality(c))]
    assert within, "the table must leave some setting within budget"
    fastest = min(table_ms(c) for c in within)
    assert result.config is not None and result.chosen is not None
    assert table_ms(result.config) == fastest == result.chosen.ms
    assert _within(measure, metric, budget, measure.table_quality(result.config))
    assert result.speedup == pytest.approx(measure.sequential_ms / fastest)
    # Pruning: dominated settings are never scored, only settings within budget are timed, and no
    # timed setting does at least the work of another one within budget.
    by_status = {s: [p.config for p in result.frontier if p.status == s] for s in (TIMED, OVER_BUDGET, DOMINATED)}
    assert sorted(map(str, measure.scored)) == sorted(map(str, by_status[TIMED] + by_status[OVER_BUDGET]))
    assert sorted(map(str, measure.timed)) == sorted(map(str, by_status[TIMED]))
    assert by_status[DOMINATED], "this space has settings that cannot win"
    for point in result.frontier:
        assert (point.ms is not None) == (point.status == TIMED)
        assert (point.quality is not None) == (point.status in (TIMED, OVER_BUDGET))
        if point.status == TIMED:
            assert point.within_budget
            assert not any(no_more_work(other, point.config) for other in by_status[TIMED] if other != point.config)
        if point.status == OVER_BUDGET:
            assert point.within_budget is False
        if point.status == DOMINATED:
            assert point.within_budget is None
            assert any(no_more_work(c, point.config) for c in by_status[TIMED])


def test_sequential_when_nothing_is_within_budget(tiny_gpt):
    measure = TableMeasure((2.0, 10.0), (1.2, 1.5))
    result = tune(tiny_gpt, DATA, 0.1, space=SPACE, measure=measure, progress=False)
    assert result.config is None and result.chosen is None and result.speedup == 1.0
    assert "no setting is within budget" in result.reason
    assert measure.timed == [] and all(p.status in (OVER_BUDGET, DOMINATED) for p in result.frontier)
    assert not any(p.status == DOMINATED for p in result.frontier)  # nothing within budget dominates


def test_sequential_when_nothing_within_budget_is_faster(tiny_gpt):
    measure = TableMeasure((2.0, 0.5), (0.9, 1.0))
    result = tune(tiny_gpt, DATA, 0.1, space=SPACE, measure=measure, progress=False)
    assert result.config is None and "faster than sequential" in result.reason
    assert measure.timed and result.baseline.ms == 0.5
    assert all(p.ms > result.baseline.ms for p in result.frontier if p.status == TIMED)


def test_a_refused_setting_is_reported_and_skipped(tiny_gpt):
    cheapest = SNLPConfig(iters=1)
    measure = TableMeasure((2.0, 10.0), (0.9, 1.0), refuse=(cheapest,))
    result = tune(tiny_gpt, DATA, 0.1, space=[{"iters": 1}, {"iters": 2}], measure=measure, progress=False)
    refused, other = result.frontier
    assert refused.config == cheapest and refused.status == REFUSED and "cannot rewrite" in refused.detail
    assert refused.quality is None and refused.ms is None
    assert other.status == TIMED and result.config == other.config == SNLPConfig(iters=2)


def test_settings_that_cap_to_one_solve_are_one_setting(tiny_gpt):
    measure = TableMeasure((2.0, 10.0), (1.2, 1.5))
    space = {"iters": [4, 8, 16], "n_seq": [0, 9]}  # iters >= 4 is exact on 4 layers; n_seq 9 fits no stack of 4
    result = tune(tiny_gpt, DATA, 0.1, space=space, measure=measure, progress=False)
    assert [p.config for p in result.frontier] == [SNLPConfig(iters=4)]


def test_time_limit_stops_measuring_and_reports_the_rest(tiny_gpt, monkeypatch, caplog):
    """No setting starts after time_limit: the cheapest settings are measured, the rest are "out of
    time", and the choice is the fastest measured one within budget (a fake clock: the start at 0 s,
    then 1 s per setting)."""
    clock = iter(range(10_000))
    monkeypatch.setattr("time.monotonic", lambda: float(next(clock)))
    measure = TableMeasure((2.0, 10.0), (0.95, 1.4), 0)
    with caplog.at_level("WARNING", logger="snlp_compile"):
        result = tune(tiny_gpt, DATA, 0.1, space=SPACE, measure=measure, progress=False, time_limit=5)
    out = [p for p in result.frontier if p.status == OUT_OF_TIME]
    measured = [p for p in result.frontier if p.status in (TIMED, OVER_BUDGET)]
    assert len(measured) == 4 and out and all(p.quality is None and p.ms is None for p in out)
    assert max(p.config.iters for p in measured) <= min(p.config.iters for p in out)  # cheapest first
    assert result.chosen is not None and result.chosen.ms == min(p.ms for p in measured if p.status == TIMED)
    assert f"{len(out)} of {len(result.frontier)} settings not measured" in caplog.text
    with pytest.raises(ValueError, match="time_limit must be None or a finite number of seconds > 0, got 0"):
        tune(tiny_gpt, DATA, 0.1, space=SPACE, measure=measure, time_limit=0)
