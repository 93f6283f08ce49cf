"""A Measure driven by a synthetic cost table, recording what the tuner asks of it."""

from __future__ import annotations

import random

from snlp_compile import SNLPConfig
from snlp_compile.backends.fallback import SNLPFallbackError


def table_ms(config: SNLPConfig) -> float:
    """A time that grows with the work of a setting (iters, batch_fwd init), as the tuner's pruning assumes,
    and otherwise varies with n_seq, fuse and blocks."""
    work = 0.5 * config.iters + 0.31 * (config.init == "batch_fwd")
    return 1.0 + work + 0.17 * config.n_seq + 0.07 * config.blocks - 0.013 * config.fuse


class TableMeasure:
    """quality / time_ms from a synthetic table; None is the sequential model. A setting's quality is
    drawn uniformly from `spread` (relative to the sequential quality) by a generator seeded with the
    seed and the setting, so `table_quality` knows every setting's quality, scored or not. Settings
    in `refuse` raise SNLPFallbackError as a refused graph does."""

    def __init__(
        self,
        sequential: tuple[float, float],
        spread: tuple[float, float],
        seed: int = 0,
        refuse: tuple[SNLPConfig, ...] = (),
    ):
        self.sequential_quality, self.sequential_ms = sequential
        self.spread, self.seed, self.refuse = spread, seed, refuse
        self.scored: list[SNLPConfig] = []
        self.timed: list[SNLPConfig] = []

    def table_quality(self, config: SNLPConfig) -> float:
        return random.Random(f"{self.seed} {config}").uniform(*self.spread) * self.sequential_quality

    def quality(self, config: SNLPConfig | None) -> float:
        if config is None:
            return self.sequential_quality
        if config in self.refuse:
            raise SNLPFallbackError(f"snlp: cannot rewrite this graph under {config}")
        self.scored.append(config)
        return self.table_quality(config)

    def time_ms(self, config: SNLPConfig | None) -> float:
        if config is None:
            return self.sequential_ms
        self.timed.append(config)
        return table_ms(config)
