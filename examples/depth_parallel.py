"""Depth-parallel SNLP across processes: each rank holds and evaluates a slice of the layer stack.

    torchrun --nproc_per_node 2 examples/depth_parallel.py                  # gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node 4 examples/depth_parallel.py --model mhc --iters 2

Every rank builds the same seeded model on the CPU, keeps its own part on its device
(`depth_parallel(..., device=...)`: the embedding, the head, the sequential layers and its slice of
the parallel ones) and drops the rest. Rank 0 prints the agreement of the logits with the sequential
model and a greedy generation, which is the same on every rank. The process group's timeout makes
the other ranks raise, instead of waiting forever, when one rank fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from snlp_compile import SNLPConfig, generate
from snlp_compile.distributed import depth_parallel
from snlp_compile.models import GPT, MHCGPT, GPTConfig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("gpt", "mhc"), default="gpt")
    parser.add_argument("--preset", default="tiny", help="GPTConfig preset")
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--iters", type=int, default=1, help="Newton iterations K (>= n_layer - n_seq: exact)")
    parser.add_argument("--n-seq", type=int, default=0, help="leading layers run sequentially (on every rank)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="process group timeout")
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        torch.manual_seed(0)  # the same weights on every rank
        config = GPTConfig.preset(args.preset, n_layer=args.n_layer)
        model = {"gpt": GPT, "mhc": MHCGPT}[args.model](config).eval()
        prompt = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
        sequential = model(prompt)
        dp = depth_parallel(model, SNLPConfig(iters=args.iters, n_seq=args.n_seq), device=device)
        del model  # this rank keeps no layer of the other ranks
        logits = dp(prompt.to(device)).cpu()
        tokens = generate(dp, prompt.to(device), args.new_tokens, mode="sequential").tokens.cpu()
        summary = {
            "rank": dp.rank,
            "parallel_layers": dp.parallel_layers,
            "top1_agreement": (logits.argmax(-1) == sequential.argmax(-1)).float().mean().item(),
            "max_abs_diff": (logits - sequential).abs().max().item(),
            "tokens": tokens[0, prompt.shape[1] :].tolist(),
        }
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, summary)
        if dp.rank == 0:
            for s in everyone:
                print(f"rank {s['rank']}: parallel layers {s['parallel_layers']}")
            print(
                f"K={args.iters}, n_seq={args.n_seq}: top-1 agreement with the sequential model "
                f"{summary['top1_agreement']:.3f}, max |logit difference| {summary['max_abs_diff']:.2e}"
            )
            print(
                f"greedy tokens (the same on every rank: {all(s['tokens'] == summary['tokens'] for s in everyone)}):"
                f" {summary['tokens']}"
            )
        return summary
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
