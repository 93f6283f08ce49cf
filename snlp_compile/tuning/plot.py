"""The tuner's speed-quality plot: ms per forward against quality, with the budget line, the
sequential baseline and the chosen setting marked.

Settings scored but not timed (over budget) have no ms: they are drawn as ticks at the left edge,
at their quality. Dominated and refused settings have neither and are only counted in the title.
"""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from .result import OVER_BUDGET, TIMED

if TYPE_CHECKING:
    from .result import TuneResult


def plot_result(result: TuneResult, path: str | PathLike[str]) -> None:
    """Write the plot of `result` to `path`."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    timed = [p for p in result.frontier if p.status == TIMED]
    over = [p for p in result.frontier if p.status == OVER_BUDGET]
    ax.scatter([p.ms for p in timed], [p.quality for p in timed], color="tab:blue", label="within budget (timed)")
    if over:  # x in axes coordinates (the left edge), y in data: ax.plot's limits include them, scatter's would not
        ax.plot(
            [0.015] * len(over),
            [p.quality for p in over],
            ls="",
            marker="_",
            ms=14,
            color="tab:gray",
            transform=ax.get_yaxis_transform(),
            label="over budget (not timed)",
        )
    ax.scatter([result.baseline.ms], [result.baseline.quality], marker="s", color="black", label="sequential")
    ax.axhline(
        result.criterion.threshold,
        color="tab:red",
        ls="--",
        lw=1,
        label=f"budget {result.criterion.budget:g}: {result.criterion}",
    )
    chosen = result.chosen
    if chosen is not None:
        ax.scatter([chosen.ms], [chosen.quality], marker="*", s=260, color="tab:orange", zorder=3, label="chosen")
    text, at = ("chosen: sequential", result.baseline) if chosen is None else (chosen.label(), chosen)
    ax.annotate(text, (at.ms, at.quality), fontsize=7, xytext=(6, 6), textcoords="offset points")
    skipped = len(result.frontier) - len(timed) - len(over)
    ax.set_title(
        f"{len(result.frontier)} settings: {len(timed)} timed, {len(over)} over budget, {skipped} not scored",
        fontsize=9,
    )
    ax.set_xlabel("ms per forward (median)")
    ax.set_ylabel("validation loss" if result.metric == "loss" else "top-1 agreement with sequential")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
