"""Result documents: the JSON on disk, speedups against the baselines, and the printed tables.

A result document is {"question", "env", "settings", "rows", ...}; a row of the latency benchmarks
carries preset, batch, variant, kind ("baseline" | "snlp"), cudagraphs and status, and, when timed, ms.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SWEEP_HEADERS = ["best us", "best tiles"]


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Per (preset, batch): speedup of each timed row against each baseline and the best baseline,
    its fraction of the HBM floor (floor_ms / ms) and its tokens/s (tokens per call / time)."""
    for row in rows:
        if row.get("ms") is None:
            continue
        group = [r for r in rows if r["preset"] == row["preset"] and r["batch"] == row["batch"]]
        baselines = {r["variant"]: r["ms"] for r in group if r["kind"] == "baseline" and r.get("ms")}
        row["speedup"] = {name: ms / row["ms"] for name, ms in baselines.items()}
        if baselines:
            best = min(baselines, key=baselines.get)
            row.update(best_baseline=best, speedup_best=baselines[best] / row["ms"])
        if row.get("floor_ms"):
            row["floor_frac"] = row["floor_ms"] / row["ms"]
        if row.get("tokens"):
            row["tokens_per_s"] = row["tokens"] / row["ms"] * 1e3


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by (preset, batch) in order of appearance, baselines first, otherwise as measured."""
    groups = list(dict.fromkeys((r["preset"], r["batch"]) for r in rows))
    return sorted(rows, key=lambda r: (groups.index((r["preset"], r["batch"])), r["kind"] != "baseline"))


def result_table(rows: Sequence[dict[str, Any]], extra: Sequence[tuple[str, str, str]] = ()) -> tuple[list, list]:
    """Headers and cells of the standard result table; extra: (header, row key, format) columns."""
    baselines = list(dict.fromkeys(r["variant"] for r in rows if r["kind"] == "baseline"))
    headers = ["preset", "B", "variant", "ms", *[f"x {b}" for b in baselines], "x best", "floor %"]
    headers += [h for h, _, _ in extra] + ["rel err", "top1", "compile s", "status"]
    cells = []
    for r in ordered(rows):
        speedup = r.get("speedup", {})
        floor = r.get("floor_frac")
        cells.append(
            [r["preset"], str(r["batch"]), r["variant"], _fmt(r.get("ms"), ".3f")]
            + [_fmt(speedup.get(b), ".2f") for b in baselines]
            + [_fmt(r.get("speedup_best"), ".2f"), _fmt(floor * 100 if floor else None, ".1f")]
            + [_fmt(r.get(key), spec) for _, key, spec in extra]
            + [_fmt(r.get("rel_err"), ".2e"), _fmt(r.get("top1"), ".3f"), _fmt(r.get("compile_s"), ".0f")]
            + [r["status"] + (" (cg skipped)" if r["cudagraphs"] and r.get("cudagraph_skips") else "")]
        )
    return headers, cells


def sweep_cells(row: dict[str, Any]) -> list[str]:
    """The table cells under SWEEP_HEADERS for a row with `timing.launch_sweep`'s fields."""
    return [f"{row['best_us']:.2f}", str(tuple(row["best_tiles"]))]


def kernel_table(
    rows: Sequence[dict[str, Any]], headers: Sequence[str], cells: Callable[[dict[str, Any]], list[str]], sweep: bool
) -> str:
    """The table of a kernel benchmark: `cells(row)` under `headers`, and with `sweep` the sweep's columns."""
    if sweep:
        headers = [*headers, *SWEEP_HEADERS]
    return format_table(headers, [cells(r) + (sweep_cells(r) if sweep else []) for r in rows])


def format_table(headers: Sequence[str], cells: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A column-aligned text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *cells, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [headers, *cells]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def describe_env(doc: dict[str, Any]) -> str:
    """One line naming the hardware, versions, dtype and command of a result JSON."""
    env, settings = doc["env"], doc["settings"]
    hw = env["gpu"] or f"CPU ({env['cpu']})"
    return (
        f"{doc['question']}: {hw}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"{settings['dtype']}; command: {env['command']}"
    )
