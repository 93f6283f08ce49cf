"""Latency and tokens/s of one KV-cache decode step: SNLP against eager, inductor and CUDA graphs.

A random prompt of --context tokens is prefilled (eager, exact) into a StaticKVCache of length
context + max(warmup + steps, check steps); every variant then decodes from position `context`
(`pos` is reset before each variant; the static cache keeps every step's shapes and cost equal).
Quality: logits of --check-steps teacher-forced decode steps against the eager model's, each
variant writing its own keys/values as it goes. Writes OUT/decode.json and OUT/decode.png.

    PYTHONPATH=. python3 benchmarks/bench_decode.py --preset d20 paper-0.5b --context 512 --out out
    PYTHONPATH=. python3 benchmarks/bench_decode.py --smoke --out /tmp/smoke   # tiny, CPU
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from benchmarks.harness import Bench, add_common_args, setup_logging
from benchmarks.variants import compare
from snlp_compile.models import StaticKVCache


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=None, help="prompt tokens in the cache (default 512; smoke 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 200; smoke 3)")
    parser.add_argument("--check-steps", type=int, default=None, help="teacher-forced quality steps (default 32)")
    add_common_args(parser)
    return parser.parse_args(argv)


class DecodeProblem:
    """A prefilled cache, the tokens to decode next, and the eager model's logits for them."""

    def __init__(self, model: torch.nn.Module, bench: Bench, batch: int, context: int, cache_len: int, n_check: int):
        config, device = model.config, bench.device
        self.context = context
        self.cache = StaticKVCache(config, batch, cache_len, dtype=bench.dtype, device=device)
        generator = torch.Generator(device).manual_seed(bench.args.seed + batch)
        prompt = torch.randint(0, config.vocab_size, (batch, context), device=device, generator=generator)
        new = torch.randint(0, config.vocab_size, (batch, n_check), device=device, generator=generator)
        self.tokens = [new[:, s : s + 1].contiguous() for s in range(n_check)]
        model(prompt, kv_cache=self.cache)
        self.reference = self.decode(model)

    @torch.no_grad()
    def decode(self, fn: Callable) -> torch.Tensor:
        """Logits [B, n, V] of decoding the tokens one by one from position `context`."""
        self.cache.pos.fill_(self.context)
        outs = []
        for token in self.tokens:
            torch.compiler.cudagraph_mark_step_begin()
            outs.append(fn(token, kv_cache=self.cache).clone())
        return torch.cat(outs, dim=1)

    def check(self, fn: Callable) -> tuple[float, float]:
        return compare(self.decode(fn), self.reference)

    def step(self, fn: Callable) -> Callable[[], torch.Tensor]:
        """One decode step per call, from position `context` on (pos advances by one per call)."""
        self.cache.pos.fill_(self.context)
        return lambda: fn(self.tokens[0], kv_cache=self.cache)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> Bench:
    args = parse_args(argv)
    context = args.context or (32 if args.smoke else 512)
    steps = args.steps or (3 if args.smoke else 200)
    n_check = args.check_steps or (2 if args.smoke else 32)
    warmup = args.warmup or (1 if args.smoke else 10)
    cache_len = context + max(warmup + steps, n_check)
    bench = Bench(
        "decode", args, default_cg=True, context=context, steps=steps, check_steps=n_check, cache_len=cache_len
    )
    bench.sweep(
        lambda model, batch: DecodeProblem(model, bench, batch, context, cache_len, n_check),
        warmup,
        steps,
        per_call_tokens=lambda batch: batch,
        title=f"decode step, context {context}",
    )
    return bench


if __name__ == "__main__":
    setup_logging()
    main()
