"""PNG plots of benchmark rows (matplotlib, Agg backend): latency bars, the speed-quality frontier,
paired bars of kernel benchmarks and the rounds of the interleaved eager benchmark.

Rows are the result rows of benchmarks/harness.py; only rows with a measured time ("ms") are drawn. This
module draws only: it imports no other benchmark module but the plain row helpers of benchmarks/report.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import ordered  # noqa: E402

_ERR_FLOOR = 1e-7  # relative errors below this (eager against itself) are drawn at it on the log axis


def _groups(rows: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r["preset"], r["batch"]) for r in rows if r.get("ms") is not None))


def plot_latency(rows: Sequence[dict[str, Any]], path: Path, title: str, value: str = "ms") -> None:
    """Horizontal bars of `value` per variant, one panel per (preset, batch); lines at the best
    baseline and at the HBM floor (when known)."""
    groups = _groups(rows)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.5 + 0.32 * max(len(rows) / len(groups), 4) * len(groups)))
    axes = [axes] if len(groups) == 1 else list(axes)
    for ax, (preset, batch) in zip(axes, groups, strict=True):
        group = [r for r in ordered(rows) if (r["preset"], r["batch"]) == (preset, batch) and r.get("ms") is not None]
        names = [r["variant"] for r in group]
        colors = ["tab:gray" if r["kind"] == "baseline" else "tab:blue" for r in group]
        hatches = ["//" if r["cudagraphs"] else "" for r in group]
        bars = ax.barh(names, [r[value] for r in group], color=colors)
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
        best = min((r["ms"] for r in group if r["kind"] == "baseline"), default=None)
        if best is not None and value == "ms":
            ax.axvline(best, color="tab:red", ls="--", lw=1, label=f"best sequential {best:.3f} ms")
        floor = group[0].get("floor_ms")
        if floor and value == "ms":
            ax.axvline(floor, color="black", ls=":", lw=1, label=f"HBM floor {floor:.3f} ms")
        ax.invert_yaxis()
        ax.set_title(f"{preset}, batch {batch}", fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel(f"{value} (log scale)")
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title} (gray: sequential, blue: SNLP, hatched: CUDA graphs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frontier(points: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Speedup over the best sequential baseline against quality (relative logit error, top-1
    agreement), one marker per question, one color per preset; Pareto points are labelled."""
    fig, (ax_err, ax_top1) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    markers = {"forward": "o", "decode": "s"}
    presets = list(dict.fromkeys(p["preset"] for p in points))
    colors = {name: f"C{i}" for i, name in enumerate(presets)}
    for p in points:
        face = colors[p["preset"]] if p["cudagraphs"] else "none"
        style = dict(marker=markers.get(p["question"], "^"), color=colors[p["preset"]], markerfacecolor=face)
        ax_err.plot([max(p["rel_err"], _ERR_FLOOR)], [p["speedup_best"]], ls="", **style)
        ax_top1.plot([p["top1"]], [p["speedup_best"]], ls="", **style)
        if p.get("pareto"):
            label = p["variant"].removeprefix("snlp ")
            ax_err.annotate(label, (max(p["rel_err"], _ERR_FLOOR), p["speedup_best"]), fontsize=6, alpha=0.8)
    for ax in (ax_err, ax_top1):
        ax.axhline(1.0, color="tab:red", ls="--", lw=1)
        ax.grid(alpha=0.3)
    ax_err.set_xscale("log")
    # labels at 1, 2 and 5 per decade only: the default minor labels of a short decade overlap
    ax_err.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_err.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_err.set_xlabel("relative error of the logits vs sequential")
    ax_top1.set_xlabel("top-1 agreement with sequential")
    ax_err.set_ylabel("speedup vs best sequential baseline")
    handles = [
        plt.Line2D([], [], marker=markers.get(q, "^"), color="k", ls="", label=q)
        for q in dict.fromkeys(p["question"] for p in points)
    ]
    handles += [plt.Line2D([], [], marker="o", color=colors[n], ls="", label=n) for n in presets]
    handles.append(plt.Line2D([], [], marker="o", color="k", markerfacecolor="none", ls="", label="no CUDA graphs"))
    ax_top1.legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_paired_bars(
    labels: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]], path: Path, xlabel: str, title: str
) -> None:
    """Horizontal bars, one row per label and one bar per (name, values, color) series side by side."""
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.4 * len(labels)))
    height = 0.8 / len(series)
    for i, (name, values, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * height
        ax.barh([j + offset for j in range(len(labels))], values, height=height, color=color, label=name)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_interleaved(rounds: list[dict[str, Any]], summary: dict[str, float], path: Path, title: str) -> None:
    """Per round: both sides' median times (top) and their ratio (bottom, with the median ratio)."""
    x = [r["round"] for r in rounds]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(x, [r["eager_ms"] for r in rounds], "o-", color="tab:gray", label="eager model")
    top.plot(x, [r["snlp_ms"] for r in rounds], "o-", color="tab:blue", label="SNLP, eager inner")
    top.set_ylabel("ms per forward (round median)")
    top.set_ylim(bottom=0)
    top.legend()
    top.set_title(title)
    bottom.plot(x, [r["ratio"] for r in rounds], "o-", color="tab:green")
    bottom.axhline(summary["ratio_median"], ls="--", color="tab:green", label=f"median {summary['ratio_median']:.2f}x")
    bottom.set_ylabel("eager / SNLP")
    bottom.set_xlabel("round")
    bottom.set_ylim(bottom=0)
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
