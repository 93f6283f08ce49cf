"""`make demo`: compile the built-in model with the snlp backend and compare it with sequential.

Prints what the compiler found, then one row per SNLP setting: relative error of the logits
("logits err"), top-1 agreement with the sequential model and time per call. Random weights, CPU by default:
the agreement columns are the point here; speed only counts on a GPU (see benchmarks/).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from tqdm import tqdm

from . import SNLPConfig, find_layer_stack, prepare
from .models import GPT, MHCGPT, GPTConfig


def settings(n_layer: int) -> list[dict]:
    """The SNLP settings the demo compares for a stack of n_layer >= 2 layers, each valid for it;
    the last (iters = n_layer) is exact."""
    rows = [
        dict(iters=1),
        dict(iters=2),
        dict(n_seq=n_layer // 2, iters=1),
        dict(fuse=2, iters=1),
        dict(blocks=2, iters=1),
        dict(iters=n_layer),
    ]
    return [row for k, row in enumerate(rows) if row not in rows[k + 1 :]]  # n_layer 2: iters=2 once, last


def _times(fns: dict[str, Callable], *args, repeat: int = 10) -> dict[str, float]:
    """Median milliseconds per call of each function, after two warm-up calls, timed round-robin
    (each round calls every function once). On a shared CPU the other processes' load changes from
    second to second, and an op's OpenMP threads wait for a peer that lost its core (20x slower and
    more): timed one after another, two rows would see different loads; round-robin they see the same."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(2 + repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(*args)
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt", "mhc"], default="gpt")
    parser.add_argument("--inner", choices=["eager", "inductor"], default="eager")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args(argv)
    if args.layers < 2:
        parser.error(f"--layers must be >= 2 (a stack to solve in parallel), got {args.layers}")
    config = GPTConfig.preset("char", n_layer=args.layers, n_embd=128, n_head=4, x0_mixing=args.model == "gpt")
    if not 1 <= args.seq_len <= config.sequence_len:
        parser.error(f"--seq-len must be in [1, {config.sequence_len}], got {args.seq_len}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # On CPU, vmap runs attention layer by layer (no batching rule for the CPU flash kernel): slower, same result.
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    torch.manual_seed(0)
    model = (GPT if args.model == "gpt" else MHCGPT)(config).eval()
    if config.x0_mixing:
        model.x0_lambdas.fill_(0.2)
    prepare(model)
    idx = torch.randint(0, config.vocab_size, (1, args.seq_len))
    print(f"model: {type(model).__name__} {config.n_layer} layers x {config.n_embd}, context {args.seq_len}, CPU")
    for report in find_layer_stack(model, (idx,)):
        print(report)
    reference = model(idx)
    rows = [dict(setting="sequential (eager)", rel_err=0.0, top1=1.0)]
    fns: dict[str, Callable] = {rows[0]["setting"]: model}
    for setting in tqdm(settings(config.n_layer), desc="compiling SNLP settings", leave=False):
        options = dict(SNLPConfig(inner=args.inner, fallback="error", **setting).__dict__)
        name = ", ".join(f"{k}={v}" for k, v in setting.items())
        fns[name] = torch.compile(model, backend="snlp", options=options)  # dynamo keeps one graph per backend
        out = fns[name](idx)
        rel_err = ((out - reference).norm() / reference.norm()).item()
        top1 = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
        rows.append(dict(setting=name, rel_err=rel_err, top1=top1))
    for row, ms in zip(rows, _times(fns, idx).values(), strict=True):
        row["ms"] = ms
    print(f"\n{'setting':<24}{'logits err':>12}{'top-1 agree':>13}{'ms/call':>10}")
    for row in rows:
        print(f"{row['setting']:<24}{row['rel_err']:>12.2e}{row['top1']:>13.1%}{row['ms']:>10.1f}")
    print(f"\niters={config.n_layer} (the last row) reproduces sequential; fewer iterations trade accuracy for depth.")
    return rows


if __name__ == "__main__":
    main()
