"""Timing: back-to-back calls, CUDA-graph replays that defeat the L2 cache, launch-config sweeps, and the
HBM floor a step's weight reads set.

Invariants: times are per call, in ms from `time_calls` (the package's, snlp_compile.tuning.timing, which
the benchmarks import from here with `run_steps` and `synchronize`) and in us from `graph_time_us`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from snlp_compile.tuning.timing import run_steps as run_steps
from snlp_compile.tuning.timing import synchronize as synchronize
from snlp_compile.tuning.timing import time_calls as time_calls

logger = logging.getLogger("snlp_compile")

# Peak HBM bandwidth in TB/s by GPU name (NVIDIA datasheets); the first matching substring wins.
HBM_TBPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("H200", 4.8),
)
L2_DEFEAT_BYTES = 256 << 20  # bytes of operand copies per graph: several times the largest L2 (H100: 50 MB)


def timed_once(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds) of one call of fn after one untimed call (which compiles and records graphs)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def deciles(values: Sequence[float]) -> list[float]:
    """The nine deciles of values (for a single value, that value nine times)."""
    return statistics.quantiles(values, n=10) if len(values) > 1 else list(values) * 9


def l2_defeating_copies(nbytes: int) -> int:
    """Copies of an operand of `nbytes` that a timed graph cycles through, so that each call reads
    HBM (as a decode step reads every layer's own weights and cache once), not the L2 cache."""
    return max(2, min(256, L2_DEFEAT_BYTES // max(nbytes, 1)))


def graph_time_us(fn: Callable[[int], Any], calls: int, reps: int = 20) -> float:
    """Microseconds per `fn(i)` call, i in range(calls), replayed from one CUDA graph (median of reps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def best_launch_config(time_us: Callable[[Any], float], configs: Sequence[Any]) -> tuple[float, Any]:
    """(microseconds, config) of the fastest config that launches; a config the GPU cannot launch
    (e.g. more shared memory than it has) is logged and skipped."""
    timed = []
    for config in configs:
        try:
            timed.append((time_us(config), config))
        except Exception as error:  # noqa: BLE001  (Triton's OutOfResources and kin)
            logger.info("launch config %s skipped: %s", config, str(error).splitlines()[0])
    if not timed:
        raise RuntimeError(f"none of the {len(configs)} launch configs ran")
    return min(timed, key=lambda pair: pair[0])


def launch_sweep(time_us: Callable[[Any], float], configs: Sequence[Any]) -> dict[str, Any]:
    """The row fields of a launch-config sweep: best_us and best_tiles (`best_launch_config`)."""
    us, best = best_launch_config(time_us, configs)
    return {"best_us": us, "best_tiles": list(best)}


def block_bytes(model: nn.Module) -> int:
    """Bytes of the layer stack's parameters: what one pass over the layers must read."""
    return sum(p.numel() * p.element_size() for p in model.blocks.parameters())


def hbm_tbps(device: torch.device, override: float | None) -> float | None:
    """Peak HBM bandwidth (TB/s): the override, else the HBM_TBPS entry for this GPU, else None."""
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    for key, tbps in HBM_TBPS:
        if key in name:
            return tbps
    logger.warning("no HBM bandwidth known for %r; pass --hbm-tbps to report the HBM floor", name)
    return None
