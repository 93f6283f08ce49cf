"""examples/depth_parallel.py and the smoke run of benchmarks/bench_depth_parallel.py on 2 spawned ranks
with torchrun's environment (gloo on CPU)."""

import json

import pytest
import torch.multiprocessing as mp

from tests.distributed.workers import free_port, run_scripts


@pytest.mark.slow
def test_example_and_benchmark_run_on_two_ranks(tmp_path):
    mp.spawn(run_scripts, args=(2, (free_port(), free_port()), str(tmp_path)), nprocs=2)
    rows = json.loads((tmp_path / "depth_parallel.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["tiny"] * 4
