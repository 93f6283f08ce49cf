"""Eager against eager, interleaved: one full-sequence forward of the eager model and of SNLP with the
eager inner compiler (no inductor, no CUDA graphs), timed in alternating rounds.

Both sides are bound by Python dispatch on the host, so their times drift with the host (other
processes, CPU clocks). Timing them one after the other in alternating rounds of back-to-back calls
exposes both to the same conditions: the ratio of each round's medians is a paired measurement, and
the median over rounds is the figure to quote. Python's garbage collector is paused while timing
(for both sides alike). Writes OUT/eager_interleaved.json (rewritten after every round, so a run
cut short keeps what it measured) and OUT/eager_interleaved.png.

    PYTHONPATH=. python3 benchmarks/bench_eager_interleaved.py --preset paper-0.5b --rounds 20 --out out
    PYTHONPATH=. python3 benchmarks/bench_eager_interleaved.py --smoke --out /tmp/smoke   # tiny, CPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.grids import GRIDS
from benchmarks.harness import environment, run_device, run_dtype, setup_logging
from benchmarks.plot import plot_interleaved
from benchmarks.report import describe_env, format_table, write_json
from benchmarks.timing import deciles, time_calls
from benchmarks.variants import DTYPES, build_model, compare, compile_variant, snlp_variant

QUESTION = "eager_interleaved"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help=f"preset: {sorted(GRIDS)} (default paper-0.5b)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; smoke 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 20; smoke 2)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per side and round (default 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each side before the rounds")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (smoke: float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else "paper-0.5b")
    if args.preset not in GRIDS:
        parser.error(f"--preset must be one of {sorted(GRIDS)}, got {args.preset!r}")
    for name in ("batch", "rounds", "calls", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def summarise(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Paired figures (median and deciles of the round ratios) and pooled ones (all calls of a side)."""
    samples = {
        "ratio": [r["ratio"] for r in rounds],
        "eager_ms": [t for r in rounds for t in r["eager_times"]],
        "snlp_ms": [t for r in rounds for t in r["snlp_times"]],
    }
    summary = {}
    for name, values in samples.items():
        d = deciles(values)
        median_key = "ratio_median" if name == "ratio" else name
        summary.update({median_key: statistics.median(values), f"{name}_p10": d[0], f"{name}_p90": d[-1]})
    return summary


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = run_device(args.smoke)
    dtype = run_dtype(args.dtype, args.smoke)
    seq_len = args.seq_len or (64 if args.smoke else 2048)
    n_rounds, calls = args.rounds or (2 if args.smoke else 20), args.calls or (2 if args.smoke else 10)
    if args.smoke:
        torch.set_num_threads(1)
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)

    model = build_model(args.preset, device, dtype, args.seed)
    spec = {k: v for k, v in GRIDS[args.preset]["headline"][0].items() if k != "check"}
    variant = snlp_variant(model.config.n_layer, spec, cudagraphs=False, inner="eager")
    snlp = compile_variant(model, variant)
    idx = torch.randint(0, model.config.vocab_size, (args.batch, seq_len), device=device)
    rel_err, top1 = compare(snlp(idx), model(idx))
    sides = {"eager": lambda: model(idx), "snlp": lambda: snlp(idx)}
    for fn in sides.values():
        time_calls(fn, device, args.warmup, 1)

    rounds: list[dict[str, Any]] = []
    doc = {
        "question": QUESTION,
        "env": env,
        "settings": {
            "preset": args.preset,
            "seq_len": seq_len,
            "batch": args.batch,
            "dtype": str(dtype).removeprefix("torch."),
            "rounds": n_rounds,
            "calls": calls,
            "warmup": args.warmup,
            "seed": args.seed,
            "variant": variant.name,
            "options": variant.options,
        },
        "quality": {"rel_err": rel_err, "top1": top1},
        "rounds": rounds,
    }
    path = args.out / f"{QUESTION}.json"
    gc.collect()
    gc.disable()
    try:
        for i in range(n_rounds):
            order = ("eager", "snlp") if i % 2 == 0 else ("snlp", "eager")
            times = {side: time_calls(sides[side], device, 0, calls) for side in order}
            medians = {side: statistics.median(t) for side, t in times.items()}
            rounds.append(
                {
                    "round": i,
                    "first": order[0],
                    "eager_ms": medians["eager"],
                    "snlp_ms": medians["snlp"],
                    "ratio": medians["eager"] / medians["snlp"],
                    "eager_times": times["eager"],
                    "snlp_times": times["snlp"],
                }
            )
            doc.update(summary=summarise(rounds), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            write_json(path, doc)  # after every round: a run cut short keeps what it measured
            print(
                f"round {i + 1}/{n_rounds}: eager {medians['eager']:.3f} ms, snlp {medians['snlp']:.3f} ms, "
                f"{rounds[-1]['ratio']:.2f}x",
                flush=True,
            )
    finally:
        gc.enable()

    summary = doc["summary"]
    plot_interleaved(
        rounds, summary, path.with_suffix(".png"), f"{args.preset}, T={seq_len}: eager vs {variant.name}, interleaved"
    )
    print(describe_env(doc))
    s = summary
    cells = [
        ["eager model", f"{s['eager_ms']:.3f}", f"{s['eager_ms_p10']:.3f}-{s['eager_ms_p90']:.3f}", "-"],
        [
            variant.name,
            f"{s['snlp_ms']:.3f}",
            f"{s['snlp_ms_p10']:.3f}-{s['snlp_ms_p90']:.3f}",
            f"{s['ratio_median']:.2f} ({s['ratio_p10']:.2f}-{s['ratio_p90']:.2f})",
        ],
    ]
    print(format_table(["side", "ms (all calls)", "p10-p90", "x eager, round median (p10-p90)"], cells))
    print(f"quality against eager: rel err {rel_err:.2e}, top-1 {top1:.3f}")
    return doc


if __name__ == "__main__":
    setup_logging()
    main()
