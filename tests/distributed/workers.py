"""What the spawned ranks of the depth-parallel tests run (module-level, so that spawn can import it).

Each rank builds the same seeded model, checks its DepthParallel against `solver.solve` (through
tests.helpers.reference.solver_logits) or the sequential model on the same rank, and checks that
every rank returned the same logits, bit for bit.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from snlp_compile import SNLPConfig, generate
from snlp_compile.distributed import depth_parallel
from snlp_compile.models import GPT, MHCGPT, GPTConfig, StaticKVCache
from tests.helpers.reference import solver_logits

MODELS = {"gpt": GPT, "mhc": MHCGPT}
PROMPT, STEPS, CACHE_LEN = 4, 2, 8  # prefill PROMPT tokens, then STEPS one-token decode steps


@dataclass(frozen=True)
class Case:
    """One model and configuration; `layers_per_rank` None: the default split."""

    model: str
    config: dict[str, Any]
    n_layer: int = 5
    x0_mixing: bool = False
    layers_per_rank: tuple[int, ...] | None = None
    generate: bool = False

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        config = GPTConfig.preset("tiny", n_layer=self.n_layer, sinkhorn_iters=4, x0_mixing=self.x0_mixing)
        model = MODELS[self.model](config).eval()
        if self.x0_mixing:  # away from the initial 1 and 0, so that the scale surrogate is not the identity
            with torch.no_grad():
                model.resid_lambdas.uniform_(0.5, 1.5)
                model.x0_lambdas.uniform_(-0.5, 0.5)
        return model


def held_parameters(model: torch.nn.Module, layers: list[int]) -> set[int]:
    """ids of the model's parameters but those of its blocks not in `layers`."""
    others = {id(p) for i, b in enumerate(model.blocks) if i not in layers for p in b.parameters()}
    return {id(p) for p in model.parameters()} - others


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)


def _same_on_every_rank(logits: torch.Tensor) -> None:
    everyone = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, logits)
    assert all(torch.equal(other, everyone[0]) for other in everyone), "ranks returned different logits"


def _check(case: Case, out: torch.Tensor, ref: torch.Tensor, exact: bool, what: str) -> None:
    tol = 1e-5 * ref.abs().max().item()  # the sums run in another order than in the single-process solve
    err = (out - ref).abs().max().item()
    assert err <= tol, f"{case} {what}: max error {err:.3g} against the {'sequential' if exact else 'solve'}"
    _same_on_every_rank(out)


@torch.no_grad()
def run_case(case: Case) -> None:
    """Forward and prefill + decode steps against the reference, on this rank."""
    model, config = case.build(), SNLPConfig(**case.config)
    exact = config.fuse == 1 and config.iters >= len(model.blocks) - config.n_seq
    dp = depth_parallel(model, config, layers_per_rank=case.layers_per_rank)
    assert dp.parallel_layers == list(dp.partition.layers(dp.rank))
    assert {id(p) for p in dp.parameters()} == held_parameters(model, dp.layers), "a rank holds the wrong layers"

    idx = torch.randint(0, 64, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    if exact:
        reference = lambda t, cache: model(t, kv_cache=cache)  # noqa: E731
    else:
        reference = lambda t, cache: solver_logits(model, t, config, kv_cache=cache)  # noqa: E731
    out = dp(idx)
    _check(case, out, reference(idx, None), exact, "forward")
    if not exact:  # the solve really is approximate, so matching it is not matching the sequential model
        assert (out - model(idx)).abs().max() > 1e-3, f"{case}: as exact as the sequential model"
    cache, ref_cache = dp.make_kv_cache(2, CACHE_LEN, "cpu", torch.float32), StaticKVCache(model.config, 2, CACHE_LEN)
    for start in [0, *range(PROMPT, PROMPT + STEPS)]:
        t = idx[:, start : max(start + 1, PROMPT)]
        _check(case, dp(t, kv_cache=cache), reference(t, ref_cache), exact, f"decode from position {start}")
    assert torch.equal(cache.pos, ref_cache.pos)
    if case.generate:
        tokens = generate(dp, idx[:1, :PROMPT], 3, mode="sequential").tokens
        _same_on_every_rank(tokens)
        if exact:
            assert torch.equal(tokens, generate(model, idx[:1, :PROMPT], 3, mode="sequential").tokens)


def check_cases(rank: int, world: int, port: int, cases: list[Case]) -> None:
    """Spawned: every case on this rank."""
    init(rank, world, port, timeout_s=60)
    try:
        for case in cases:
            run_case(case)
    finally:
        dist.destroy_process_group()


def fail_one_rank(rank: int, world: int, port: int, timeout_s: float, reports: Any, release: Any) -> None:
    """Started as a process: the last rank raises inside its first layer; each rank reports
    (rank, error message, seconds into the forward); the failed rank then waits for `release`, so
    that the others can only learn of its failure from the process group's timeout."""
    init(rank, world, port, timeout_s)
    model = Case("gpt", {"iters": 1}).build()
    dp = depth_parallel(model, {"iters": 1})
    if rank == world - 1:

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("this layer is broken")

        dp.model.blocks[-1].forward = broken
    start = time.monotonic()
    try:
        dp(torch.zeros(1, 3, dtype=torch.long))
        reports.put((rank, "no error", time.monotonic() - start))
    except RuntimeError as error:
        reports.put((rank, f"{error}\n{traceback.format_exc()}", time.monotonic() - start))
    if rank == world - 1:
        release.wait(60)


def run_scripts(rank: int, world: int, ports: tuple[int, int], out: str) -> None:
    """Spawned with torchrun's environment: examples/depth_parallel.py, then the benchmark's smoke run
    (each starts and ends its own process group)."""
    from benchmarks import bench_depth_parallel
    from tests.helpers.examples import load_example

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(ports[0])
    summary = load_example("depth_parallel").main(["--n-layer", "4", "--iters", "4", "--new-tokens", "4"])
    assert summary["parallel_layers"] == [2 * rank, 2 * rank + 1]
    assert summary["top1_agreement"] == 1.0 and summary["max_abs_diff"] < 1e-4  # K = 4 layers: exact
    os.environ["MASTER_PORT"] = str(ports[1])
    doc = bench_depth_parallel.main(["--smoke", "--out", out])
    rows = {r["variant"]: r for r in doc["rows"]}
    assert list(rows) == ["sequential 1 GPU", "snlp 1 GPU", "tensor parallel", "depth parallel K1"]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["gpus"] in (1, 2) for r in rows.values()), rows
    assert rows["tensor parallel"]["rel_err"] < 1e-5  # the sequential model, split by heads
    assert rows["depth parallel K1"]["rel_err_snlp"] < 1e-5  # the one-GPU snlp solve, split by layers
