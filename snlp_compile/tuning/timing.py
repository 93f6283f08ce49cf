"""Timing of back-to-back calls on the device they run on.

Invariants: times are per call, in ms (CUDA events on GPU, `time.perf_counter` on CPU); each call of
a timed function is preceded by `torch.compiler.cudagraph_mark_step_begin`, so CUDA-graphed variants
may reuse their output buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(fn: Callable[[], Any], calls: int) -> None:
    """`calls` back-to-back calls of fn, each marked as a new CUDA-graph step; no synchronisation."""
    for _ in range(calls):
        torch.compiler.cudagraph_mark_step_begin()
        fn()


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Per-call times in ms of `reps` back-to-back calls after `warmup` calls (CUDA events on GPU)."""
    run_steps(fn, warmup)
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        torch.compiler.cudagraph_mark_step_begin()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]
