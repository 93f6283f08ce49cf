"""depth_parallel on gloo: 2 and 4 spawned ranks against the single-process solve and the sequential
model (forward, prefill and decode with the cache, uneven splits), and a failed rank reported, not hung."""

from __future__ import annotations

import multiprocessing
import queue
import time

import pytest
import torch.multiprocessing as mp

from tests.distributed.workers import Case, check_cases, fail_one_rank, free_port

GPT_MHC = ("gpt", "mhc")

TWO_RANKS = [  # 5 layers: the default split is uneven (3, 2)
    *(Case(m, {"iters": k}, generate=k == 1) for m in GPT_MHC for k in (1, 2)),
    *(Case(m, {"iters": 5}, generate=True) for m in GPT_MHC),  # exact: the sequential model
    Case("gpt", {"iters": 1}, x0_mixing=True, layers_per_rank=(1, 4)),  # scale surrogate, an explicit uneven split
    Case("mhc", {"iters": 2, "fuse": 2, "damping": 0.25}, x0_mixing=True),  # super-layers (2, 2, 1) split (2, 1)
    Case("mhc", {"iters": 2, "n_seq": 1, "init": "batch_fwd"}),
    Case("mhc", {"iters": 1, "surrogate": "identity"}),  # IDN on the mHC model
]

FOUR_RANKS = [  # 6 layers: (2, 2, 1, 1) by default
    *(Case(m, {"iters": k}, n_layer=6) for m in GPT_MHC for k in (1, 2, 6)),
    Case("mhc", {"iters": 2}, n_layer=6, x0_mixing=True, layers_per_rank=(1, 1, 3, 1)),
    Case("gpt", {"iters": 3, "init": "batch_fwd", "damping": 0.5}, n_layer=6),
]


def _spawn(world: int, cases: list[Case]) -> None:
    mp.spawn(check_cases, args=(world, free_port(), cases), nprocs=world)


def test_two_ranks_match_the_single_process_solve():
    _spawn(2, TWO_RANKS)


@pytest.mark.slow
def test_four_ranks_match_the_single_process_solve():
    _spawn(4, FOUR_RANKS)


def test_a_failed_rank_makes_the_others_raise_within_the_timeout():
    timeout_s, world = 3.0, 2
    ctx = multiprocessing.get_context("spawn")
    reports, release = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(target=fail_one_rank, args=(rank, world, port, timeout_s, reports, release))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    try:
        found = {}
        deadline = time.monotonic() + 90  # process start-up included
        while len(found) < world:
            try:
                rank, message, seconds = reports.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"ranks {sorted(set(range(world)) - set(found))} neither returned nor raised: a hang")
            found[rank] = (message, seconds)
        assert "this layer is broken" in found[world - 1][0]
        message, seconds = found[0]
        assert "depth_parallel rank 0 of 2: the all-gather of Newton iteration 1 failed" in message
        assert seconds < timeout_s + 10
    finally:
        release.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
