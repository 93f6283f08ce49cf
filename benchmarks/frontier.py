"""The speed-quality frontier of SNLP from the JSONs of bench_forward.py and bench_decode.py.

For every measured SNLP row: speedup over the best sequential baseline of its (question, preset,
batch) against its quality (relative logit error and top-1 agreement with the sequential model on
random weights). A row is Pareto-optimal when no row of its group is at least as fast and at least
as accurate with one of the two strictly better. Writes OUT/frontier.png and OUT/results.md (the
environment, both result tables and the frontier, in markdown) and prints the frontier table.

    PYTHONPATH=. python3 benchmarks/frontier.py --inputs out/forward.json out/decode.json --out out
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import setup_logging
from benchmarks.plot import plot_frontier
from benchmarks.report import describe_env, format_table, load_json, result_table

logger = logging.getLogger("snlp_compile")


def frontier_points(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """SNLP rows with a time, a speedup and a quality, tagged with their question and Pareto flag."""
    points = [
        {**row, "question": doc["question"]}
        for doc in docs
        for row in doc["rows"]
        if row["kind"] == "snlp" and row.get("speedup_best") is not None and row.get("rel_err") is not None
    ]
    for p in points:
        group = [
            q for q in points if (q["question"], q["preset"], q["batch"]) == (p["question"], p["preset"], p["batch"])
        ]
        p["pareto"] = not any(
            q["speedup_best"] >= p["speedup_best"]
            and q["rel_err"] <= p["rel_err"]
            and (q["speedup_best"] > p["speedup_best"] or q["rel_err"] < p["rel_err"])
            for q in group
        )
    return sorted(points, key=lambda p: (p["question"], p["preset"], p["batch"], -p["speedup_best"]))


def frontier_table(points: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["question", "preset", "B", "variant", "ms", "best baseline", "x best", "rel err", "top1", "pareto"]
    cells = [
        [
            p["question"],
            p["preset"],
            str(p["batch"]),
            p["variant"],
            f"{p['ms']:.3f}",
            p["best_baseline"],
            f"{p['speedup_best']:.2f}",
            f"{p['rel_err']:.2e}",
            f"{p['top1']:.3f}",
            "*" if p["pareto"] else "",
        ]
        for p in points
    ]
    return headers, cells


def results_markdown(docs: Sequence[dict[str, Any]], points: Sequence[dict[str, Any]]) -> str:
    """Environment lines, one result table per JSON and the frontier table, as markdown."""
    parts = []
    for doc in docs:
        extra = [("tok/s", "tokens_per_s", ".0f")]
        parts += [f"### {doc['question']}", "", describe_env(doc), "", f"settings: `{doc['settings']}`", ""]
        parts += [format_table(*result_table(doc["rows"], extra), markdown=True), ""]
    parts += ["### speed-quality frontier", "", format_table(*frontier_table(points), markdown=True), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", type=Path, required=True, help="forward.json / decode.json files")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)
    docs = [load_json(path) for path in args.inputs if path.exists()]
    missing = [str(path) for path in args.inputs if not path.exists()]
    if missing:
        logger.warning("frontier: missing inputs %s", missing)
    points = frontier_points(docs)
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = sorted({doc["env"]["gpu"] or "CPU" for doc in docs})
    plot_frontier(points, args.out / "frontier.png", f"SNLP speed-quality frontier, random weights ({', '.join(gpus)})")
    (args.out / "results.md").write_text(results_markdown(docs, points))
    print(format_table(*frontier_table(points)))
    return points


if __name__ == "__main__":
    setup_logging()
    main()
