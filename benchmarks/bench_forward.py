"""Latency of one full-sequence forward (prefill / scoring): SNLP against eager, inductor and CUDA graphs.

Writes OUT/forward.json (one row per preset, batch and variant) and OUT/forward.png, prints the table.
Quality is measured against the eager (sequential) model on the same random tokens.

    PYTHONPATH=. python3 benchmarks/bench_forward.py --preset paper-0.5b d20 --out out
    PYTHONPATH=. python3 benchmarks/bench_forward.py --smoke --out /tmp/smoke   # tiny, CPU
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from benchmarks.harness import Bench, add_common_args, setup_logging
from benchmarks.variants import compare


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; smoke 64)")
    add_common_args(parser)
    return parser.parse_args(argv)


class ForwardProblem:
    """Random tokens [batch, seq_len] and the eager model's logits for them."""

    def __init__(self, model: torch.nn.Module, bench: Bench, batch: int, seq_len: int):
        generator = torch.Generator(bench.device).manual_seed(bench.args.seed + batch)
        shape = (batch, seq_len)
        self.idx = torch.randint(0, model.config.vocab_size, shape, device=bench.device, generator=generator)
        self.reference = model(self.idx)

    def check(self, fn: Callable) -> tuple[float, float]:
        return compare(fn(self.idx), self.reference)

    def step(self, fn: Callable) -> Callable[[], torch.Tensor]:
        return lambda: fn(self.idx)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> Bench:
    args = parse_args(argv)
    seq_len = args.seq_len or (64 if args.smoke else 2048)
    warmup = args.warmup or (1 if args.smoke else 5)
    reps = args.reps or (3 if args.smoke else 30)
    bench = Bench("forward", args, default_cg=False, seq_len=seq_len)
    bench.sweep(
        lambda model, batch: ForwardProblem(model, bench, batch, seq_len),
        warmup,
        reps,
        per_call_tokens=lambda batch: batch * seq_len,
        title=f"full-sequence forward, T={seq_len}",
    )
    return bench


if __name__ == "__main__":
    setup_logging()
    main()
