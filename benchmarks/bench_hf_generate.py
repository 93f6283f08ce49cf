"""Hugging Face generate() tokens/s: a Llama-shaped model (random weights) generating greedily through
HF's own loop, sequential against SNLP, all variants in one process.

Variants: HF eager (dynamic cache); HF's own compile path (static cache, decode steps compiled by
generate() through `compile_config`) with inductor and CUDA graphs (the best sequential baseline)
and with backend "snlp", K = 1, CUDA graphs (n_par: all layers but `--n-seq`), on HF's static cache
(one tensor per layer: the parallel layers write copies, copied back) and on a StackedStaticCache
(the layers' tensors are rows of one buffer, written in place); SNLP on the forward
with the dynamic cache;
lossless speculative decoding through HF's assisted generation with `snlp_assistant` (eager inner
compiler: its draft lengths change every round). Tokens are compared with the eager run's.
Writes OUT/hf_generate.json.

    PYTHONPATH=. python3 benchmarks/bench_hf_generate.py --out out              # 32 x 1024, bf16, CUDA
    PYTHONPATH=. python3 benchmarks/bench_hf_generate.py --smoke --out /tmp/s   # tiny, CPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import environment, setup_logging
from benchmarks.report import format_table, write_json
from benchmarks.timing import synchronize

QUESTION = "hf_generate"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; smoke 4)")
    parser.add_argument("--width", type=int, default=None, help="hidden size (default 1024; smoke 32)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; smoke 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128; smoke 4)")
    parser.add_argument("--n-seq", type=int, default=None, help="sequential layers of the SNLP variants (default L/4)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, float32")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run the variants whose names contain one of these words (default all)"
    )
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.layers = args.layers or (4 if smoke else 32)
    args.width = args.width or (32 if smoke else 1024)
    args.prompt = args.prompt or (8 if smoke else 512)
    args.new_tokens = args.new_tokens or (4 if smoke else 128)
    args.n_seq = args.layers // 4 if args.n_seq is None else args.n_seq
    for name in ("layers", "width", "prompt", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.n_seq < args.layers:
        parser.error(f"--n-seq must be in [0, {args.layers - 1}], got {args.n_seq}")
    return args


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    heads = max(1, args.width // 64)
    config = transformers.LlamaConfig(
        vocab_size=64 if args.smoke else 32000,
        hidden_size=args.width,
        intermediate_size=int(args.width * 2.75) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=args.prompt + args.new_tokens + 8,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def timed_generate(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, float]:
    """(tokens, seconds of the first call (compiles), seconds of the second)."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokens = run()
    synchronize(device)
    return tokens, first, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    from snlp_compile import StackedStaticCache, snlp_assistant

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build(args, device, dtype)
    ids = torch.randint(1, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
    common.update(min_new_tokens=args.new_tokens)
    original = type(model).forward.__get__(model)
    cuda = device.type == "cuda"
    snlp = {"iters": 1, "n_seq": args.n_seq}

    def with_forward(forward: Callable | None, stacked: bool = False, **kwargs: Any) -> Callable[[], torch.Tensor]:
        """generate() with `forward` in place of the model's; `stacked`: into a StackedStaticCache made at the
        first (untimed) call and reset at each, as generate() keeps and resets its own static cache (made
        anew, its buffers would take the timed call's time and new addresses, re-recording CUDA graphs)."""
        made: list = []

        def run() -> torch.Tensor:
            model.forward = forward or original
            if stacked:
                if not made:
                    made.append(StackedStaticCache.for_model(model, ids.shape[0], args.prompt + args.new_tokens))
                made[0].reset()
                kwargs["past_key_values"] = made[0]
            try:
                with torch.no_grad():
                    return model.generate(ids, **common, **kwargs)
            finally:
                model.forward = original

        return run

    from transformers import CompileConfig

    def hf_compiled(stacked: bool = False, **config: Any) -> dict[str, Any]:
        """HF compiles the decode steps itself (static cache; `stacked`: a StackedStaticCache)."""
        cache = {"stacked": True} if stacked else {"cache_implementation": "static"}
        return dict(compile_config=CompileConfig(**config), **cache)

    variants = {
        "HF eager (dynamic cache)": with_forward(None),
        "inductor + CUDA graphs, static cache (best)": with_forward(
            None, **hf_compiled(backend="inductor", mode="reduce-overhead" if cuda else "default")
        ),
        "snlp K 1, static cache" + (" +cg" if cuda else ""): with_forward(
            None, **hf_compiled(backend="snlp", mode=None, options={**snlp, "cudagraphs": cuda})
        ),
        "snlp K 1, stacked static cache" + (" +cg" if cuda else ""): with_forward(
            None, **hf_compiled(stacked=True, backend="snlp", mode=None, options={**snlp, "cudagraphs": cuda})
        ),
        "snlp K 1, dynamic cache": with_forward(torch.compile(original, backend="snlp", options=snlp)),
        "speculative: snlp_assistant (K 1, eager inner)": with_forward(
            None, assistant_model=snlp_assistant(model, {**snlp, "inner": "eager"})
        ),
    }
    chosen = {n: run for n, run in variants.items() if not args.only or any(w in n for w in args.only)}
    if not any("(best)" in n for n in chosen):
        raise SystemExit(f"--only must keep the best sequential baseline (a variant with '(best)'), got {args.only}")
    rows, reference = [], None
    args.out.mkdir(parents=True, exist_ok=True)
    for name, run in chosen.items():
        torch._dynamo.reset()
        tokens, first, seconds = timed_generate(run, device)
        new = tokens[:, args.prompt :]
        reference = new if reference is None else reference
        agree = (new == reference).float().mean().item() if new.shape == reference.shape else float("nan")
        rows.append(dict(variant=name, tok_s=args.new_tokens / seconds, first_s=first, top1_vs_eager=agree))
        print(f"{name}: {args.new_tokens / seconds:.1f} tok/s (first call {first:.1f} s), agreement {agree:.3f}")
        best = next((r["tok_s"] for r in rows if "(best)" in r["variant"]), None)
        for row in rows:
            row["x_best"] = row["tok_s"] / best if best else float("nan")
        doc = dict(question=QUESTION, env=environment(device), settings=vars(args) | {"dtype": str(dtype)}, rows=rows)
        write_json(args.out / f"{QUESTION}.json", doc)  # after every variant: a run cut short keeps its rows
    headers = ["variant", "tok/s", "x best", "tokens = eager", "first call s"]
    cells = [
        [r["variant"], f"{r['tok_s']:.1f}", f"{r['x_best']:.2f}", f"{r['top1_vs_eager']:.3f}", f"{r['first_s']:.1f}"]
        for r in rows
    ]
    print(format_table(headers, cells))
    return doc


if __name__ == "__main__":
    main()
