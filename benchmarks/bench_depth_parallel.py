"""Decode-step latency of depth parallelism across GPUs against one GPU and tensor parallelism.

    PYTHONPATH=. torchrun --nproc_per_node 8 benchmarks/bench_depth_parallel.py --out out      # GPUs, NCCL
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/bench_depth_parallel.py --smoke --out /tmp/smoke  # CPU, gloo

Batch 1, random weights (the same on every rank), bf16 (smoke: float32), K = 1. For each model (default:
"32x2048", a 32-layer width-2048 GPT, and the paper-0.5b preset; smoke: tiny), a prompt of --context
tokens is prefilled exactly (by the eager sequential model, or the variant's exact form: tensor parallel
eager, depth parallel with K = the layer count) into the variant's own static cache, then one decode
step is timed per call (the median of --steps calls after --warmup), for each variant:

- sequential, 1 GPU: the model compiled by inductor with CUDA graphs (CPU: eager)
- snlp, 1 GPU: the model compiled by the snlp backend, K = 1, every layer parallel (GPU: CUDA graphs, gemv)
- tensor parallel, N GPUs: the sequential model with torch.distributed.tensor.parallel (attention heads
  and MLP split over the ranks; needs n_head divisible by N), eager and compiled with CUDA graphs
- depth parallel, N GPUs: `snlp_compile.distributed.depth_parallel`, K = 1, eager and compiled with CUDA
  graphs (its all-gather is a functional collective, captured in the graph)

Every rank runs every variant at the same time (one-GPU variants on its own GPU), so that no rank waits
on another one's compile; rank 0's times are reported. Quality: the first step's logits against the
eager sequential model's (relative L2 error, top-1 agreement), and for depth parallel against the
one-GPU snlp variant's. Rank 0 prints the table and writes OUT/depth_parallel.json after every model.
NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set (unless already set): no NVLink multicast.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import statistics
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402  (after the NCCL environment)
import torch.distributed as dist  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.harness import environment  # noqa: E402
from benchmarks.report import format_table, write_json  # noqa: E402
from benchmarks.timing import time_calls  # noqa: E402
from benchmarks.variants import DTYPES, compare  # noqa: E402
from snlp_compile import SNLPConfig, snlp_backend  # noqa: E402
from snlp_compile.distributed import depth_parallel  # noqa: E402
from snlp_compile.models import GPT, GPTConfig, StaticKVCache  # noqa: E402

MODELS = {
    "32x2048": lambda: GPTConfig(vocab_size=65536, n_layer=32, n_embd=2048, n_head=16, sequence_len=2048),
    "paper-0.5b": lambda: GPTConfig.preset("paper-0.5b"),
    "tiny": lambda: GPTConfig.preset("tiny"),
}
Step = Callable[[Tensor, Any], Tensor]  # (token ids, kv_cache) -> logits


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="default: 32x2048 paper-0.5b")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens in the cache (default 512; smoke 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 100; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; smoke 1)")
    parser.add_argument("--iters", type=int, default=1, help="Newton iterations K of the SNLP variants")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (smoke: float32)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="process group timeout (covers compiles)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo), eager variants")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def tensor_parallel(model: GPT, world: int, device: torch.device) -> tuple[nn.Module, GPTConfig]:
    """A copy of `model` with each block's attention heads and MLP split over the `world` ranks
    (torch.distributed.tensor.parallel), and the config of its per-rank KV cache (n_kv_head / world)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    config = model.config
    if config.n_head % world or config.n_kv_head % world:
        raise ValueError(f"n_head {config.n_head} and n_kv_head {config.n_kv_head} must be divisible by {world}")
    mesh = init_device_mesh(device.type, (world,))
    plan = {f"attn.c_{n}": ColwiseParallel() for n in "qkv"} | {"mlp.c_fc": ColwiseParallel()}
    plan |= {"attn.c_proj": RowwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    tp = copy.deepcopy(model)
    for block in tp.blocks:
        parallelize_module(block, mesh, plan)
        block.attn.n_head //= world  # the attention reshapes to its rank's heads
        block.attn.n_kv_head //= world
    local = dataclasses.replace(
        config, n_embd=config.n_embd // world, n_head=config.n_head // world, n_kv_head=config.n_kv_head // world
    )  # the same head_dim, the rank's KV heads
    return tp, local


class Run:
    """One model on this rank: its prompt, the reference logits and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype):
        self.args, self.name, self.device, self.dtype = args, name, device, dtype
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        torch.manual_seed(args.seed)  # the same weights on every rank
        with torch.device(device):
            self.model = GPT(MODELS[name]()).to(dtype).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(args.seed + 1)
        self.prompt = torch.randint(0, self.model.config.vocab_size, (1, args.context), generator=generator)
        self.token = torch.randint(0, self.model.config.vocab_size, (1, 1), generator=generator)
        self.prompt, self.token = self.prompt.to(device), self.token.to(device)
        self.cache_len = args.context + 1 + args.warmup + args.steps
        self.rows: list[dict[str, Any]] = []
        self.logits: dict[str, Tensor] = {}
        self.reference = self.first_step(self.model, self.model.make_kv_cache)[0]

    def cache(self, factory: Callable) -> Any:
        return factory(1, self.cache_len, self.device, self.dtype)

    def first_step(self, prefill: Step, factory: Callable, step: Step | None = None) -> tuple[Tensor, Any]:
        """(logits of the first decode step, the cache) after prefilling the prompt with `prefill`."""
        cache = self.cache(factory)
        prefill(self.prompt, kv_cache=cache)
        return (prefill if step is None else step)(self.token, kv_cache=cache).float().clone(), cache

    def measure(self, variant: str, gpus: int, build: Callable[[], tuple[Step, Step, Callable]]) -> None:
        """Time one variant; `build` returns (eager forward for the prefill, the timed step, cache factory)."""
        row: dict[str, Any] = {"model": self.name, "variant": variant, "gpus": gpus, "status": "ok"}
        try:
            prefill, step, factory = build()
            logits, cache = self.first_step(prefill, factory, step)
            self.logits[variant] = logits
            row["rel_err"], row["top1"] = compare(logits, self.reference)
            if variant.startswith("depth") and "snlp 1 GPU" in self.logits:
                row["rel_err_snlp"], row["top1_snlp"] = compare(logits, self.logits["snlp 1 GPU"])
            times = time_calls(lambda: step(self.token, kv_cache=cache), self.device, self.args.warmup, self.args.steps)
            row["ms"] = statistics.median(times)
        except Exception as error:  # noqa: BLE001  (one failing variant records its error; the run goes on)
            row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            traceback.print_exc()
        self.rows.append(row)

    def run(self, cudagraphs: bool) -> None:
        model, k, mode = self.model, self.args.iters, "reduce-overhead" if cudagraphs else None
        sequential = torch.compile(model, mode=mode, dynamic=False) if cudagraphs else model
        self.measure("sequential 1 GPU", 1, lambda: (model, sequential, model.make_kv_cache))
        options = dict(iters=k, fallback="error", cudagraphs=cudagraphs, gemv=cudagraphs)
        options |= {} if cudagraphs else {"inner": "eager"}
        snlp = torch.compile(model, backend=snlp_backend, options=options, dynamic=False)
        self.measure("snlp 1 GPU", 1, lambda: (model, snlp, model.make_kv_cache))

        def tp(compiled: bool) -> tuple[Step, Step, Callable]:
            tp_model, local = tensor_parallel(model, self.world, self.device)
            factory = lambda b, n, device, dtype: StaticKVCache(local, b, n, dtype, device)  # noqa: E731
            return tp_model, torch.compile(tp_model, mode=mode, dynamic=False) if compiled else tp_model, factory

        def dp(compiled: bool) -> tuple[Step, Step, Callable]:
            dp_model = depth_parallel(model, SNLPConfig(iters=k))
            exact = depth_parallel(model, SNLPConfig(iters=model.config.n_layer))  # the same layers and cache
            timed = torch.compile(dp_model, mode=mode, dynamic=False) if compiled else dp_model
            return exact, timed, dp_model.make_kv_cache

        for compiled in (False, True) if cudagraphs else (False,):
            suffix = " +cg" if compiled else ""
            self.measure(f"tensor parallel{suffix}", self.world, lambda c=compiled: tp(c))
            self.measure(f"depth parallel K{k}{suffix}", self.world, lambda c=compiled: dp(c))


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each timed row's speedup against the model's "sequential 1 GPU" row."""
    for row in rows:
        base = next(
            (r.get("ms") for r in rows if r["model"] == row["model"] and r["variant"] == "sequential 1 GPU"), None
        )
        if row.get("ms") and base:
            row["speedup"] = base / row["ms"]


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    headers = ["model", "variant", "GPUs", "ms", "x seq", "rel err", "top1", "rel err vs snlp", "top1 vs snlp"]
    headers.append("status")
    cells = [
        [r["model"], r["variant"], str(r["gpus"]), fmt(r.get("ms"), ".3f"), fmt(r.get("speedup"), ".2f")]
        + [fmt(r.get("rel_err"), ".2e"), fmt(r.get("top1"), ".3f"), fmt(r.get("rel_err_snlp"), ".2e")]
        + [fmt(r.get("top1_snlp"), ".3f"), r["status"]]
        for r in rows
    ]
    return format_table(headers, cells)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.context = args.context or (8 if args.smoke else 512)
    args.steps = args.steps or (3 if args.smoke else 100)
    args.warmup = args.warmup or (1 if args.smoke else 10)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    dtype = DTYPES[args.dtype or ("float32" if args.smoke else "bfloat16")]
    doc: dict[str, Any] = {
        "question": "depth_parallel decode step",
        "env": environment(device) | {"world_size": dist.get_world_size()},
        "settings": {k: str(v) for k, v in vars(args).items()} | {"dtype": str(dtype), "batch": 1},
        "rows": [],
    }
    try:
        for name in args.models or (["tiny"] if args.smoke else ["32x2048", "paper-0.5b"]):
            run = Run(args, name, device, dtype)
            run.run(cudagraphs=cuda)
            doc["rows"] += run.rows
            add_speedups(doc["rows"])
            if run.rank == 0:
                args.out.mkdir(parents=True, exist_ok=True)
                write_json(args.out / "depth_parallel.json", doc)
            del run
        if dist.get_rank() == 0:
            print(table(doc["rows"]))
    finally:
        dist.destroy_process_group()
    return doc


if __name__ == "__main__":
    main()
