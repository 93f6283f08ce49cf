"""The benchmark harness: command-line arguments, the environment of a run, and `Bench`, which compiles,
checks, times and records every variant of a latency benchmark; and the loop of the kernel benchmarks.

Invariants:
- A variant is never timed when it is sequential-equivalent (`exact`) but disagrees with eager beyond
  TOLERANCE; its row then says "check-failed". One failing variant records an error row and the run goes on.
- The reported time is the median of the timed calls.
- The JSON on disk is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters

from benchmarks.grids import GRID_NAMES, GRIDS
from benchmarks.plot import plot_latency
from benchmarks.report import add_speedups, describe_env, format_table, result_table, write_json
from benchmarks.timing import block_bytes, deciles, hbm_tbps, time_calls
from benchmarks.variants import (
    DTYPES,
    TOLERANCE,
    Variant,
    baseline_variants,
    build_model,
    compile_limits,
    compile_variant,
    grid_variants,
    with_option,
)
from snlp_compile.models import GPT

logger = logging.getLogger("snlp_compile")


def run_device(smoke: bool) -> torch.device:
    """The GPU when there is one, except for smoke runs, which run on CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def run_dtype(name: str | None, smoke: bool) -> torch.dtype:
    """The dtype named by --dtype; default bfloat16, float32 for smoke runs."""
    return DTYPES[name or ("float32" if smoke else "bfloat16")]


def environment(device: torch.device) -> dict[str, Any]:
    """GPU, library versions and the command line of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def setup_logging() -> None:
    """Log the snlp_compile logger (backend and benchmarks) to stderr, timestamped; silence vmap's
    per-call "batching rule not implemented" warnings, which would flood the logs."""
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the latency benchmarks and the profiler."""
    parser.add_argument("--preset", nargs="+", default=None, help="model presets (default: paper-0.5b d20)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes")
    parser.add_argument("--grid", default="headline", help=f"SNLP grid: {GRID_NAMES}")
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
        self.device = run_device(args.smoke)
        self.dtype = run_dtype(args.dtype, args.smoke)
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
            with compile_limits():
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


def kernel_parser(description: str, sweep_help: str) -> argparse.ArgumentParser:
    """The arguments of a kernel benchmark: presets, --sweep (a grid of launch configurations), --out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["d20", "paper-0.5b"])
    parser.add_argument("--sweep", action="store_true", help=sweep_help)
    parser.add_argument("--out", type=Path, default=Path("out"))
    return parser


def parse_gpu_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line of a script that times CUDA kernels; refuse (exit 2) without a GPU."""
    args = parser.parse_args()
    setup_logging()
    if not torch.cuda.is_available():
        parser.error(f"{parser.prog} times CUDA kernels and needs a GPU")
    return args


def measure_kernels(
    question: str,
    out: Path,
    settings: dict[str, Any],
    problems: Iterable[dict[str, Any]],
    measure: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """The result document of a kernel benchmark: `measure(problem)` for each problem, OUT/<question>.json
    rewritten after each."""
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(question=question, env=environment(torch.device("cuda")), settings=settings, rows=[])
    for problem in problems:
        doc["rows"].append(measure(problem))
        torch.cuda.empty_cache()
        logger.info("%s %s", question.replace("_", " "), doc["rows"][-1])
        write_json(out / f"{question}.json", doc)
    return doc
