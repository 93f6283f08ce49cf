"""The settings the tuner searches: a space over (n_seq, fuse, blocks, iters, init), expanded into
SNLPConfigs valid for the model's layer stack(s).

Invariants: every expanded setting is `base` with only the space's axes changed, passes
`SNLPConfig.check_depth` for every stack as the backend applies it (the leading layers the detector
leaves out count towards n_seq), has `iters` capped where more change nothing (the cap the backend
applies), and appears once (settings that cap to the same solve are one setting).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.report import StackReport
from ..config import SNLPConfig
from ..passes.analysis.plan import cap_iters, stack_config

logger = logging.getLogger("snlp_compile")

AXES = ("n_seq", "fuse", "blocks", "iters", "init")

Space = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class StackDepth:
    """A found stack as the options count it: `layers` in the solve, after `excluded` leading layers
    the detector runs sequentially before it; `total` = layers + excluded is the depth L of n_seq."""

    layers: int
    excluded: int

    @classmethod
    def of(cls, report: StackReport) -> StackDepth:
        return cls(len(report.layers), len(report.excluded))

    @property
    def total(self) -> int:
        return self.layers + self.excluded

    def applied(self, config: SNLPConfig) -> SNLPConfig:
        """The configuration the backend applies to this stack (as `passes.analysis.analyse`);
        ValueError when config does not fit it."""
        return cap_iters(stack_config(config, self.excluded, self.layers), self.layers)[0]


def default_space(depth: int) -> dict[str, tuple[Any, ...]]:
    """The default space for a stack of depth L: n_seq 0, L // 4 and L // 2; fuse and blocks 1 and 2;
    iters 1, 2 and 4; both inits (settings that do not fit L are dropped when expanded)."""
    return {
        "n_seq": tuple(sorted({0, depth // 4, depth // 2})),
        "fuse": (1, 2),
        "blocks": (1, 2),
        "iters": (1, 2, 4),
        "init": ("h0", "batch_fwd"),
    }


def _rows(space: Space) -> list[dict[str, Any]]:
    """The space's settings as axis -> value dicts: the product of a mapping's values, or the list as is."""
    if isinstance(space, Mapping):
        names = list(space)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]
    return [dict(row) for row in space]


def expand(space: Space, base: SNLPConfig, depths: Sequence[StackDepth]) -> list[SNLPConfig]:
    """The distinct settings of `space` applied to `base` that fit every stack, in the space's order,
    iters capped at the most any stack uses; ValueError when none fits."""
    settings: dict[SNLPConfig, None] = {}
    misfits: list[str] = []
    for row in _rows(space):
        config = base.replace(**row)
        try:
            capped = max(depth.applied(config).iters for depth in depths)
        except ValueError as error:
            misfits.append(f"{row}: {error}")
            continue
        settings.setdefault(config.replace(iters=capped), None)
    if misfits:
        logger.info("snlp tune: %d setting(s) do not fit the stack and are skipped, e.g. %s", len(misfits), misfits[0])
    if not settings:
        layers = ", ".join(f"{d.total} layers" for d in depths)
        raise ValueError(f"tune: no setting of the space fits the layer stack ({layers}); e.g. {misfits[0]}")
    return list(settings)
