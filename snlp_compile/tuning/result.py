"""What `tune` returns: every setting it considered, the sequential baseline and its choice.

Invariants: `config` is None exactly when the sequential model is the choice (no setting within
budget, or none within budget faster than the baseline), and `reason` then says which; otherwise
`chosen` is the frontier point of `config`, within budget, with the smallest ms of the frontier.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

from ..config import SNLPConfig
from .quality import Criterion
from .space import AXES

# Point.status values.
TIMED = "timed"
OVER_BUDGET = "over budget"  # quality measured, outside the budget: not timed
DOMINATED = "dominated"  # not measured: a setting with no more work is within budget, so this one cannot win
REFUSED = "refused"  # the backend refused the graph under this setting (SNLPFallbackError)
OUT_OF_TIME = "out of time"  # not measured: tune's time_limit ran out before its turn


@dataclass
class Point:
    """One setting of the search: its quality (loss or agreement, None when not measured), ms (None
    when not timed), whether the quality is within budget (None when not measured), and its status
    with the reason (`detail`) for a dominated or refused setting."""

    config: SNLPConfig
    quality: float | None = None
    ms: float | None = None
    within_budget: bool | None = None
    status: str = ""
    detail: str = ""

    def label(self) -> str:
        """The searched axes, e.g. "n_seq=0 fuse=1 blocks=1 iters=2 init=h0"."""
        return " ".join(f"{axis}={getattr(self.config, axis)}" for axis in AXES)


@dataclass(frozen=True)
class Baseline:
    """The sequential model: median ms per forward and its quality (its loss, or agreement 1.0)."""

    ms: float
    quality: float


@dataclass
class TuneResult:
    """The chosen configuration (None: run the model sequentially, `reason` says why), the frontier
    (every setting of the space, in its order) and the sequential baseline."""

    config: SNLPConfig | None
    frontier: list[Point]
    baseline: Baseline
    criterion: Criterion
    chosen: Point | None = None
    reason: str = ""

    @property
    def metric(self) -> str:
        """The score: "loss" (validation loss, lower is better) or "agreement" (top-1, higher is better)."""
        return self.criterion.metric

    @property
    def speedup(self) -> float:
        """Baseline ms over the chosen setting's ms (1.0 for the sequential fallback)."""
        return 1.0 if self.chosen is None else self.baseline.ms / self.chosen.ms

    def plot(self, path: str | PathLike[str]) -> None:
        """Draw speed against quality to `path` (any format matplotlib writes, by its suffix)."""
        from .plot import plot_result  # matplotlib is needed only here

        plot_result(self, path)

    def __str__(self) -> str:
        head = f"{'setting':<44}{self.metric:>11}{'ms':>10}  status"
        rows = [f"{'sequential':<44}{self.baseline.quality:>11.4f}{self.baseline.ms:>10.3f}  baseline"]
        for p in self.frontier:
            quality = "-" if p.quality is None else f"{p.quality:.4f}"
            ms = "-" if p.ms is None else f"{p.ms:.3f}"
            mark = "  <- chosen" if p is self.chosen else ""
            rows.append(f"{p.label():<44}{quality:>11}{ms:>10}  {p.status}{mark}")
        verdict = (
            f"chosen: {self.chosen.label()} ({self.speedup:.2f}x)"
            if self.chosen is not None
            else f"chosen: sequential: {self.reason}"
        )
        budget = f"budget {self.criterion.budget:g}: {self.criterion}"
        return "\n".join([head, *rows, budget, verdict])
