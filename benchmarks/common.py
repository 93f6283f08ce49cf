"""Shared machinery of the benchmark scripts: variants, models, timing, quality, HBM floor, JSON, tables.

Invariants:
- Every variant is compiled from the same model (one set of weights per preset), checked against
  the eager model before it is timed, and never timed when it is sequential-equivalent (`exact`)
  but disagrees with eager beyond `TOLERANCE`; its row then says "check-failed".
- SNLP variants always run with fallback="error": a silent fallback can never yield an SNLP number.
- Times are per call in ms: CUDA events on GPU, `time.perf_counter` on CPU; the median is reported.
- The JSON on disk is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

from snlp_compile import prepare, snlp_backend
from snlp_compile.models import GPT, GPTConfig
from snlp_compile.solver import split_even

logger = logging.getLogger("snlp_compile")

# Peak HBM bandwidth in TB/s by GPU name (NVIDIA datasheets); the first matching substring wins.
HBM_TBPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("H200", 4.8),
)
# Largest relative logit error against eager that a sequential-equivalent variant may show.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# SNLP configurations per preset and grid, in priority order (a time budget cuts the tail): the first
# is the headline, the second the exactness check (iters = n_par: `check`), run right after it.
# n_par: layers solved in parallel (n_seq = L - n_par); fuse [F], iters [K], blocks, init as in SNLPConfig.
# n_par 1 is the sequential model through the SNLP backend's own kernels (exact): the control that
# separates what the kernels gain from what running layers in parallel gains.
_PAPER = [
    dict(n_par=24, iters=1),
    dict(n_par=24, iters=24, check=True),
    dict(n_par=1, iters=1),
    dict(n_par=24, fuse=2, iters=1),
    dict(n_par=12, fuse=12, iters=1),
    dict(n_par=24, iters=2),
    dict(n_par=24, iters=4),
    dict(n_par=24, iters=1, blocks=2),
]
_D20 = [
    dict(n_par=20, iters=1),
    dict(n_par=20, iters=20, check=True),
    dict(n_par=1, iters=1),
    dict(n_par=16, iters=1),
    dict(n_par=20, iters=2),
    dict(n_par=20, iters=1, blocks=2),
    dict(n_par=20, fuse=2, iters=1),
]
_TINY = [
    dict(n_par=4, iters=1),
    dict(n_par=4, iters=4, check=True),
    dict(n_par=2, fuse=2, iters=1),
    dict(n_par=4, iters=2, blocks=2),
]
GRIDS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "tiny": {"headline": _TINY, "minimal": _TINY[:2]},
    "paper-0.5b": {
        "headline": _PAPER,
        "minimal": _PAPER[:2],
        "full": _PAPER
        + [
            dict(n_par=32, iters=1),
            dict(n_par=16, iters=1),
            dict(n_par=24, fuse=4, iters=1),
            dict(n_par=24, iters=1, init="batch_fwd"),
            dict(n_par=24, iters=2, blocks=2),
            dict(n_par=24, iters=1, blocks=3),
        ],
    },
    "d20": {
        "headline": _D20,
        "minimal": _D20[:2],
        "full": _D20
        + [
            dict(n_par=20, iters=4),
            dict(n_par=10, iters=1),
            dict(n_par=20, fuse=4, iters=1),
            dict(n_par=20, iters=1, init="batch_fwd"),
            dict(n_par=20, iters=2, blocks=2),
        ],
    },
}


@dataclass(frozen=True)
class Variant:
    """One way of running the model. backend None = eager; options are SNLP options."""

    name: str
    backend: str | None = None
    mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # sequential-equivalent: must match eager within TOLERANCE
    timed: bool = True

    @property
    def kind(self) -> str:
        return "snlp" if self.backend == "snlp" else "baseline"

    @property
    def cudagraphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune") or bool(self.options.get("cudagraphs"))


def baseline_variants(device: torch.device) -> list[Variant]:
    """In priority order: eager, inductor with CUDA graphs, inductor on GPU; on CPU (smoke runs) eager and
    dynamo with the eager backend, which exercise the harness without inductor's compile time."""
    if device.type == "cuda":
        return [
            Variant("eager"),
            Variant("inductor+cg", "inductor", "reduce-overhead"),
            Variant("inductor", "inductor"),
        ]
    return [Variant("eager"), Variant("dynamo-eager", "eager")]


def snlp_variant(n_layer: int, spec: dict[str, Any], cudagraphs: bool, inner: str, timed: bool = True) -> Variant:
    """An SNLP variant from a grid spec {n_par, fuse, iters, blocks, init} (missing keys: defaults)."""
    n_par, fuse, iters = spec["n_par"], spec.get("fuse", 1), spec.get("iters", 1)
    blocks, init = spec.get("blocks", 1), spec.get("init", "h0")
    block = max(split_even(n_par, blocks)) if 1 <= blocks <= n_par else n_par
    exact = fuse == 1 and iters >= block - (init == "batch_fwd")
    options = dict(n_seq=n_layer - n_par, fuse=fuse, blocks=blocks, iters=iters, init=init, inner=inner)
    name = f"snlp p{n_par} F{fuse} K{iters}" + (f" B{blocks}" if blocks > 1 else "")
    name += " bf" if init == "batch_fwd" else ""
    name += " +cg" if cudagraphs else ""
    name += " check" if not timed else ""
    return Variant(
        name, "snlp", options={**options, "fallback": "error", "cudagraphs": cudagraphs}, exact=exact, timed=timed
    )


def with_option(variant: Variant, option: str, suffix: str) -> Variant:
    """The SNLP variant with one more boolean SNLP option on, its name suffixed."""
    return dataclasses.replace(variant, name=f"{variant.name} {suffix}", options={**variant.options, option: True})


def grid_variants(
    n_layer: int, grid: Sequence[dict[str, Any]], cudagraphs: str, inner: str, on_gpu: bool, default_cg: bool
) -> list[list[Variant]]:
    """The SNLP variants of each spec of a grid. cudagraphs "default": the first (headline) spec with
    and without CUDA graphs (`default_cg` first), the others with `default_cg`; "both"/"on"/"off" apply
    to every spec. A spec with "check" runs untimed with the eager inner compiler: the exactness check."""
    out = []
    for i, spec in enumerate(grid):
        if spec.get("check"):
            out.append([snlp_variant(n_layer, spec, False, "eager", timed=False)])
            continue
        if not on_gpu or cudagraphs == "off":
            modes = [False]
        elif cudagraphs == "on":
            modes = [True]
        elif cudagraphs == "both" or i == 0:
            modes = [default_cg, not default_cg]
        else:
            modes = [default_cg]
        out.append([snlp_variant(n_layer, spec, cg, inner) for cg in modes])
    return out


def compile_variant(model: nn.Module, variant: Variant, skip_module_guards: bool = False) -> Callable:
    """The model itself for eager; else a fresh torch.compile of it with static shapes. skip_module_guards:
    dynamo checks no nn.Module attribute before each call (torch.compiler.skip_guard_on_all_nn_modules_unsafe:
    less host time per call; safe here, where nothing changes the model between calls)."""
    if variant.backend is None:
        return model
    guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if skip_module_guards else {}
    if variant.backend == "snlp":
        return torch.compile(model, backend=snlp_backend, options={**variant.options, **guards}, dynamic=False)
    if guards:  # torch.compile takes a mode or options, not both: spell the mode as its options
        options = torch._inductor.list_mode_options(variant.mode) if variant.mode else {}
        return torch.compile(model, backend=variant.backend, options={**options, **guards}, dynamic=False)
    return torch.compile(model, backend=variant.backend, mode=variant.mode, dynamic=False)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int, **overrides: Any) -> GPT:
    """Random-weight GPT of a preset, seeded, in eval mode, with its layers' weights stacked in place
    (`prepare`: values unchanged, so eager and compiled variants all read the same weights)."""
    config = GPTConfig.preset(preset, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(config)
    model = model.to(dtype).eval().requires_grad_(False)
    return prepare(model)


def block_bytes(model: GPT) -> int:
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


def environment(device: torch.device) -> dict[str, Any]:
    """GPU, library versions and the command line of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Per-call times in ms of `reps` back-to-back calls after `warmup` calls (CUDA events on GPU)."""
    mark_step = torch.compiler.cudagraph_mark_step_begin
    for _ in range(warmup):
        mark_step()
        fn()
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
        mark_step()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def deciles(values: Sequence[float]) -> list[float]:
    """The nine deciles of values (for a single value, that value nine times)."""
    return statistics.quantiles(values, n=10) if len(values) > 1 else list(values) * 9


L2_DEFEAT_BYTES = 256 << 20  # bytes of operand copies per graph: several times the largest L2 (H100: 50 MB)


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


def headline_n_par(preset: str) -> int:
    """Parallel layers of the preset's headline SNLP configuration (all layers for a preset without a grid)."""
    grid = GRIDS.get(preset)
    return grid["headline"][0]["n_par"] if grid else GPTConfig.preset(preset).n_layer


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


SWEEP_HEADERS = ["best us", "best tiles"]


def launch_sweep(time_us: Callable[[Any], float], configs: Sequence[Any]) -> dict[str, Any]:
    """The row fields of a launch-config sweep: best_us and best_tiles (`best_launch_config`)."""
    us, best = best_launch_config(time_us, configs)
    return {"best_us": us, "best_tiles": list(best)}


def sweep_cells(row: dict[str, Any]) -> list[str]:
    """The table cells under SWEEP_HEADERS for a row with `launch_sweep`'s fields."""
    return [f"{row['best_us']:.2f}", str(tuple(row["best_tiles"]))]


@torch.no_grad()
def compare(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """(relative L2 error of the logits, top-1 agreement) of out against ref, both [..., V]."""
    diff = torch.linalg.vector_norm(out.float() - ref.float())
    rel = (diff / torch.linalg.vector_norm(ref.float()).clamp_min(1e-30)).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, top1


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the benchmark scripts."""
    parser.add_argument("--preset", nargs="+", default=None, help="model presets (default: paper-0.5b d20)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes")
    parser.add_argument(
        "--grid", default="headline", help=f"SNLP grid: {sorted({g for p in GRIDS.values() for g in p})}"
    )
    parser.add_argument("--cudagraphs", choices=("default", "both", "on", "off"), default="default")
    parser.add_argument("--inner", choices=("inductor", "eager"), default=None, help="SNLP inner compiler")
    parser.add_argument(
        "--max-autotune",
        nargs="?",
        const="all",
        choices=("all", "baseline"),
        default=None,
        help="GPU: add the inductor max-autotune baseline (with CUDA graphs) and, unless 'baseline', autotune "
        "the timed SNLP variants",
    )
    parser.add_argument("--gemv", action="store_true", help="also time each SNLP variant with gemv=True")
    parser.add_argument(
        "--skip-module-guards",
        action="store_true",
        help="compile every variant without dynamo's nn.Module guards (less host time per call)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (smoke: float32)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="timed calls per variant (median reported)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="per preset: start no variant after this many seconds"
    )
    parser.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth for the floor (default: by GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, eager inner compiler")
    parser.add_argument("--out", type=Path, default=Path("out"))


class Bench:
    """One benchmark run: settings, the rows measured so far, and the JSON they are written to."""

    def __init__(self, question: str, args: argparse.Namespace, default_cg: bool, **settings: Any):
        self.question, self.args, self.default_cg = question, args, default_cg
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.dtype = DTYPES[args.dtype or ("float32" if args.smoke else "bfloat16")]
        self.presets = args.preset or (["tiny"] if args.smoke else ["paper-0.5b", "d20"])
        self.inner = args.inner or ("eager" if args.smoke else "inductor")
        self.tbps = hbm_tbps(self.device, args.hbm_tbps)
        self.start = self.preset_start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.path = args.out / f"{question}.json"
        self.settings = {
            **settings,
            "batch": args.batch,
            "dtype": str(self.dtype).removeprefix("torch."),
            "grid": args.grid,
            "inner": self.inner,
            "warmup": args.warmup,
            "reps": args.reps,
            "seed": args.seed,
            "hbm_tbps": self.tbps,
            "tolerance": TOLERANCE[self.dtype],
            "skip_module_guards": args.skip_module_guards,
        }
        self.env = environment(self.device)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.smoke:  # CPU smoke runs time nothing worth tuning; one thread avoids OpenMP stalls on busy cores
            torch.set_num_threads(1)
        torch._dynamo.config.cache_size_limit = 64
        torch._dynamo.config.accumulated_cache_size_limit = 512
        logger.info("%s benchmark on %s; %s", question, self.env["gpu"] or self.device, self.env)

    def variants(self, preset: str, n_layer: int) -> list[Variant]:
        """Baselines and the SNLP grid of this preset, in priority order for the time budget: eager and the
        strongest baseline, the headline SNLP spec and the exactness check, the other baselines, the rest."""
        grids = GRIDS.get(preset, {})
        if self.args.grid not in grids:
            raise ValueError(f"no grid {self.args.grid!r} for preset {preset!r}; grids: {sorted(grids)}")
        on_gpu = self.device.type == "cuda"
        specs = grid_variants(n_layer, grids[self.args.grid], self.args.cudagraphs, self.inner, on_gpu, self.default_cg)
        base = baseline_variants(self.device)
        if self.args.max_autotune and on_gpu:
            base.insert(2, Variant("inductor+cg+at", "inductor", "max-autotune"))
            if self.args.max_autotune == "all":
                specs = [[with_option(v, "max_autotune", "+at") if v.timed else v for v in vs] for vs in specs]
        if self.args.gemv:  # each timed SNLP variant also with the Triton batched GEMV, right after it
            specs = [[w for v in vs for w in ([v, with_option(v, "gemv", "gemv")] if v.timed else [v])] for vs in specs]
        return base[:2] + [v for vs in specs[:2] for v in vs] + base[2:] + [v for vs in specs[2:] for v in vs]

    def begin_preset(self, preset: str) -> None:
        """Start the time budget (--budget-s, per preset) of the next preset."""
        self.preset_start = time.perf_counter()
        logger.info("%s: preset %s (%.0f s into the run)", self.question, preset, self.elapsed())

    def over_budget(self) -> bool:
        return self.args.budget_s is not None and time.perf_counter() - self.preset_start > self.args.budget_s

    def run(
        self,
        model: GPT,
        variant: Variant,
        check: Callable[[Callable], tuple[float, float]],
        step: Callable[[Callable], Callable[[], Any]],
        warmup: int,
        reps: int,
        **fields: Any,
    ) -> dict[str, Any]:
        """Compile, check against eager, time and record one variant; cleans up the compile after."""
        floor_ms = block_bytes(model) / (self.tbps * 1e12) * 1e3 if self.tbps else None
        row: dict[str, Any] = {
            **fields,
            "variant": variant.name,
            "kind": variant.kind,
            "backend": variant.backend or "eager",
            "cudagraphs": variant.cudagraphs,
            "options": variant.options,
            "exact": variant.exact,
            "floor_ms": floor_ms,
        }
        if self.over_budget():
            logger.warning("skipping %s: over the time budget of %s s", variant.name, self.args.budget_s)
            return self.record({**row, "status": "skipped"})
        skips = counters["inductor"]["cudagraph_skips"]
        t0 = time.perf_counter()
        try:
            fn = compile_variant(model, variant, self.args.skip_module_guards)
            rel, top1 = check(fn)
            row.update(compile_s=round(time.perf_counter() - t0, 2), rel_err=rel, top1=top1)
            tolerance = TOLERANCE[self.dtype]
            if variant.exact and not rel <= tolerance:
                logger.error("%s disagrees with eager: rel err %.3g > %.3g", variant.name, rel, tolerance)
                row["status"] = "check-failed"
            elif variant.timed:
                times = time_calls(step(fn), self.device, warmup, reps)
                q = deciles(times)
                row.update(status="ok", ms=statistics.median(times), ms_p10=q[0], ms_p90=q[-1], reps=len(times))
            else:
                row["status"] = "checked"
        except Exception as error:  # one failing variant must not end the run
            logger.error("%s failed:\n%s", variant.name, traceback.format_exc())
            row.update(status="error", error=f"{type(error).__name__}: {error}"[:500])
        finally:
            fn = None
            torch._dynamo.reset()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        if variant.cudagraphs and row["cudagraph_skips"]:
            logger.warning("%s: inductor skipped CUDA graphs (see the log above for why)", variant.name)
        logger.info("%s: %s", variant.name, {k: row.get(k) for k in ("status", "ms", "rel_err", "top1", "compile_s")})
        return self.record(row)

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        add_speedups(self.rows)
        self.write()
        return row

    def sweep(
        self,
        make_problem: Callable[[nn.Module, int], Any],
        warmup: int,
        reps: int,
        per_call_tokens: Callable[[int], int],
        title: str,
    ) -> None:
        """Every preset x batch x variant: build the model once per preset and the problem (an object with
        `check(fn)` and `step(fn)`) once per batch; plot after each preset, then report."""
        from benchmarks.plot import plot_latency  # plot imports this module

        for preset in self.presets:
            self.begin_preset(preset)
            model = build_model(preset, self.device, self.dtype, self.args.seed)
            for batch in self.args.batch:
                problem = make_problem(model, batch)
                for variant in self.variants(preset, model.config.n_layer):
                    self.run(
                        model,
                        variant,
                        problem.check,
                        problem.step,
                        warmup,
                        reps,
                        preset=preset,
                        batch=batch,
                        tokens=per_call_tokens(batch),
                    )
                del problem
            del model
            plot_latency(self.rows, self.path.with_suffix(".png"), title)
        self.report(extra=[("tok/s", "tokens_per_s", ".0f")])
        logger.info("%s benchmark done in %.0f s; wrote %s", self.question, self.elapsed(), self.path)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def doc(self) -> dict[str, Any]:
        """The JSON document: question, environment, settings, rows."""
        return {
            "question": self.question,
            "env": self.env,
            "settings": self.settings,
            "elapsed_s": round(self.elapsed(), 1),
            "rows": self.rows,
        }

    def write(self) -> None:
        write_json(self.path, self.doc())

    def report(self, extra: Sequence[tuple[str, str, str]] = ()) -> None:
        """Print the environment line and the result table."""
        print(describe_env(self.doc()))
        print(format_table(*result_table(self.rows, extra)))


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Per (preset, batch): speedup of each timed row against each baseline and the best baseline,
    its fraction of the HBM floor (floor_ms / ms) and its tokens/s (tokens per call / time)."""
    for row in rows:
        if row.get("ms") is None:
            continue
        group = [r for r in rows if r["preset"] == row["preset"] and r["batch"] == row["batch"]]
        baselines = {r["variant"]: r["ms"] for r in group if r["kind"] == "baseline" and r.get("ms")}
        row["speedup"] = {name: ms / row["ms"] for name, ms in baselines.items()}
        if baselines:
            best = min(baselines, key=baselines.get)
            row.update(best_baseline=best, speedup_best=baselines[best] / row["ms"])
        if row.get("floor_ms"):
            row["floor_frac"] = row["floor_ms"] / row["ms"]
        if row.get("tokens"):
            row["tokens_per_s"] = row["tokens"] / row["ms"] * 1e3


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by (preset, batch) in order of appearance, baselines first, otherwise as measured."""
    groups = list(dict.fromkeys((r["preset"], r["batch"]) for r in rows))
    return sorted(rows, key=lambda r: (groups.index((r["preset"], r["batch"])), r["kind"] != "baseline"))


def result_table(rows: Sequence[dict[str, Any]], extra: Sequence[tuple[str, str, str]] = ()) -> tuple[list, list]:
    """Headers and cells of the standard result table; extra: (header, row key, format) columns."""
    baselines = list(dict.fromkeys(r["variant"] for r in rows if r["kind"] == "baseline"))
    headers = ["preset", "B", "variant", "ms", *[f"x {b}" for b in baselines], "x best", "floor %"]
    headers += [h for h, _, _ in extra] + ["rel err", "top1", "compile s", "status"]
    cells = []
    for r in ordered(rows):
        speedup = r.get("speedup", {})
        floor = r.get("floor_frac")
        cells.append(
            [r["preset"], str(r["batch"]), r["variant"], _fmt(r.get("ms"), ".3f")]
            + [_fmt(speedup.get(b), ".2f") for b in baselines]
            + [_fmt(r.get("speedup_best"), ".2f"), _fmt(floor * 100 if floor else None, ".1f")]
            + [_fmt(r.get(key), spec) for _, key, spec in extra]
            + [_fmt(r.get("rel_err"), ".2e"), _fmt(r.get("top1"), ".3f"), _fmt(r.get("compile_s"), ".0f")]
            + [r["status"] + (" (cg skipped)" if r["cudagraphs"] and r.get("cudagraph_skips") else "")]
        )
    return headers, cells


def format_table(headers: Sequence[str], cells: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A column-aligned text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *cells, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [headers, *cells]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def describe_env(doc: dict[str, Any]) -> str:
    """One line naming the hardware, versions, dtype and command of a result JSON."""
    env, settings = doc["env"], doc["settings"]
    hw = env["gpu"] or f"CPU ({env['cpu']})"
    return (
        f"{doc['question']}: {hw}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"{settings['dtype']}; command: {env['command']}"
    )


def setup_logging() -> None:
    """Log the snlp_compile logger (backend and benchmarks) to stderr, timestamped; silence vmap's
    per-call "batching rule not implemented" warnings, which would flood the logs."""
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
